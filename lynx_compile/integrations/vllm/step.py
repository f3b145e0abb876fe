"""What kind of step a MoE layer call belongs to, read from vLLM's forward context.

Re-routing is decided on host values only, so it never synchronises with the device. The
choice is baked into a CUDA graph when the call is captured, so it must hold for every batch
that graph is later replayed for (``v1/cudagraph_dispatcher.py``, ``v1/worker/gpu/cudagraph_utils.py``):

- PIECEWISE graphs are keyed by token count alone and serve prefill, mixed and decode
  batches alike: never re-route (the graph keeps vLLM's routing).
- FULL graphs: the V1 runner dispatches uniform-decode batches to graphs captured with
  ``batch_descriptor.uniform`` True and everything else to graphs captured with it False, so
  ``uniform`` decides. The V2 runner captures FULL graphs without a batch descriptor; its
  decode graphs are captured with ``max_query_len`` 1 and its mixed FULL graphs with
  ``max_query_len`` = the token count (>= 2), so the attention metadata decides.
- No graph (eager, CPU, batches above the largest capture size): the attention metadata of
  this very step decides: decode when every request has one query token.

Live rows: ``forward_context.is_padding`` (a view of a persistent buffer the runner fills
before every step, so a captured graph reads the current mask at replay). When its length
differs from the router's rows (data parallel gathers other ranks' rows, sequence parallel
splits them) padding cannot be told apart and lynx does not re-route.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Step:
    decode: bool  # a decode step (every sequence adds one token)
    reroute: bool  # run the batch-aware selector on this call
    live: torch.Tensor | None  # bool [rows]: real tokens; None: every row is real
    why: str  # why not, when reroute is False


def read_step(num_rows: int, decode_only: bool, trust_padding: bool) -> Step:
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return Step(False, False, None, "no forward context")
    context = get_forward_context()
    decode, why = _is_decode(context, CUDAGraphMode)
    if context.cudagraph_runtime_mode == CUDAGraphMode.PIECEWISE:
        return Step(decode, False, None, "piecewise CUDA graph (shared by every step kind)")
    if decode_only and not decode:
        return Step(False, False, None, why)
    if num_rows < 2:
        return Step(decode, False, None, "fewer than 2 rows")
    padding = context.is_padding
    if padding is None:
        if context.dp_metadata is not None:
            return Step(decode, False, None, "data parallel without a padding mask")
        return Step(decode, True, None, "")
    if padding.shape[0] != num_rows:
        return Step(decode, False, None, f"padding mask has {padding.shape[0]} rows, the router {num_rows}")
    if not trust_padding:
        return Step(decode, False, None, "VLLM_MOE_SKIP_PADDING=0: the V2 runner does not fill the padding mask")
    return Step(decode, True, ~padding, "")


def _is_decode(context, modes) -> tuple[bool, str]:
    if context.cudagraph_runtime_mode == modes.FULL and context.batch_descriptor is not None:
        # uniform also holds for speculative-decoding verification (k + 1 tokens per request).
        query_len = max_query_len(context.attn_metadata)
        uniform = bool(context.batch_descriptor.uniform) and query_len in (None, 1)
        return uniform, "" if uniform else "FULL CUDA graph of a non-uniform or multi-token batch"
    query_len = max_query_len(context.attn_metadata)
    if query_len is None:
        return False, "attention metadata does not give the query length"
    return query_len == 1, "" if query_len == 1 else f"prefill or mixed step (max query length {query_len})"


def max_query_len(attn_metadata) -> int | None:
    """The longest query of the step, from any layer's attention metadata (None if none says)."""
    if isinstance(attn_metadata, list):  # dual-batch overlap: one dict per micro-batch
        from vllm.v1.worker.ubatching import dbo_current_ubatch_id

        attn_metadata = attn_metadata[dbo_current_ubatch_id()] if attn_metadata else None
    if not attn_metadata:
        return None
    lengths = [length for length in map(_query_len, attn_metadata.values()) if length is not None]
    return max(lengths) if lengths else None


def _query_len(metadata) -> int | None:
    length = getattr(metadata, "max_query_len", None)
    if isinstance(length, int):
        return length
    prefills, decodes, decode_tokens = (getattr(metadata, name, None)
                                        for name in ("num_prefills", "num_decodes", "num_decode_tokens"))
    if all(isinstance(value, int) for value in (prefills, decodes, decode_tokens)):
        return 1 if prefills == 0 and decode_tokens == decodes else 2  # 2: "longer than one"
    return None

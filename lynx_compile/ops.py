"""The two custom ops the lynx passes insert into a graph.

``lynx::select_experts`` replaces a router's top-k; ``lynx::grouped_experts`` replaces the
experts dispatch. Both are opaque to Inductor (``torch.library.custom_op`` with a fake
implementation), so a compiled graph calls them like any fallback kernel.
"""

from __future__ import annotations

import torch

from . import capture
from .kernels.experts_cpu import grouped_experts_cpu
from .kernels.experts_ref import ACTIVATIONS, LAYOUTS, grouped_experts_reference
from .selector import batch_aware_topk, softmax_topk_weights, topk_ids


def is_decode_step(num_tokens: int, seq_len: int) -> bool:
    """Memory-bound decode: one new token per sequence and at least 2 tokens in the step."""
    return seq_len == 1 and num_tokens >= 2


@torch.library.custom_op("lynx::select_experts", mutates_args=())
def select_experts_op(
    router_logits: torch.Tensor,
    top_k: int,
    seq_len: int,
    alpha: float,
    beta: int | None,
    renormalize: bool,
    decode_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing for one MoE layer: batch-aware in decode steps, plain top-k otherwise.

    ``seq_len`` is the sequence length of the layer input, read from the graph (a prefill
    of 16 tokens and a decode step of 16 sequences have the same token count).
    """
    logits = router_logits.float()
    num_tokens = logits.shape[0]
    rerouted = num_tokens >= 2 and (not decode_only or is_decode_step(num_tokens, seq_len))
    if rerouted:
        ids = batch_aware_topk(logits, top_k, alpha, beta)
        weights = softmax_topk_weights(logits, ids, top_k, renormalize)
    else:
        # Plain routing with the model's own ops, so prefill numerics are unchanged.
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    capture.record_routing(logits, seq_len, ids, weights, rerouted)
    return weights, ids


@select_experts_op.register_fake
def _(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only):
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int64)
    return weights, ids


@torch.library.custom_op("lynx::grouped_experts", mutates_args=())
def grouped_experts_op(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str,
    layout: str,
) -> torch.Tensor:
    """``sum_j w[t, j] * expert_{ids[t, j]}(hidden[t])`` for gated-MLP experts.

    ``layout`` names how ``gate_up`` / ``down`` are stored (see ``experts_ref.LAYOUTS``);
    ``activation`` the gate's activation. Output has ``hidden``'s dtype and shape.
    This default implementation serves devices without a specialised kernel.
    """
    capture.record_dispatch(topk_ids)
    return grouped_experts_reference(hidden, topk_ids, topk_weights, gate_up, down, activation, layout)


@grouped_experts_op.register_kernel("cpu")
def _(hidden, topk_ids, topk_weights, gate_up, down, activation, layout):
    return grouped_experts_cpu(hidden, topk_ids, topk_weights, gate_up, down, activation, layout)


@grouped_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, gate_up, down, activation, layout):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown experts layout {layout!r}; valid: {sorted(LAYOUTS)}")
    return torch.empty_like(hidden)

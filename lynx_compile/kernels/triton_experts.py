"""Grouped MLP experts in Triton, built for decode: each active expert's weights are
read once per step. Same contract as ``experts_ref.grouped_experts_reference`` (ids equal to E, the
expert-parallel sentinel, are dropped by the align step and skipped by the sum; ids are not
range-checked on the device).

Four launches, all grids sized from shapes, no host synchronisation (CUDA-graph safe):
  1. align    (1 program)  group the T*k (token, slot) pairs by expert into tiles of at most
                           BLOCK_M rows of one expert (``triton_moe_align``);
  2. gate_up  (tiles x N-tiles of I)  stream W_gate/W_up for one tile's expert, fp32
                           accumulators, epilogue: bias, act(gate) * up, store in the
                           weights' dtype;
  3. down     (tiles x N-tiles of H x K-splits)  stream W_down, epilogue: bias, times the
                           routed weight, store fp32 per (split, pair);
  3b. norm    (T*k, only with a post-expert norm)  the splits of a pair's row summed, normed,
                           times the routed weight (the down epilogue then weighs by 1);
  4. sum      (T x H-blocks)  out[t] = sum over slots and splits in a fixed order, cast.

Why this decomposition.
- vLLM's ``fused_moe_kernel`` sorts tokens by expert and pads every expert to BLOCK_M rows,
  then runs one program per (BLOCK_M block, N-tile). We keep its good parts: a grid sized
  for the worst case with early exit, the routed weight in the down epilogue, and a
  separate deterministic sum over k instead of atomics. But vLLM computes gate and up as
  one 2I-wide GEMM and runs the activation as a separate kernel; here act * up is fused
  into the gate_up epilogue (each program holds matching gate and up columns), so the
  2I-wide intermediate never reaches memory.
- HF's decode grouped GEMM runs one program per (expert, N-tile) that walks that expert's
  rows, so a weight tile leaves HBM once however many rows use it: the right shape for
  decode, where an expert has 1-4 rows and the step is bandwidth-bound. We get the same
  thing by choosing BLOCK_M >= T on the host (a token picks an expert at most once, so an
  expert has at most T rows): at decode every active expert is exactly one tile, and the
  grid is min(E, T*k) x N-tiles programs. Only past T > 64 (prefill) does an expert span
  several tiles, which then degrades gracefully into vLLM's padded-block scheme instead of
  HF's serial walk, which loses above ~32 rows per expert.
- The down projection has only H/BLOCK_N tiles per expert; at batch 1 that is far too few
  programs to saturate HBM (Mixtral: 2 experts x 64), so it splits K = I across programs.
  The partial sums go through the same fp32 buffer the slot sum reads, so split-K costs no
  atomics and stays deterministic.
- Layouts differ mostly in addressing, so the concatenated and split layouts are strides
  and an up-offset passed to one kernel; the interleaved GPT-OSS layout is a constexpr
  branch that streams one contiguous [K, 2N] tile and splits gate from up in the epilogue
  (stride-2 loads of each half would defeat vector loads and the software pipeline).
  Activation and bias are constexprs too. Triton specialises unit strides, so the
  nn.Linear layouts still get vectorised loads along K.
"""

from __future__ import annotations

import torch
import triton.language as tl

from .experts_ref import check_call_shapes, check_experts_args, check_post_norm
from .triton_experts_config import ExpertsConfig, default_config
from .triton_experts_gemm import (
    GELU, GELU_TANH, RELU, RELU2, SILU, SILU_CLAMPED, SWIGLU_OAI, SWIGLU_SOFTCAPPED, down_kernel, gate_up_kernel,
    post_norm_kernel, sum_slots_kernel,
)
from .triton_moe_align import align_routing

_ACTIVATIONS = {"silu": SILU, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU, "swiglu_oai": SWIGLU_OAI,
                "silu_clamped": SILU_CLAMPED, "swiglu_softcapped": SWIGLU_SOFTCAPPED, "relu2": RELU2}
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Scratch buffers come from here, so tests can poison them.
_workspace = torch.empty


def _interpreted() -> bool:
    return type(gate_up_kernel).__name__ == "InterpretedFunction"


def _layout_geometry(layout, w_gate_up, w_up, w_down, b_gate_up):
    """Sizes and strides that place every layout's weights in the kernels' (k, n) terms."""
    if any(w is not None and w.dim() != 3 for w in (w_gate_up, w_up, w_down)):
        raise ValueError(f"expert weights must be 3-D [E, ., .], got {[tuple(w.shape) for w in (w_gate_up, w_up, w_down) if w is not None]}")
    num_experts = w_gate_up.shape[0]
    s = w_gate_up.stride()
    if layout in ("gate_up_interleaved_t", "gate_up_concat_t"):  # [E, H, 2I]: alternating or halves
        hidden_size, inter_size = w_gate_up.shape[1], w_gate_up.shape[2] // 2
        up_offset = 0 if layout == "gate_up_interleaved_t" else inter_size * s[2]
        gate_up = dict(stride_gate_e=s[0], stride_up_e=s[0], up_offset=up_offset, stride_w_n=s[2], stride_w_k=s[1])
        down_shape, down = (num_experts, inter_size, hidden_size), dict(stride_w_n=w_down.stride(2), stride_w_k=w_down.stride(1))
    else:  # [E, 2I, H] gate rows then up rows, [E, I, H] gate with a separate up, or [E, I, H] up alone
        hidden_size = w_gate_up.shape[2]
        inter_size = w_gate_up.shape[1] if layout in ("gate_up_split", "up_only") else w_gate_up.shape[1] // 2
        up_stride_e, up_offset = (w_up.stride(0), 0) if layout == "gate_up_split" else (s[0], inter_size * s[1])
        gate_up = dict(stride_gate_e=s[0], stride_up_e=up_stride_e, up_offset=up_offset, stride_w_n=s[1], stride_w_k=s[2])
        down_shape, down = (num_experts, hidden_size, inter_size), dict(stride_w_n=w_down.stride(1), stride_w_k=w_down.stride(2))
    if layout == "gate_up_split" and (w_up.shape != w_gate_up.shape or w_up.stride()[1:] != s[1:]):
        raise ValueError(f"w_up must match w_gate_up's shape and strides, got {tuple(w_up.shape)} vs {tuple(w_gate_up.shape)}")
    if layout not in ("gate_up_split", "up_only") and w_gate_up.shape[-2 if layout == "gate_up_concat" else -1] % 2:
        raise ValueError(f"layout {layout!r} needs an even gate_up width, got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != down_shape:
        raise ValueError(f"layout {layout!r}: w_down must be {down_shape}, got {tuple(w_down.shape)}")
    if b_gate_up is not None:  # made contiguous; only the interleaved layout has biases
        gate_up.update(stride_bias_e=2 * inter_size, bias_up_offset=0, stride_bias_n=1)
    else:
        gate_up.update(stride_bias_e=0, bias_up_offset=0, stride_bias_n=0)
    return hidden_size, inter_size, gate_up, down


def _check_tensors(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, hidden_size, inter_size):
    check_call_shapes(hidden, topk_ids, topk_weights, w_gate_up, b_gate_up, b_down, hidden_size, inter_size)
    weights = [w for w in (w_gate_up, w_down, w_up) if w is not None]
    if w_gate_up.dtype not in _WEIGHT_DTYPES or any(w.dtype != w_gate_up.dtype for w in weights):
        raise ValueError(f"expert weights must share one dtype of {_WEIGHT_DTYPES}, got {[w.dtype for w in weights]}")
    tensors = [hidden, topk_ids, topk_weights, *weights, *(b for b in (b_gate_up, b_down) if b is not None)]
    if any(t.device != hidden.device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if hidden.device.type != "cuda" and not _interpreted():
        raise ValueError("grouped_experts_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")


def grouped_experts_triton(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up=None, b_gate_up=None, b_down=None,
    activation="silu", layout="gate_up_concat", activation_args=(), post_norm_weight=None, post_norm="none",
    post_norm_args=(), *, out: torch.Tensor | None = None, config: ExpertsConfig | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * norm(expert_{topk_ids[t, j]}(hidden[t]))``, ``hidden``'s
    dtype and shape (``norm``: the post-expert norm, if any). ``out`` (contiguous, that dtype and
    shape) receives the result if given."""
    activation_args = list(activation_args)
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    hidden_size, inter_size, gate_up_geo, down_geo = _layout_geometry(layout, w_gate_up, w_up, w_down, b_gate_up)
    _check_tensors(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, hidden_size, inter_size)
    post_norm, post_scale, post_norm_args = check_post_norm(post_norm, post_norm_weight, post_norm_args, hidden_size)
    if post_norm_weight is not None and post_norm_weight.device != hidden.device:
        raise ValueError(f"post_norm_weight must be on {hidden.device}, got {post_norm_weight.device}")
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate_up.shape[0]
    if out is None:
        out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    elif out.shape != hidden.shape or out.dtype != hidden.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {hidden.dtype} {tuple(hidden.shape)}, got {out.dtype} {tuple(out.shape)}")
    if num_tokens == 0:
        return out

    interpreted = _interpreted()
    if config is None:
        config = default_config(num_tokens, top_k, num_experts, hidden_size, inter_size,
                                w_gate_up.element_size(), hidden.device, interpreted)
    config.check()
    hidden = hidden.contiguous()
    routed = topk_weights.contiguous()
    routing = align_routing(topk_ids, num_experts, config.block_m, workspace=_workspace)
    num_pairs = num_tokens * top_k
    num_tiles = routing.tile_expert.shape[0]
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    fp32_dot = interpreted or w_gate_up.dtype == torch.float32
    tiles = (routing.sorted_pairs, routing.tile_expert, routing.tile_start, routing.tile_end)

    inter = _workspace((num_pairs, inter_size), dtype=w_gate_up.dtype, device=hidden.device)
    act_p0, act_p1 = (*activation_args, 0.0, 0.0)[:2]  # the kernel's two activation constants
    grid = (num_tiles, -(-inter_size // config.gate_up_block_n))
    gate_up_kernel[grid](
        hidden, w_gate_up, w_up if w_up is not None else w_gate_up,
        b_gate_up.contiguous() if b_gate_up is not None else w_gate_up, inter, *tiles,
        hidden_size, inter_size, top_k, hidden.stride(0), **gate_up_geo,
        act_p0=float(act_p0), act_p1=float(act_p1),
        INTERLEAVED=layout == "gate_up_interleaved_t", GATED=layout != "up_only", ACTIVATION=_ACTIVATIONS[activation], HAS_BIAS=b_gate_up is not None, FP32_DOT=fp32_dot,
        BLOCK_M=config.block_m, BLOCK_N=config.gate_up_block_n, BLOCK_K=config.gate_up_block_k, **launch,
    )

    k_per_split = -(-inter_size // config.split_k)
    k_per_split = -(-k_per_split // config.down_block_k) * config.down_block_k
    num_splits = -(-inter_size // k_per_split)
    partial = _workspace((num_splits, num_pairs, hidden_size), dtype=torch.float32, device=hidden.device)
    grid = (num_tiles, -(-hidden_size // config.down_block_n), num_splits)
    normed = post_norm != "none"  # the norm reads whole unweighted rows: the weight comes after it
    down_kernel[grid](
        inter, w_down, b_down.contiguous() if b_down is not None else w_down,
        torch.ones_like(routed) if normed else routed, partial, *tiles,
        hidden_size, inter_size, num_pairs, k_per_split,
        w_down.stride(0), **down_geo, stride_bias_e=hidden_size,
        HAS_BIAS=b_down is not None, FP32_DOT=fp32_dot,
        BLOCK_M=config.block_m, BLOCK_N=config.down_block_n, BLOCK_K=config.down_block_k, **launch,
    )
    ids = topk_ids.contiguous()
    if normed:  # each row's splits summed, normed and weighted into split 0
        row_block = 1 << (hidden_size - 1).bit_length()
        post_norm_kernel[(num_pairs,)](
            partial, ids, routed, post_scale.contiguous(), hidden_size, num_pairs, num_splits,
            num_experts, float(post_norm_args[0]), ROUND=_TL_DTYPES[hidden.dtype], BLOCK_H=row_block,
            num_warps=min(16, max(1, row_block // 256)),
        )
        num_splits = 1

    block_h = min(1024, 1 << (hidden_size - 1).bit_length())
    sum_slots_kernel[(num_tokens, -(-hidden_size // block_h))](
        partial, ids, out, hidden_size, num_pairs, top_k, num_splits, num_experts, BLOCK_H=block_h,
    )
    return out

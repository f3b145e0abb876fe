"""CPU grouped experts: the fused C++ kernel at decode, ``torch._grouped_mm`` at prefill.

Decode is memory-bound: the cost is the bytes of expert weights read. Both paths read only the
experts that received tokens, each once, with fp32 accumulation, and sum a token's k weighted
outputs in fp32 in slot order.

- ``fused`` (``experts_cpu.cpp``): one C++ call per layer: counting sort by expert, gate_up +
  activation, down, slot sum, every expert's weight streamed once while all its rows pass over
  it. The only path that keeps decode at the memory limit in bf16 on CPUs without native bf16
  GEMM (MKL's bf16 GEMM with 2+ rows is many times slower there), and the only one whose cost
  at the shipped model's cache-resident shapes is not op overheads.
- ``grouped_mm``: tokens sorted by expert, one ``torch._grouped_mm`` per projection (a loop
  of ``torch.mm`` over the non-empty groups where strides are not 16-byte aligned). MKL GEMM
  is faster once experts have many rows each (prefill).

A post-expert norm (``experts_ref.POST_NORMS``) runs on each computed row before its weight, on
both paths. Slots whose id is ``E`` (the sentinel of expert parallelism: an expert on another rank) add
nothing on either path. ``choose_path`` decides from shapes alone; ``benchmarks/experts_cpu.py`` measures both.
"""

from __future__ import annotations

import functools

import torch

from . import experts_cpu_fused
from .experts_ref import (
    check_call_shapes, check_expert_ids, check_experts_args, check_post_norm, expert_mlp, post_norm_rows,
)

_TRANSPOSED = ("gate_up_concat_t", "gate_up_interleaved_t")

# Largest expected rows per expert (T * k / E) for which the fused kernel is used; past it,
# grouped_mm (MKL / oneDNN GEMM). Measured on AVX2 (Zen 3), one thread, OLMoE shape
# (benchmarks/experts_cpu.py --crossover, and BENCHMARKS.md): fp32 fused/grouped_mm speed-up
# 1.8x at 8 rows, 1.4x at 16, 1.2x at 32; bf16 3.1-3.4x from 4 to 32 rows (and 3.5x at 64 with
# two threads), because oneDNN has no fast bf16 GEMM without AVX512-BF16/AMX. Where it has one
# (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), 16-bit weights get the fp32 limit.
FUSED_MAX_ROWS_FP32 = 16.0
FUSED_MAX_ROWS_16BIT_EMULATED = 64.0


@functools.cache
def fused_max_rows(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return FUSED_MAX_ROWS_FP32
    native = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    if native is None:
        return 0.0
    try:
        has_native_gemm = bool(getattr(torch.ops.mkldnn, native)())
    except (AttributeError, RuntimeError):
        has_native_gemm = False
    return FUSED_MAX_ROWS_FP32 if has_native_gemm else FUSED_MAX_ROWS_16BIT_EMULATED


# Below this many multiply-adds per call the kernel runs on one thread: waking the others
# costs more than it saves (the shipped model's layer at batch 1 is 0.2 M).
SINGLE_THREAD_MACS = 2_000_000


def expert_sizes(layout: str, w_gate_up: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor | None) -> tuple[int, int]:
    """(hidden size H, intermediate size I) of the experts, with the weights' shapes checked."""
    if any(w is not None and w.dim() != 3 for w in (w_gate_up, w_up, w_down)):
        raise ValueError(f"expert weights must be 3-D [E, ., .], got {[tuple(w.shape) for w in (w_gate_up, w_up, w_down) if w is not None]}")
    num_experts = w_gate_up.shape[0]
    if layout in _TRANSPOSED:
        hidden_size, width = w_gate_up.shape[1], w_gate_up.shape[2]
    else:
        width, hidden_size = w_gate_up.shape[1], w_gate_up.shape[2]
    split = layout == "gate_up_split"
    halves = not split and layout != "up_only"  # gate and up share w_gate_up
    if halves and width % 2:
        raise ValueError(f"layout {layout!r} needs an even gate_up width, got {tuple(w_gate_up.shape)}")
    inter_size = width // 2 if halves else width
    if split and w_up.shape != w_gate_up.shape:
        raise ValueError(f"w_up must have w_gate_up's shape {tuple(w_gate_up.shape)}, got {tuple(w_up.shape)}")
    down_shape = (num_experts, inter_size, hidden_size) if layout in _TRANSPOSED else (num_experts, hidden_size, inter_size)
    if tuple(w_down.shape) != down_shape:
        raise ValueError(f"layout {layout!r}: w_down must be {down_shape}, got {tuple(w_down.shape)}")
    return hidden_size, inter_size


def choose_path(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype, unsupported: str | None = None) -> str:
    """``"fused"`` or ``"grouped_mm"`` for a call with these shapes (``unsupported``: why the
    fused kernel cannot take the tensors, see ``experts_cpu_fused.weight_geometry``)."""
    if unsupported is not None or experts_cpu_fused.kernel() is None:
        return "grouped_mm"
    return "fused" if num_tokens * top_k <= fused_max_rows(dtype) * num_experts else "grouped_mm"


def grouped_experts_cpu(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    activation, layout, activation_args, post_norm_weight=None, post_norm="none", post_norm_args=None,
    path: str | None = None,
) -> torch.Tensor:
    """The op's CPU kernel. ``path`` forces ``"fused"`` or ``"grouped_mm"`` (tests, benchmarks)."""
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    hidden_size, inter_size = expert_sizes(layout, w_gate_up, w_down, w_up)
    check_call_shapes(hidden, topk_ids, topk_weights, w_gate_up, b_gate_up, b_down, hidden_size, inter_size)
    check_expert_ids(topk_ids, w_gate_up.shape[0])
    norm = check_post_norm(post_norm, post_norm_weight, post_norm_args, hidden_size)
    num_tokens, top_k = topk_ids.shape
    geometry = experts_cpu_fused.weight_geometry(w_gate_up, w_down, w_up, b_gate_up, b_down, layout, inter_size)
    if isinstance(geometry, tuple) and hidden.dtype not in experts_cpu_fused.DTYPE_CODES:
        geometry = f"hidden dtype {hidden.dtype}"
    unsupported = geometry if isinstance(geometry, str) else None
    if path is None:
        path = choose_path(num_tokens, top_k, w_gate_up.shape[0], w_gate_up.dtype, unsupported)
    elif path == "fused" and (unsupported or experts_cpu_fused.kernel() is None):
        raise ValueError(f"the fused CPU experts kernel cannot run here: {unsupported or experts_cpu_fused.build_error}")
    if path == "fused":
        macs = num_tokens * top_k * 3 * hidden_size * inter_size
        threads = 1 if macs < SINGLE_THREAD_MACS else torch.get_num_threads()
        return experts_cpu_fused.fused_experts(
            experts_cpu_fused.kernel(), hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
            geometry, activation, activation_args, inter_size, threads, norm)
    if path != "grouped_mm":
        raise ValueError(f"unknown CPU experts path {path!r}; valid: fused, grouped_mm")
    return grouped_mm_experts(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
                              activation, layout, activation_args, norm)


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(
        t.data_ptr() % 16 == 0
        and all((stride * t.element_size()) % 16 == 0 for stride, size in zip(t.stride(), t.shape) if stride != 1 and size > 1)
        for t in tensors
    )


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``rows[offsets[e-1]:offsets[e]] @ weights[e]`` for every expert ``e`` (``weights [E, in, out]``)."""
    if _aligned(rows, weights):
        return torch._grouped_mm(rows, weights, offs=offsets)
    out = rows.new_empty((rows.shape[0], weights.shape[2]))
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(rows[start:end], weights[expert], out=out[start:end])
        start = end
    return out


def grouped_mm_experts(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    activation, layout, activation_args, norm=("none", None, []),
) -> torch.Tensor:
    """Rows grouped by expert, one grouped GEMM per projection, in the weights' dtype; ``norm``: the
    post-expert norm's (name, fp32 scale 1 + w, post_norm_args)."""
    num_experts = w_gate_up.shape[0]
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert, sentinels last
    sorted_ids = flat_ids[order]
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = hidden[order // top_k].to(w_gate_up.dtype)

    def project(rows, weights, transposed):
        return grouped_mm(rows, weights if transposed else weights.transpose(-2, -1), offsets)

    def per_row(bias):
        return None if bias is None else bias[sorted_ids.clamp(max=num_experts - 1)]

    rows = expert_mlp(x, w_gate_up, w_down, w_up, per_row(b_gate_up), per_row(b_down), activation, layout,
                      activation_args, project=project).float()
    post_norm, scale, post_norm_args = norm
    rows = post_norm_rows(rows, post_norm, scale, post_norm_args, hidden.dtype)
    rows *= topk_weights.reshape(-1)[order, None]
    rows.masked_fill_((sorted_ids == num_experts)[:, None], 0.0)  # sentinel rows: never computed
    out = torch.empty_like(rows)
    out[order] = rows  # back to (token, slot) order
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

"""CPU grouped experts: rows grouped by expert, one grouped GEMM per projection.

Decode is memory-bound: the cost is the bytes of expert weights read. Tokens are sorted by
expert and each projection is one ``torch._grouped_mm`` over the groups, which reads only the
experts that received tokens, each once, in the model's dtype (fp32 accumulation). Where the
tensors are not aligned as ``_grouped_mm`` needs (strides in multiples of 16 bytes), a loop of
``torch.mm`` over the non-empty groups does the same. The k weighted outputs of a token are
summed in fp32 and in slot order, like transformers' ``grouped_mm`` path. Slots whose id is
``E`` (the sentinel of expert parallelism: an expert on another rank) sort last, fall past the
last group and add nothing.
"""

from __future__ import annotations

import torch

from .experts_ref import check_expert_ids, check_experts_args, expert_mlp


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


def grouped_experts_cpu(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    activation, layout, activation_args,
) -> torch.Tensor:
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    num_experts = w_gate_up.shape[0]
    check_expert_ids(topk_ids, num_experts)
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
    rows *= topk_weights.reshape(-1)[order, None]
    rows.masked_fill_((sorted_ids == num_experts)[:, None], 0.0)  # sentinel rows: never computed
    out = torch.empty_like(rows)
    out[order] = rows  # back to (token, slot) order
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

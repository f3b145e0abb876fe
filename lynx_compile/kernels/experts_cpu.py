"""CPU grouped experts: one GEMM pair per expert that received tokens.

Decode is memory-bound: the cost is the bytes of expert weights read. This path reads only
the experts that appear in ``topk_ids``, each once, in the model's dtype (matmuls accumulate
in fp32), and combines the k weighted outputs per token in fp32 and in slot order, like
transformers' ``grouped_mm`` path. Reading the expert counts on the host is free on CPU.
"""

from __future__ import annotations

import torch

from .experts_ref import check_experts_args, expert_mlp


def grouped_experts_cpu(
    hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    activation, layout, activation_args,
) -> torch.Tensor:
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w_gate_up.shape[0]).tolist()
    x = hidden[order // top_k].to(w_gate_up.dtype)
    rows = torch.empty((order.numel(), hidden.shape[1]), dtype=torch.float32)

    def pick(w, e):
        return None if w is None else w[e]

    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        rows[start:end] = expert_mlp(
            x[start:end], w_gate_up[e], w_down[e], pick(w_up, e), pick(b_gate_up, e),
            pick(b_down, e), activation, layout, activation_args,
        )
        start = end
    rows *= topk_weights.reshape(-1)[order, None]
    out = torch.empty_like(rows)
    out[order] = rows  # back to (token, slot) order
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

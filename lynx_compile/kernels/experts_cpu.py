"""CPU grouped experts: one GEMM pair per expert that received tokens.

Decode is memory-bound: the cost is the bytes of expert weights read. This path reads only
the experts that appear in ``topk_ids``, each once, in the model's dtype (``F.linear``
accumulates in fp32), and combines the k weighted outputs per token in fp32, in slot order,
like transformers' ``grouped_mm`` path. Reading the expert counts on the host is free on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import capture
from .experts_ref import ACTIVATIONS, split_gate_up


def grouped_experts_cpu(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str,
    layout: str,
) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    x = hidden[order // top_k].to(gate_up.dtype)
    rows = torch.empty((order.numel(), down.shape[1]), dtype=torch.float32)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate, up = split_gate_up(F.linear(x[start:end], gate_up[expert]), layout)
        rows[start:end] = F.linear(act(gate) * up, down[expert])
        start = end
    rows *= topk_weights.reshape(-1)[order, None]
    out = torch.empty_like(rows)
    out[order] = rows  # back to (token, slot) order
    capture.record_dispatch(topk_ids)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)

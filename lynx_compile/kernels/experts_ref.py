"""Reference gated-MLP experts: the plain, obviously-correct definition in fp32.

Every experts kernel (CPU, Triton) is tested against this. It gathers one weight matrix per
(token, slot), so it reads T*k matrices: fine for tests, never for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# How expert weights are stored. gate_up_concat: transformers' fused layout,
# gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I] (nn.Linear layout).
LAYOUTS = ("gate_up_concat",)


def split_gate_up(gate_up_out: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "gate_up_concat":
        return gate_up_out.chunk(2, dim=-1)
    raise ValueError(f"unknown experts layout {layout!r}; valid: {list(LAYOUTS)}")


def grouped_experts_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str,
    layout: str,
) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    x = hidden.float()
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for slot in range(topk_ids.shape[1]):
        expert = topk_ids[:, slot]
        gate_up_out = torch.bmm(gate_up[expert].float(), x.unsqueeze(-1)).squeeze(-1)
        gate, up = split_gate_up(gate_up_out, layout)
        y = torch.bmm(down[expert].float(), (act(gate) * up).unsqueeze(-1)).squeeze(-1)
        out += topk_weights[:, slot, None].float() * y
    return out.to(hidden.dtype)

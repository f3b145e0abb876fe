"""The one call from the plugin into lynx's selector (``lynx_compile.select_experts``)."""

from __future__ import annotations

import torch

from ...selector import select_experts


def route(router_logits: torch.Tensor, top_k: int, *, policy: str, knobs: dict, live: torch.Tensor | None,
          decode: bool | torch.Tensor, score_bias: torch.Tensor | None, **rule) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` over the rows of one MoE layer call: (weights fp32, ids int64), [T, k]."""
    return select_experts(router_logits, top_k, policy=policy, live=live, decode=decode, score_bias=score_bias,
                          **knobs, **rule)

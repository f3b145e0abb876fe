"""OEA (arXiv 2511.02237), its simplified form: each voter keeps its top ``k0`` experts; the batch
keeps their union and nothing else. Each token then fills its remaining ``k - k0`` slots with the
best experts of that set in its own router order, never adding one, so a token may end with
fewer than ``k`` experts (``rules.finish`` repeats one at weight 0)."""

from __future__ import annotations

import torch

from .rules import order_key, topk_by_key


def kept_experts(rank: torch.Tensor, voters: torch.Tensor, k0: int) -> torch.Tensor:
    """[E] bool: the union of the voters' top ``k0`` (all experts when nobody votes)."""
    num_tokens, num_experts = rank.shape
    choices = topk_by_key(order_key(rank), k0)
    hits = torch.zeros(num_experts, dtype=torch.int64, device=rank.device)
    hits = hits.index_add(0, choices.reshape(-1), voters[:, None].expand(num_tokens, k0).reshape(-1).to(torch.int64))
    return (hits > 0) | ~voters.any()

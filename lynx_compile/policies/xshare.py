"""XShare (arXiv 2602.07265): a batch-wide expert budget. The set starts with every voter's top-1
expert and is filled, in order of utility (an expert's gate probability summed over the voters;
ties to the lower index), up to ``budget`` experts; every token then takes its top-k inside the
set. When the voters' top-1 experts alone exceed the budget, the set is just those."""

from __future__ import annotations

import torch

from .rules import order_key, topk_by_key


def kept_experts(rank: torch.Tensor, gates: torch.Tensor, voters: torch.Tensor, budget: int) -> torch.Tensor:
    """[E] bool. ``gates`` [T, E]: each token's gate probabilities (softmax over all experts, or
    the sigmoid scores of a sigmoid router), 0 outside its allowed groups."""
    num_tokens, num_experts = rank.shape
    top1 = topk_by_key(order_key(rank), 1).reshape(-1)
    hits = torch.zeros(num_experts, dtype=torch.int64, device=rank.device).index_add(0, top1, voters.to(torch.int64))
    in_set = hits > 0
    utility = torch.where(voters[:, None], gates, 0.0).sum(dim=0)
    # the experts outside the set, best utility first: their place in that order
    key = torch.where(in_set, torch.iinfo(torch.int64).min, order_key(utility[None, :])[0])
    order = topk_by_key(key[None, :], num_experts)[0]
    place = torch.empty_like(order).scatter(0, order, torch.arange(num_experts, device=rank.device))
    room = (budget - in_set.sum()).clamp(min=0)
    return in_set | (~in_set & (place < room)) | ~voters.any()

"""The expert-parallel cap (beyond the paper): keep the busiest rank's experts in use low.

Under expert parallelism rank r of R owns experts ``[r E/R, (r+1) E/R)`` and a decode step's
MoE layer waits for the rank with the most experts in use. A policy's kept set K holds popular
experts, not spread ones, so it can pile up on one rank. The cap allows each rank at most
``c = ceil(|K| / R)`` kept experts: on a rank above c, kept experts that are no voter's top-1
are dropped, the least demanded first (demand: how many voters have the expert in their plain
top-k; on equal demand the higher index goes first), until the rank holds c or only top-1
experts. Tokens then take their best experts inside the capped set, and a token left with fewer
than k usable experts takes its best others back (``rules.finish(refill=True)``): every token
keeps k experts. All on the device, like the policies; ``benchmarks/ep_simulation.py`` measures it.
"""

from __future__ import annotations

import torch

from .rules import order_key, topk_by_key


def check_ep_ranks(ep_ranks, num_experts: int) -> None:
    if ep_ranks is None:
        return
    if isinstance(ep_ranks, bool) or not isinstance(ep_ranks, int) or ep_ranks < 1 or num_experts % ep_ranks:
        raise ValueError(f"ep_ranks must be None or an int >= 1 that divides the router's E={num_experts} "
                         f"(ranks own equal, contiguous expert ranges), got {ep_ranks!r}")


def cap_per_rank(kept: torch.Tensor, rank: torch.Tensor, voters: torch.Tensor, top_k: int,
                 ep_ranks: int) -> torch.Tensor:
    """``kept`` [E] bool with at most ceil(|kept| / ep_ranks) experts per rank, voters' top-1s aside."""
    num_experts = kept.shape[0]
    per_rank = num_experts // ep_ranks
    plain = topk_by_key(order_key(rank), top_k)  # [T, k], best first (inside allowed groups)
    weight = voters[:, None].expand_as(plain).to(torch.int64)
    demand = torch.zeros(num_experts, dtype=torch.int64, device=kept.device).index_add(0, plain.reshape(-1),
                                                                                     weight.reshape(-1))
    top1 = torch.zeros(num_experts, dtype=torch.int64, device=kept.device).index_add(0, plain[:, 0], weight[:, 0])
    droppable = (kept & (top1 == 0)).view(ep_ranks, per_rank)
    index = torch.arange(num_experts, device=kept.device)
    key = torch.where(droppable, demand.view(ep_ranks, per_rank) * num_experts + (num_experts - 1 - index).view(
        ep_ranks, per_rank), -1)
    higher = (key[:, None, :] > key[:, :, None]).sum(dim=-1)  # [R, P]: droppable experts ranked above
    cap = (kept.sum() + ep_ranks - 1) // ep_ranks
    excess = (kept.view(ep_ranks, per_rank).sum(dim=-1) - cap).clamp(min=0)
    keep_count = droppable.sum(dim=-1) - excess  # droppable experts each rank keeps (may be <= 0)
    drop = droppable & (higher >= keep_count[:, None])
    return kept & ~drop.reshape(num_experts)

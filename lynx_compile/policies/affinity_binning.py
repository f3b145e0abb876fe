"""Lynx's AffinityBinning (ALGORITHM.md steps 1-5): the experts a decode batch keeps.

Every voter (a live token of a decode step) bins its experts by their gap to its best,
``q = ceil(alpha * (a - max a))`` clamped to ``[-D, 0]``; the batch scores each expert by
``S[e] = sum over voters of B ** q``; each voter ranks its experts by ``M = q + (S - h) / B``
(own bin first, then the others' votes; ``h = B ** q`` is its own vote), then by its own score,
then by index, and keeps its best ``k``. The batch keeps the union.

The fast form. ``M`` is compared in exact integers, because experts that tie mathematically
must tie exactly, whatever the summation order. Scaled by ``B ** D``, every vote is the integer
``B ** (q + D)`` and ``S`` an exact int64 (``D`` fits by ``vote_depth``). Inside one token's row
the own vote only differs between experts of different bins, where the bin already decides
(``S - h < B ** (D + 1)``), so ``S`` itself orders experts of one bin exactly as ``S - h`` does,
and only ``S``'s order matters, not its value: ``rank_of(S)`` (0..E-1) replaces it. The whole
ranking (bin, rank of ``S``, score order, index) then packs into one int64 and one ``topk`` per
token finds its ``k`` experts. ``B`` and ``D`` are device scalars (the voters are counted on the
device), so nothing reaches the host and padded rows change nothing: the choice of the voters is
exactly what it would be if the other rows were not there.

``reference_choice`` is the plain form (two stable sorts, the int64 key of ``M``), kept as the
oracle the tests hold the fast form to.
"""

from __future__ import annotations

import functools

import torch

from ..kernels import select_cpu
from .rules import index_bits, order_key

_INT64_BUDGET = 2**62
_WHERE_CHAIN_DEPTH = 8  # up to this deepest bin, B ** q is a chain of selects; past it a table


def vote_depth(num_tokens: int, beta: int | None) -> int:
    """Deepest bin D (bins are 0..-D) whose exact int64 score fits; ``beta`` caps it."""
    depth = 0
    while depth < 62 and (depth + 2) * num_tokens ** (depth + 2) < _INT64_BUDGET:
        depth += 1
    return depth if beta is None else min(beta, depth)


@functools.lru_cache(maxsize=None)
def _depth_limits(beta: int | None) -> tuple[int, ...]:
    """``limits[d]``: the largest voter count B for which bin -(d + 1) still fits, i.e.
    ``vote_depth(B, beta) = #{d : B <= limits[d]}`` for every B >= 2."""
    limits = []
    for depth in range(vote_depth(2, beta)):
        lo, hi = 1, 2**32
        while lo < hi:  # largest B with (depth + 2) * B ** (depth + 2) < 2**62
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if (depth + 2) * mid ** (depth + 2) < _INT64_BUDGET else (lo, mid - 1)
        limits.append(lo)
    return tuple(limits)


def depth_note(beta: int | None) -> str:
    """How the exact-integer budget caps the deepest bin at large batches, in words."""
    limits = _depth_limits(beta)
    if beta is None:
        return f"no clamp: deepest bin {vote_depth(16, None)} at 16 voters, {vote_depth(64, None)} at 64"
    if limits[-1] >= 1 << 16:  # beyond any decode batch
        return ""
    return f"beta acts as {beta - 1} above {limits[-1]} voters"


def _powers(base: torch.Tensor, exponent: torch.Tensor, max_exponent: int) -> torch.Tensor:
    """``base ** exponent`` in int64 for ``0 <= exponent <= max_exponent`` (exact)."""
    if max_exponent <= _WHERE_CHAIN_DEPTH:
        power = torch.ones_like(exponent)
        for i in range(1, max_exponent + 1):
            power = torch.where(exponent >= i, power * base, power)
        return power
    table = torch.cumprod(base.reshape(1).expand(max_exponent + 1), 0)  # base ** 1 .. ** (max + 1)
    table = torch.cat([torch.ones_like(table[:1]), table[:-1]])
    return table[exponent]


def rank_of(values: torch.Tensor) -> torch.Tensor:
    """[E] int64: how many entries are smaller (equal values get equal ranks)."""
    return (values[None, :] < values[:, None]).sum(dim=-1)


def kept_experts(rank: torch.Tensor, affinity: torch.Tensor, voters: torch.Tensor, top_k: int,
                 alpha: float, beta: int | None) -> torch.Tensor:
    """[E] bool: the union of the voters' choices (all experts when nobody votes).

    ``rank``/``affinity`` [T, E] as ``rules.router_scores`` returns them; ``voters`` [T] bool
    (healthy rows only: a voter's row must be finite where it is not -inf). On CPU one C++
    op (``kernels/select_cpu.cpp``) computes the same; elsewhere ``kept_experts_torch``.
    """
    if select_cpu.use_for(rank):
        return torch.ops.lynx.affinity_kept(rank, affinity, voters, top_k, alpha, list(_depth_limits(beta)))
    return kept_experts_torch(rank, affinity, voters, top_k, alpha, beta)


def kept_and_choice(rank: torch.Tensor, affinity: torch.Tensor, voters: torch.Tensor, confined: torch.Tensor,
                    healthy: torch.Tensor, top_k: int, with_plain: bool, *, alpha: float, beta: int | None):
    """``kept_experts`` and then ``rules.finish``'s choice in it, as one C++ op on CPU:
    ``(ids, valid, plain ids or [T, 0])``; None elsewhere (the caller runs the two steps)."""
    if not select_cpu.use_for(rank):
        return None
    return torch.ops.lynx.affinity_choose(rank, affinity, voters, confined, healthy, top_k, alpha,
                                          list(_depth_limits(beta)), with_plain)


def kept_experts_torch(rank: torch.Tensor, affinity: torch.Tensor, voters: torch.Tensor, top_k: int,
                       alpha: float, beta: int | None) -> torch.Tensor:
    """``kept_experts`` in static-shaped torch (traced and fused on any device)."""
    num_tokens, num_experts = rank.shape
    if not packed_key_fits(num_experts, beta):
        raise ValueError(f"lynx's selector packs (bin, votes, score, index) into one int64 key, which cannot "
                         f"hold E={num_experts} experts with beta={beta}; off the CPU it supports up to "
                         f"{_max_packed_experts(beta)} experts")
    limits = _depth_limits(beta)
    voter_count = voters.sum()
    depth = (voter_count <= torch.tensor(limits, device=rank.device)).sum() if limits else voter_count * 0
    gap = torch.where(voters[:, None], affinity - affinity.amax(dim=-1, keepdim=True), 0.0)
    shifted = (torch.maximum(torch.ceil(gap * alpha), -depth.to(gap.dtype)) + depth).to(torch.int64)
    allowed = rank > float("-inf")
    votes = torch.where(voters[:, None] & allowed, _powers(voter_count, shifted, len(limits)), 0)
    index = index_bits(num_experts)
    bins_and_votes = (shifted << index) | rank_of(votes.sum(dim=0))
    key = (bins_and_votes << (32 + index)) + order_key(rank)
    key = torch.where(allowed, key, torch.iinfo(torch.int64).min + torch.arange(num_experts, device=rank.device))
    choices = torch.topk(key, top_k, dim=-1).indices
    hits = torch.zeros(num_experts, dtype=torch.int64, device=rank.device)
    hits = hits.index_add(0, choices.reshape(-1), voters[:, None].expand(num_tokens, top_k).reshape(-1).to(torch.int64))
    return (hits > 0) | (voter_count == 0)


def packed_key_fits(num_experts: int, beta: int | None) -> bool:
    """Whether (bin, rank of S, score order, index) fits the int64 key of ``kept_experts``."""
    depth_bits = max(1, vote_depth(2, beta).bit_length())
    return depth_bits + 2 * index_bits(num_experts) + 32 <= 62


def _max_packed_experts(beta: int | None) -> int:
    return max(e for e in (2**b for b in range(1, 16)) if packed_key_fits(e, beta))


# --- the oracle -------------------------------------------------------------------------

def reference_choice(rank: torch.Tensor, affinity: torch.Tensor, top_k: int, alpha: float,
                     beta: int | None) -> torch.Tensor:
    """Steps 1-6 with every row a voter: each token's final ``top_k`` expert ids (int64 [T, k])."""
    num_tokens, num_experts = rank.shape
    depth = vote_depth(num_tokens, beta)
    allowed = rank > float("-inf")
    gap = affinity - affinity.amax(dim=-1, keepdim=True)
    bins = torch.ceil(gap * alpha).clamp(min=-depth).to(torch.int64)
    powers = num_tokens ** torch.arange(depth + 1, device=rank.device, dtype=torch.int64)
    shifted = bins + depth  # 0 .. depth
    votes = torch.where(allowed, powers[shifted], 0)
    others = votes.sum(dim=0, keepdim=True) - votes
    key = torch.where(allowed, shifted * num_tokens ** (depth + 1) + others, -1)
    by_score = torch.sort(rank, dim=-1, descending=True, stable=True).indices
    order = torch.sort(key.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    choices = by_score.gather(-1, order)[:, :top_k]
    kept = torch.zeros(num_experts, dtype=torch.bool, device=rank.device)
    kept[choices.reshape(-1)] = True
    survivors = rank.masked_fill(~kept, float("-inf"))
    return torch.sort(survivors, dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()

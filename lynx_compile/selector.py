"""The batch-aware expert selector (Lynx / AffinityBinning), pure torch.

This is the reference implementation of ../shared/design/ALGORITHM.md, steps 1-7. Every
other implementation (the custom op, the Triton kernel) must choose exactly the experts this
one chooses. All steps are static-shaped and free of host synchronisation.

Exactness. Step 4 ranks experts by ``M = q + (S - h) / B`` with ``h = B ** q``. Computed in
floating point, two experts that tie mathematically can differ in the last bit depending on
the order tokens are summed, so ties would be broken by rounding noise instead of by the
token's own logit. We therefore compute ``M`` scaled by ``B ** (D + 1)`` in int64, where
``D`` is the deepest bin: every vote ``B ** (q + D)`` is an integer and the sums are exact and
order-independent. ``D`` is ``beta`` when it fits in int64 (``(D + 1) * B ** (D + 1) < 2**62``;
beta <= 4 fits up to B = 1024). Past that, and when ``beta`` is None, ``D`` is the deepest bin
that fits (13 at B = 16, 8 at B = 64): experts more than ``D / alpha`` logits below a token's
best then share the last bin. That only matters when a token has fewer than ``k`` experts
within ``D / alpha`` logits of its best.
"""

from __future__ import annotations

import torch

_INT64_BUDGET = 2**62


def vote_depth(num_tokens: int, beta: int | None) -> int:
    """Deepest bin D (bins are 0..-D) whose exact int64 score fits; ``beta`` caps it."""
    depth = 0
    while depth < 62 and (depth + 2) * num_tokens ** (depth + 2) < _INT64_BUDGET:
        depth += 1
    return depth if beta is None else min(beta, depth)


def affinity_bins(logits: torch.Tensor, alpha: float, depth: int) -> torch.Tensor:
    """Steps 1-2: ``q = ceil(alpha * (L - max L))`` clamped to ``[-depth, 0]``, as int64."""
    gap = logits - logits.amax(dim=-1, keepdim=True)
    return torch.ceil(gap * alpha).clamp(min=-depth).to(torch.int64)


def batch_ranking_key(bins: torch.Tensor, depth: int) -> torch.Tensor:
    """Steps 3-4: ``M * B ** (D + 1)`` in exact int64, ``M = q + (S - h) / B``.

    ``h = B ** q`` scaled by ``B ** D`` is ``B ** (q + D)``, an integer. ``S - h`` is what the
    *other* tokens vote for an expert; it is below ``B ** (D + 1)``, so it only orders experts
    inside one bin.
    """
    num_tokens = bins.shape[0]
    powers = num_tokens ** torch.arange(depth + 1, device=bins.device, dtype=torch.int64)
    shifted = bins + depth  # 0 .. depth
    votes = powers[shifted]
    others = votes.sum(dim=0, keepdim=True) - votes
    return shifted * num_tokens ** (depth + 1) + others


def rank_descending(key: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Expert indices per row ordered by ``key`` desc, then ``tiebreak`` desc, then index asc."""
    by_tiebreak = torch.sort(tiebreak, dim=-1, descending=True, stable=True).indices
    order = torch.sort(key.gather(-1, by_tiebreak), dim=-1, descending=True, stable=True).indices
    return by_tiebreak.gather(-1, order)


def batch_aware_topk(
    logits: torch.Tensor, top_k: int, alpha: float, beta: int | None
) -> torch.Tensor:
    """Steps 1-6 on fp32 logits ``[T, E]``: each token's final ``top_k`` expert ids (int64)."""
    num_tokens, num_experts = logits.shape
    depth = vote_depth(num_tokens, beta)
    bins = affinity_bins(logits, alpha, depth)
    key = batch_ranking_key(bins, depth)
    choices = rank_descending(key, logits)[:, :top_k]  # step 5: C_t
    kept = torch.zeros(num_experts, dtype=torch.bool, device=logits.device)
    kept[choices.reshape(-1)] = True  # the union of all choices
    survivors = logits.masked_fill(~kept, float("-inf"))  # step 6
    return topk_ids(survivors, top_k)


def topk_ids(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Deterministic top-k: ties go to the lower expert index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()


def softmax_topk_weights(
    logits: torch.Tensor, ids: torch.Tensor, top_k: int, renormalize: bool
) -> torch.Tensor:
    """Step 7 for softmax routers: weights of the chosen ``ids`` from the original scores.

    renormalize: the chosen probabilities sum to 1 (Mixtral, Qwen3-MoE).
    otherwise:   they carry the total probability mass the token's plain top-k had
                 (Qwen2-MoE, OLMoE); with the plain choice this is the plain weight.
    """
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.gather(-1, ids)
    if renormalize:
        return chosen / chosen.sum(dim=-1, keepdim=True)
    plain_mass = torch.topk(probs, top_k, dim=-1).values.sum(dim=-1, keepdim=True)
    return chosen * (plain_mass / chosen.sum(dim=-1, keepdim=True))


def check_selector_args(
    router_logits: torch.Tensor, top_k: int, alpha: float, beta: int | None
) -> None:
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be a 2-D tensor [tokens, experts], got "
            f"{getattr(router_logits, 'shape', type(router_logits).__name__)}"
        )
    if not router_logits.dtype.is_floating_point:
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, int) or beta < 1):
        raise ValueError(f"beta must be None (no clamp) or an int >= 1, got {beta!r}")


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    alpha: float,
    beta: int | None = None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-aware top-k for a softmax router over one decode step.

    Args:
        router_logits: ``[T, E]`` router logits of the ``T`` tokens in the step (any float
            dtype; computed in fp32).
        top_k: experts per token.
        alpha: bin width is ``1 / alpha`` logits.
        beta: clamp bins below ``-beta``; None for no clamp.
        renormalize: the router's weight rule (softmax -> top-k -> renormalise, or not).

    Returns:
        ``(topk_weights, topk_ids)``: fp32 and int64, both ``[T, top_k]``; each token gets
        ``top_k`` distinct experts, its best logits among the batch's kept set.
    """
    check_selector_args(router_logits, top_k, alpha, beta)
    logits = router_logits.float()
    ids = batch_aware_topk(logits, top_k, float(alpha), beta)
    return softmax_topk_weights(logits, ids, top_k, renormalize), ids

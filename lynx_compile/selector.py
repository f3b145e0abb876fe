"""The batch-aware expert selector (Lynx / AffinityBinning), pure torch.

This is the reference implementation of ../shared/design/ALGORITHM.md, steps 1-7. Every
other implementation (the custom op, the Triton kernel) must choose exactly the experts this
one chooses. All steps are static-shaped and free of host synchronisation.

Router rules. A ``RouterRule`` says how a router turns logits into (weights, ids): softmax or
sigmoid scores, renormalised or not, softmax over the chosen k (GPT-OSS), a selection-only
score bias and group-limited top-k (DeepSeek), a scaling factor. Bins always come from the
scores the router ranks by, on a logit scale (softmax: the logits; sigmoid: the logits, or
``logit(sigmoid(L) + bias)`` with a bias); the final weights are the router's own formula on
the chosen experts (ALGORITHM.md step 7).

Exactness. Step 4 ranks experts by ``M = q + (S - h) / B`` with ``h = B ** q``. Computed in
floating point, two experts that tie mathematically can differ in the last bit depending on
the order tokens are summed, so ties would be broken by rounding noise instead of by the
token's own score. We therefore compute ``M`` scaled by ``B ** (D + 1)`` in int64, where
``D`` is the deepest bin: every vote ``B ** (q + D)`` is an integer and the sums are exact and
order-independent. ``D`` is ``beta`` when it fits in int64 (``(D + 1) * B ** (D + 1) < 2**62``;
beta <= 4 fits up to B = 1024). Past that, and when ``beta`` is None, ``D`` is the deepest bin
that fits (13 at B = 16, 8 at B = 64): experts more than ``D / alpha`` logits below a token's
best then share the last bin. That only matters when a token has fewer than ``k`` experts
within ``D / alpha`` logits of its best.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INT64_BUDGET = 2**62
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class RouterRule:
    """How a router turns logits into (weights, ids). The default is Mixtral's."""

    scoring: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # chosen weights sum to 1
    softmax_after_topk: bool = False  # GPT-OSS: top-k of the logits, softmax over those k
    num_groups: int = 1  # group-limited top-k (DeepSeek): experts in num_groups groups...
    topk_groups: int = 1  # ...of which each token may use the topk_groups best
    group_score: str = "max"  # a group's score: its best expert (V2) or its best two summed (V3)
    scaling_factor: float = 1.0  # DeepSeek's routed_scaling_factor

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if self.softmax_after_topk and (self.scoring != "softmax" or self.num_groups != 1):
            raise ValueError("softmax_after_topk applies to ungrouped softmax routers only")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"need 1 <= topk_groups <= num_groups, got {self.topk_groups}, {self.num_groups}")

    @property
    def grouped(self) -> bool:
        return self.num_groups > 1


def vote_depth(num_tokens: int, beta: int | None) -> int:
    """Deepest bin D (bins are 0..-D) whose exact int64 score fits; ``beta`` caps it."""
    depth = 0
    while depth < 62 and (depth + 2) * num_tokens ** (depth + 2) < _INT64_BUDGET:
        depth += 1
    return depth if beta is None else min(beta, depth)


# --- the router's own scores ------------------------------------------------------------

def group_mask(group_source: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """[T, E] bool: the experts in each token's ``topk_groups`` best groups (DeepSeek)."""
    num_tokens, num_experts = group_source.shape
    grouped = group_source.view(num_tokens, rule.num_groups, num_experts // rule.num_groups)
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores, k=rule.topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    return mask.unsqueeze(-1).expand(-1, -1, num_experts // rule.num_groups).reshape(num_tokens, num_experts)


def router_scores(logits: torch.Tensor, rule: RouterRule, score_bias: torch.Tensor | None):
    """What the router ranks experts by, and the same on a logit scale for binning.

    Returns ``(rank, affinity)``, fp32 [T, E], both -inf outside a token's allowed groups.
    """
    if rule.scoring == "softmax":
        rank = affinity = logits
        if rule.grouped:  # DeepSeek-V2 groups by the best probability (same order as logits)
            allowed = group_mask(logits, rule)
            rank = affinity = logits.masked_fill(~allowed, float("-inf"))
        return rank, affinity
    scores = torch.sigmoid(logits)
    if score_bias is None:
        rank, affinity = scores, logits
    else:
        rank = scores + score_bias
        eps = torch.finfo(torch.float32).eps
        affinity = torch.logit(rank.clamp(eps, 1 - eps))
    if rule.grouped:
        allowed = group_mask(rank, rule)
        rank = rank.masked_fill(~allowed, float("-inf"))
        affinity = affinity.masked_fill(~allowed, float("-inf"))
    return rank, affinity


# --- the batch-aware choice -------------------------------------------------------------

def affinity_bins(affinity: torch.Tensor, alpha: float, depth: int) -> torch.Tensor:
    """Steps 1-2: ``q = ceil(alpha * (a - max a))`` clamped to ``[-depth, 0]``, as int64."""
    gap = affinity - affinity.amax(dim=-1, keepdim=True)
    return torch.ceil(gap * alpha).clamp(min=-depth).to(torch.int64)


def batch_ranking_key(bins: torch.Tensor, depth: int, allowed: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: ``M * B ** (D + 1)`` in exact int64, ``M = q + (S - h) / B``; -1 if not allowed.

    ``h = B ** q`` scaled by ``B ** D`` is ``B ** (q + D)``, an integer. ``S - h`` is what the
    *other* tokens vote for an expert; it is below ``B ** (D + 1)``, so it only orders experts
    inside one bin. Experts outside a token's allowed groups get no vote from it.
    """
    num_tokens = bins.shape[0]
    powers = num_tokens ** torch.arange(depth + 1, device=bins.device, dtype=torch.int64)
    shifted = bins + depth  # 0 .. depth
    votes = torch.where(allowed, powers[shifted], 0)
    others = votes.sum(dim=0, keepdim=True) - votes
    key = shifted * num_tokens ** (depth + 1) + others
    return torch.where(allowed, key, -1)


def rank_descending(key: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Expert indices per row ordered by ``key`` desc, then ``tiebreak`` desc, then index asc."""
    by_tiebreak = torch.sort(tiebreak, dim=-1, descending=True, stable=True).indices
    order = torch.sort(key.gather(-1, by_tiebreak), dim=-1, descending=True, stable=True).indices
    return by_tiebreak.gather(-1, order)


def topk_ids(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Deterministic top-k: ties go to the lower expert index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()


def batch_aware_choice(rank: torch.Tensor, affinity: torch.Tensor, top_k: int, alpha: float,
                       beta: int | None) -> torch.Tensor:
    """Steps 1-6: each token's final ``top_k`` expert ids (int64 [T, k])."""
    num_tokens, num_experts = rank.shape
    depth = vote_depth(num_tokens, beta)
    allowed = rank > float("-inf")
    key = batch_ranking_key(affinity_bins(affinity, alpha, depth), depth, allowed)
    choices = rank_descending(key, rank)[:, :top_k]  # step 5: C_t
    kept = torch.zeros(num_experts, dtype=torch.bool, device=rank.device)
    kept[choices.reshape(-1)] = True  # the union of all choices
    return topk_ids(rank.masked_fill(~kept, float("-inf")), top_k)  # step 6


def batch_aware_topk(logits: torch.Tensor, top_k: int, alpha: float, beta: int | None) -> torch.Tensor:
    """Steps 1-6 for an ungrouped softmax router: the ranking scores are the logits."""
    return batch_aware_choice(logits, logits, top_k, alpha, beta)


# --- weights (step 7) -------------------------------------------------------------------

def rule_weights(logits: torch.Tensor, ids: torch.Tensor, top_k: int, rule: RouterRule,
                 rank: torch.Tensor) -> torch.Tensor:
    """The router's own weights for the chosen ``ids``, from the original scores.

    softmax, renormalised: the chosen probabilities sum to 1 (Mixtral, Qwen3-MoE).
    softmax, not renormalised: they carry the probability mass the token's plain top-k had
      (Qwen2-MoE, OLMoE, DeepSeek-V2); with the plain choice this is the plain weight.
    softmax after top-k: softmax over the chosen logits (GPT-OSS).
    sigmoid: the chosen (unbiased) scores, renormalised or not (DeepSeek-V3, Llama-4).
    """
    if rule.softmax_after_topk:
        weights = torch.softmax(logits.gather(-1, ids), dim=-1)
    else:
        scores = torch.softmax(logits, dim=-1) if rule.scoring == "softmax" else torch.sigmoid(logits)
        weights = scores.gather(-1, ids)
        if rule.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        elif rule.scoring == "softmax":
            plain = scores.gather(-1, topk_ids(rank, top_k))
            weights = weights * (plain.sum(dim=-1, keepdim=True) / weights.sum(dim=-1, keepdim=True))
    return weights * rule.scaling_factor if rule.scaling_factor != 1.0 else weights


def softmax_topk_weights(logits: torch.Tensor, ids: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """Step 7 for an ungrouped softmax router (see ``rule_weights``)."""
    return rule_weights(logits, ids, top_k, RouterRule(renormalize=renormalize), logits)


def route_batch_aware(logits: torch.Tensor, top_k: int, alpha: float, beta: int | None,
                      rule: RouterRule, score_bias: torch.Tensor | None = None):
    """Steps 1-7 on fp32 logits under ``rule``: ``(weights fp32, ids int64)``, [T, k] each."""
    rank, affinity = router_scores(logits, rule, score_bias)
    ids = batch_aware_choice(rank, affinity, top_k, alpha, beta)
    return rule_weights(logits, ids, top_k, rule, rank), ids


def route_plain(logits: torch.Tensor, top_k: int, rule: RouterRule, score_bias: torch.Tensor | None = None):
    """Plain top-k routing under ``rule`` with the routers' own op sequence (prefill numerics)."""
    if rule.softmax_after_topk:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    if rule.scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
        choice = scores.masked_fill(~group_mask(scores, rule), 0.0) if rule.grouped else scores
        weights, ids = torch.topk(choice, top_k, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        choice = scores if score_bias is None else scores + score_bias
        if rule.grouped:
            choice = choice.masked_fill(~group_mask(choice, rule), float("-inf"))
        ids = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
    if rule.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * rule.scaling_factor if rule.scaling_factor != 1.0 else weights), ids


# --- public API -------------------------------------------------------------------------

def check_selector_args(router_logits, top_k, alpha, beta) -> None:
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


def check_rule(rule: RouterRule, num_experts: int, top_k: int, score_bias) -> None:
    if rule.grouped:
        if num_experts % rule.num_groups:
            raise ValueError(f"num_groups={rule.num_groups} does not divide {num_experts} experts")
        if top_k > rule.topk_groups * num_experts // rule.num_groups:
            raise ValueError(f"top_k={top_k} exceeds the experts of topk_groups={rule.topk_groups} groups")
    if score_bias is not None:
        if rule.scoring != "sigmoid":
            raise ValueError("score_bias (a selection-only bias) is supported for sigmoid routers")
        if tuple(score_bias.shape) != (num_experts,):
            raise ValueError(f"score_bias must have shape [{num_experts}], got {tuple(score_bias.shape)}")


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    alpha: float,
    beta: int | None = None,
    renormalize: bool = True,
    scoring: str = "softmax",
    softmax_after_topk: bool = False,
    score_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-aware top-k over the ``T`` tokens of one decode step.

    Args:
        router_logits: ``[T, E]`` router logits (any float dtype; computed in fp32).
        top_k: experts per token.
        alpha: bins are ``1 / alpha`` logits wide.
        beta: clamp bins below ``-beta``; None for no clamp.
        renormalize: the chosen weights sum to 1 (else: see ``rule_weights``).
        scoring, softmax_after_topk, score_bias, num_groups, topk_groups, group_score,
        scaling_factor: the router's rule (``RouterRule``); the defaults are a softmax router.
            GPT-OSS: ``softmax_after_topk=True``. DeepSeek-V3: ``scoring="sigmoid",
            score_bias=e_score_correction_bias, num_groups=n_group, topk_groups=topk_group,
            group_score="top2_sum", scaling_factor=routed_scaling_factor``.

    Returns:
        ``(topk_weights, topk_ids)``: fp32 and int64, both ``[T, top_k]``; each token gets
        ``top_k`` distinct experts, its best-ranked among the batch's kept set (and within its
        allowed groups).
    """
    check_selector_args(router_logits, top_k, alpha, beta)
    rule = RouterRule(scoring, renormalize, softmax_after_topk, num_groups, topk_groups, group_score,
                      float(scaling_factor))
    check_rule(rule, router_logits.shape[1], top_k, score_bias)
    bias = None if score_bias is None else score_bias.float()
    return route_batch_aware(router_logits.float(), top_k, float(alpha), beta, rule, bias)

"""Router rules shared by every selection policy: scores, group limits, exact orderings, weights.

A ``RouterRule`` says how a router turns logits into (weights, ids): softmax, sigmoid or
sqrt-softplus scores, renormalised or not, softmax over the chosen k (GPT-OSS), a selection-only
bias added to the scores (DeepSeek-V3, ERNIE-4.5) or to the logits (Kolibri), group-limited
top-k (DeepSeek), a scaling factor. A policy decides only *which experts the batch
keeps*; every token then takes its best experts inside that set (``finish``) and is weighed by
the router's own formula (``rule_weights``, ALGORITHM.md step 7).

Everything here is static-shaped torch with no host synchronisation, so it traces into a
compiled graph (Inductor fuses it; CUDA graphs capture it) and runs eagerly as well.

Exact orderings. Ties decide which experts a token gets, so they must not depend on rounding or
on a sort's internals: ``order_key`` packs a score's IEEE-754 order and the expert index into
one int64 (higher score first, then the lower index), so a single ``topk`` over it is a total,
reproducible order, identical to a stable descending sort of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import select_cpu

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")
_EPS = float(torch.finfo(torch.float32).eps)
_TINY = float(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class RouterRule:
    """How a router turns logits into (weights, ids). The default is Mixtral's."""

    scoring: str = "softmax"  # | "sigmoid" | "sqrtsoftplus" (DeepSeek-V4) | "sparsemixer" (Phi-3.5-MoE)
    renormalize: bool = True  # chosen weights sum to 1
    softmax_after_topk: bool = False  # GPT-OSS: top-k of the logits, softmax over those k
    num_groups: int = 1  # group-limited top-k (DeepSeek): experts in num_groups groups...
    topk_groups: int = 1  # ...of which each token may use the topk_groups best
    group_score: str = "max"  # a group's score: its best expert (V2) or its best two summed (V3)
    scaling_factor: float = 1.0  # DeepSeek's routed_scaling_factor
    bias_on_logits: bool = False  # the router ranks by the logits (+ its selection bias), not its scores (Kolibri, Llama-4)
    jitter_eps: float = 0.0  # sparsemixer (Phi-3.5-MoE): each weight is a softmax over a 2 * eps window

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        flags = (self.renormalize, self.softmax_after_topk, self.bias_on_logits)
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError(f"renormalize, softmax_after_topk and bias_on_logits must be bools, got "
                             f"{self.renormalize!r}, {self.softmax_after_topk!r}, {self.bias_on_logits!r}")
        if self.softmax_after_topk and (self.scoring != "softmax" or self.num_groups != 1):
            raise ValueError("softmax_after_topk applies to ungrouped softmax routers only")
        for name in ("num_groups", "topk_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"need 1 <= topk_groups <= num_groups, got {self.topk_groups}, {self.num_groups}")
        eps = self.jitter_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise ValueError(f"jitter_eps must be a finite number >= 0, got {eps!r}")
        if eps and self.scoring != "sparsemixer":
            raise ValueError("jitter_eps applies to scoring='sparsemixer' only")
        if self.scoring == "sparsemixer" and (self.grouped or self.softmax_after_topk):
            raise ValueError("scoring='sparsemixer' has no group limit and no softmax after top-k")
        scale = self.scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"scaling_factor must be a finite number > 0, got {scale!r}")

    @property
    def grouped(self) -> bool:
        return self.num_groups > 1


def check_rule(rule: RouterRule, num_experts: int, top_k: int, score_bias) -> None:
    """Errors a rule can only have against a router's size."""
    if rule.grouped:
        if num_experts % rule.num_groups:
            raise ValueError(f"num_groups={rule.num_groups} does not divide {num_experts} experts")
        per_group = num_experts // rule.num_groups
        if rule.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"group_score='top2_sum' needs at least 2 experts per group, got {per_group} "
                             f"({num_experts} experts in {rule.num_groups} groups)")
        if top_k > rule.topk_groups * per_group:
            raise ValueError(f"top_k={top_k} exceeds the experts of topk_groups={rule.topk_groups} groups")
    if rule.scoring == "sparsemixer" and top_k != 2:
        raise ValueError(f"scoring='sparsemixer' chooses top_k=2 experts, got top_k={top_k}")
    if score_bias is not None:
        if rule.softmax_after_topk or rule.scoring == "sparsemixer":
            raise ValueError("score_bias (a selection-only bias) is not supported with softmax_after_topk "
                             "or scoring='sparsemixer'")
        if tuple(score_bias.shape) != (num_experts,):
            raise ValueError(f"score_bias must have shape [{num_experts}], got {tuple(score_bias.shape)}")


# --- the router's own scores ------------------------------------------------------------

def group_mask(group_source: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """[T, E] bool: the experts in each token's ``topk_groups`` best groups (DeepSeek)."""
    num_tokens, num_experts = group_source.shape
    grouped = group_source.view(num_tokens, rule.num_groups, num_experts // rule.num_groups)
    if rule.group_score == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores, k=rule.topk_groups, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, best_groups, True)  # functional: traced
    return mask.unsqueeze(-1).expand(-1, -1, num_experts // rule.num_groups).reshape(num_tokens, num_experts)


def score_values(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router's scores of every expert: what its weights are made of (sparsemixer's are
    windowed softmaxes, ``sparsemixer_weights``; its dense gate is the softmax)."""
    if scoring in ("softmax", "sparsemixer"):
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    return torch.sqrt(torch.nn.functional.softplus(logits))


def _score_to_logit(scores: torch.Tensor, scoring: str) -> torch.Tensor:
    """The score function's inverse: the logit (for softmax: the log-probability) a score has.
    Scores at 0 or below (or at 1 and above for sigmoid) are clamped: they land in the deepest bin."""
    if scoring == "softmax":
        return torch.log(scores.clamp(min=_TINY))
    if scoring == "sigmoid":
        return torch.logit(scores.clamp(_EPS, 1 - _EPS))
    # s = sqrt(softplus(L)): L = softplus^-1(s^2) = y + log(1 - exp(-y)) with y = s^2 (no overflow)
    squared = (scores.clamp(min=0) ** 2).clamp(min=_TINY)
    return squared + torch.log(-torch.expm1(-squared))


def router_scores(logits: torch.Tensor, rule: RouterRule, score_bias: torch.Tensor | None):
    """What the router ranks experts by, and the same on a logit scale for binning.

    Returns ``(rank, affinity)``, fp32 [T, E], both -inf outside a token's allowed groups; per
    token both order the experts alike. Only an expert's gap to the token's best affinity
    matters (bins are ``1 / alpha`` of it), so any per-token constant may be added to it.

    Without a bias the affinity is the logits: a softmax (and sparsemixer, which picks its
    experts by the logits' maxima) ranks by them (the probabilities' order); sigmoid and
    sqrt-softplus are increasing functions of them.

    A bias on the logits (Kolibri: rank by ``L + b``) keeps the ranking on the logit scale:
    ``affinity = L + b``.

    A bias on the scores ranks by ``s = score(L) + b``. Any per-token constant added to ``s``
    leaves that ranking unchanged, and so must leave the bins unchanged. We use the shift that
    gives the token's best-ranked expert ``e*`` its own unbiased score and map the shifted
    scores back through the score function's inverse: ``affinity = score^-1(score(L) + b -
    b[e*])``. The best expert's affinity is then its router logit, as without a bias, and every
    other expert sits below it by how far its biased score falls short, on the same logit scale.
    The inverse is ``logit`` for sigmoid (DeepSeek-V3), ``log`` for softmax (ERNIE-4.5: the
    log-probability, whose gaps are the logits' gaps without a bias) and ``softplus^-1(s^2)``
    for sqrt-softplus (DeepSeek-V4); each is increasing, so the affinity orders experts as the
    biased score does, and a bin is ``1 / alpha`` logits wide under every score function (binning
    the scores themselves would not be: sqrt-softplus compresses large logits, ``s ~ sqrt(L)``,
    and sigmoid saturates). (``logit(sigmoid(L) + b)`` instead saturates: experts whose biased
    score reaches 1 all land in bin 0, and a constant bias shift changes the choice.) Scores
    that fall to 0 or below land in the deepest bin.
    """
    scores = None
    if rule.bias_on_logits:  # ranked by the logits themselves (Llama-4), or plus the bias (Kolibri)
        rank = affinity = logits if score_bias is None else logits + score_bias
    elif score_bias is None:
        rank = affinity = logits
        if rule.scoring in ("sigmoid", "sqrtsoftplus"):
            scores = rank = score_values(logits, rule.scoring)
    else:
        scores = score_values(logits, rule.scoring)
        rank = scores + score_bias
    if rule.grouped:  # groups are scored as the router scores them (probabilities for softmax)
        unbiased_softmax = rule.scoring == "softmax" and score_bias is None
        group_source = score_values(logits, "softmax") if unbiased_softmax else rank
        allowed = group_mask(group_source, rule)
        rank = rank.masked_fill(~allowed, float("-inf"))
    if score_bias is not None and not rule.bias_on_logits:
        best_bias = score_bias[rank.argmax(dim=-1, keepdim=True)]
        affinity = _score_to_logit(scores + (score_bias - best_bias), rule.scoring)
    if rule.grouped:
        affinity = affinity.masked_fill(~allowed, float("-inf"))
    return rank, affinity


def healthy_rows(rank: torch.Tensor) -> torch.Tensor:
    """[T] bool: rows a policy may use. A row holding NaN or +inf, or no finite score (a token
    whose hidden state went bad), gets plain top-k and never votes, so it cannot spoil others."""
    return ~(torch.isnan(rank) | (rank == float("inf"))).any(dim=-1) & (rank.amax(dim=-1) > float("-inf"))


# --- exact orderings --------------------------------------------------------------------

def index_bits(num_experts: int) -> int:
    return max(1, (num_experts - 1).bit_length())


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 [T, E]: higher score first, ties to the lower index; a total order.

    The fp32 bits, flipped for negatives, order like the floats (-0.0 is first made +0.0, so
    the two zeros tie as they do in a float comparison); the expert index fills the low bits.
    Values lie in ``[-2**(31 + w), 2**(31 + w))`` with ``w = index_bits(E)``.
    """
    num_experts = scores.shape[-1]
    bits = torch.where(scores == 0, 0.0, scores).view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    reverse_index = num_experts - 1 - torch.arange(num_experts, device=scores.device)
    return (ordered << index_bits(num_experts)) | reverse_index


def topk_by_key(key: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of the ``top_k`` largest of an integer key whose values are all distinct."""
    return torch.topk(key, top_k, dim=-1).indices


# --- the final choice and weights (ALGORITHM.md steps 6-7) -------------------------------

def finish(logits: torch.Tensor, rank: torch.Tensor, kept: torch.Tensor, confined: torch.Tensor,
           healthy: torch.Tensor, top_k: int, rule: RouterRule, refill: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's best ``top_k`` experts by the router's ranking among those it may use.

    ``kept`` [E]: the batch's set. ``confined`` [T]: rows that must stay inside it (the rest get
    plain top-k). A healthy row that is not confined gets its plain top-k; an unhealthy one gets
    what ``torch.topk`` would give it. A confined row with fewer than ``top_k`` usable experts
    repeats its first expert at weight 0 (its output stays finite and no expert is added), or
    with ``refill`` takes its best allowed experts outside the set after those inside it.
    Returns ``(weights fp32, ids int64)``, both ``[T, top_k]``. On CPU the choice is one C++ op
    (``kernels/select_cpu.cpp``); elsewhere ``choose_in_kept``.
    """
    with_plain = needs_plain_mass(rule)
    if select_cpu.use_for(rank):
        choice = torch.ops.lynx.choose_in_kept(rank, kept, confined, healthy, top_k, refill, with_plain)
    else:
        choice = choose_in_kept(rank, kept, confined, healthy, top_k, refill, with_plain)
    return weigh(logits, rank, choice, top_k, rule)


def weigh(logits: torch.Tensor, rank: torch.Tensor, choice, top_k: int, rule: RouterRule):
    """``(weights fp32, ids)`` of a choice ``(ids, valid, plain ids or [T, 0])``."""
    ids, valid, plain = choice
    return rule_weights(logits, rank, ids, valid, top_k, rule, plain if needs_plain_mass(rule) else None), ids


def choose_in_kept(rank: torch.Tensor, kept: torch.Tensor, confined: torch.Tensor, healthy: torch.Tensor,
                   top_k: int, refill: bool, with_plain: bool):
    """``finish``'s choice in static-shaped torch: ``(ids, valid, plain ids or [T, 0])``."""
    allowed = rank > float("-inf")
    preferred = torch.where(healthy[:, None], allowed & (kept[None, :] | ~confined[:, None]), True)
    usable = torch.where(healthy[:, None], allowed, True) if refill else preferred
    # three tiers below one another: preferred, usable only, unusable; the router's order inside each
    tier = (~usable).to(torch.int64) + (~preferred).to(torch.int64)
    key = order_key(rank) - tier * (1 << (33 + index_bits(rank.shape[-1])))
    ids = topk_by_key(key, top_k)
    valid = torch.arange(top_k, device=ids.device) < usable.sum(dim=-1, keepdim=True)
    ids = torch.where(valid, ids, ids[:, :1])
    plain = topk_by_key(order_key(rank), top_k) if with_plain else ids[:, :0]
    return ids, valid, plain


def needs_plain_mass(rule: RouterRule) -> bool:
    """Whether ``rule_weights`` rescales to the plain top-k's probability mass."""
    return rule.scoring == "softmax" and not rule.renormalize and not rule.softmax_after_topk


def rule_weights(logits: torch.Tensor, rank: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                 top_k: int, rule: RouterRule, plain_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The router's own weights for the chosen ``ids`` (slots not ``valid`` weigh 0).

    softmax, renormalised: the chosen probabilities sum to 1 (Mixtral, Qwen3-MoE).
    softmax, not renormalised: they carry the probability mass the token's plain top-k had
      (Qwen2-MoE, OLMoE, DeepSeek-V2); with the plain choice this is the plain weight.
    softmax after top-k: softmax over the chosen logits (GPT-OSS).
    sigmoid, sqrt-softplus: the chosen (unbiased) scores, renormalised or not (DeepSeek-V3,
      Llama-4, DeepSeek-V4).
    A selection bias only ranks: the weights are the unbiased scores (with a softmax's plain
    mass taken from the plain top-k of the biased ranking).
    sparsemixer: the router's masked softmax around each chosen expert (``sparsemixer_weights``).
    ``plain_ids``: the plain top-k of ``rank`` where the caller has it (else computed here).
    """
    if rule.scoring == "sparsemixer":
        weights = sparsemixer_weights(logits, ids, rule.jitter_eps) * valid
    elif rule.softmax_after_topk:
        weights = torch.softmax(logits.gather(-1, ids).masked_fill(~valid, float("-inf")), dim=-1)
    else:
        scores = score_values(logits, rule.scoring)
        weights = scores.gather(-1, ids) * valid
        if rule.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        elif rule.scoring == "softmax":
            if plain_ids is None:
                plain_ids = topk_by_key(order_key(rank), top_k)
            plain = scores.gather(-1, plain_ids)
            weights = weights * (plain.sum(dim=-1, keepdim=True) / weights.sum(dim=-1, keepdim=True))
    return weights * rule.scaling_factor if rule.scaling_factor != 1.0 else weights


def sparsemixer_weights(logits: torch.Tensor, ids: torch.Tensor, jitter_eps: float) -> torch.Tensor:
    """Phi-3.5-MoE's sparsemixer weights (inference) of the chosen ``ids`` [T, 2], the best first.

    The first expert's weight is a softmax over the experts whose logit is within ``2 *
    jitter_eps`` (relative) of its own or above it; the second's the same around its logit with
    the first expert removed. With the plain top-2 (the best logit, then the best of the rest)
    this is the router's code exactly, so B = 1 and prefill are plain routing. With another
    choice it is the same formula around the chosen experts: a better expert the batch did not
    keep still counts in the softmax (dropping it does not raise the others' weights, as in a
    softmax router that is not renormalised). -inf logits stay out of the windows."""
    first, second = ids[:, :1], ids[:, 1:2]
    outside = logits == float("-inf")  # (their window test would be inf / inf: keep it out)
    weights = []
    for chosen, scores in ((first, logits), (second, logits.scatter(-1, first, float("-inf")))):
        threshold = scores.gather(-1, chosen)
        factor = logits.abs().clamp(min=threshold)
        window = ((threshold - logits) / factor > 2 * jitter_eps) | outside
        weights.append(torch.softmax(scores.masked_fill(window, float("-inf")), dim=-1).gather(-1, chosen))
    return torch.cat(weights, dim=-1)


def route_plain(logits: torch.Tensor, top_k: int, rule: RouterRule, score_bias: torch.Tensor | None = None):
    """Plain top-k routing under ``rule`` with the routers' own op sequence (a reference)."""
    if rule.softmax_after_topk:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    if rule.scoring == "sparsemixer":
        weights, ids = _sparsemixer(logits, rule.jitter_eps)
        return (weights * rule.scaling_factor if rule.scaling_factor != 1.0 else weights), ids
    if rule.scoring == "softmax" and score_bias is None:  # Mixtral, DeepSeek-V2, Mistral-4
        scores = torch.softmax(logits, dim=-1)
        choice = scores.masked_fill(~group_mask(scores, rule), 0.0) if rule.grouped else scores
        weights, ids = torch.topk(choice, top_k, dim=-1)
    else:  # DeepSeek-V3/V4, ERNIE-4.5 (bias on the scores), Kolibri (bias on the logits)
        scores = score_values(logits, rule.scoring)
        if rule.bias_on_logits:
            choice = logits if score_bias is None else logits + score_bias
        else:
            choice = scores if score_bias is None else scores + score_bias
        if rule.grouped:
            choice = choice.masked_fill(~group_mask(choice, rule), float("-inf"))
        ids = torch.topk(choice, top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
    if rule.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * rule.scaling_factor if rule.scaling_factor != 1.0 else weights), ids


def _sparsemixer(scores: torch.Tensor, jitter_eps: float):
    """transformers' ``phimoe.sparsemixer`` at inference, as written there."""
    threshold, first = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates = torch.softmax(scores.masked_fill((threshold - scores) / factor > 2 * jitter_eps, float("-inf")), dim=-1)
    masked_scores = torch.scatter(scores, -1, first, float("-inf"))
    threshold, second = masked_scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates_top2 = torch.softmax(
        masked_scores.masked_fill((threshold - scores) / factor > 2 * jitter_eps, float("-inf")), dim=-1)
    return torch.cat((gates.gather(-1, first), gates_top2.gather(-1, second)), dim=-1), torch.cat((first, second), -1)

"""The batch-aware expert selector: ``select_experts`` and the routing the graph op runs.

``route`` is one decode-or-prefill routing call in static-shaped torch with no host
synchronisation: router scores under the router's rule (``policies.rules``), the batch's kept
set from the voters under a policy (``policies``), each token's best experts inside it, the
router's own weights. The ``lynx::select_experts`` op runs it eagerly and Inductor traces it
into the compiled graph (``backend.py``), where it fuses with the code around it. On CPU the
kept set and the choice are C++ ops (``kernels/select_cpu.cpp``: one pass per row where the
torch form needs top-k calls, a scatter and several kernels; policy lynx both in one op); the
scores and weights stay torch.

Which rows vote: a step that re-routes (a decode step, or any step with ``decode_only`` off)
makes every live, healthy row a voter. Prefill rows, rows of a step that does not re-route,
and unhealthy rows (NaN or +inf scores) get plain top-k; rows that are not live (padding,
finished sequences) are routed inside the kept set (so they read no extra experts) and never
vote. With the voters' count taken on the device, the voters' choice is exactly what it would be
without the other rows (``policies.affinity_binning``).

``reference_route`` is the oracle the tests hold ``route`` to: the plain two-sort form of the
algorithm run on the voters' rows alone.
"""

from __future__ import annotations

import torch

from .policies import get_policy
from .policies.affinity_binning import reference_choice
from .policies.ep_cap import cap_per_rank, check_ep_ranks
from .policies.rules import (RouterRule, check_rule, finish, healthy_rows, needs_plain_mass, router_scores,
                             rule_weights, weigh)

_UNSET = object()


def route(logits: torch.Tensor, score_bias: torch.Tensor | None, top_k: int, rule: RouterRule, policy: str,
          knobs: dict, rerouting: torch.Tensor | bool, live: torch.Tensor | None, ep_ranks: int | None = None):
    """One routing call: ``(weights fp32, ids int64, voters bool)``, ``[T, top_k]`` twice and ``[T]``.

    ``rerouting``: a bool or 0-dim bool tensor (False: plain top-k for every row); ``live``: bool
    [T] or None (all rows live); ``ep_ranks``: cap the kept set per expert-parallel rank
    (``policies.ep_cap``; None or 1: no cap).
    """
    logits = logits.float()
    bias = None if score_bias is None else score_bias.float()
    rank, affinity = router_scores(logits, rule, bias)
    healthy = healthy_rows(rank)
    if rerouting is False:
        kept = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        voters = torch.zeros_like(healthy)
        return (*finish(logits, rank, kept, voters, healthy, top_k, rule), voters)
    confined = healthy & rerouting
    voters = confined if live is None else confined & live
    capped = ep_ranks is not None and ep_ranks > 1
    selection = get_policy(policy)
    if not capped:
        choice = selection.kept_and_choice(rank, affinity, voters, confined, healthy, top_k, needs_plain_mass(rule),
                                           **knobs)
        if choice is not None:
            return (*weigh(logits, rank, choice, top_k, rule), voters)
    kept = selection.kept(logits, rank, affinity, voters, top_k, rule, **knobs)
    if capped:
        kept = cap_per_rank(kept, rank, voters, top_k, ep_ranks)
    return (*finish(logits, rank, kept, confined, healthy, top_k, rule, refill=capped), voters)


def reference_route(logits: torch.Tensor, top_k: int, rule: RouterRule, policy: str, knobs: dict,
                    score_bias: torch.Tensor | None = None):
    """The oracle for policy lynx: every row of ``logits`` votes; two stable sorts instead of
    packed keys (the other policies' oracles are in the tests)."""
    if policy != "lynx":
        raise ValueError(f"no reference for policy {policy!r} here")
    logits = logits.float()
    bias = None if score_bias is None else score_bias.float()
    rank, affinity = router_scores(logits, rule, bias)
    ids = reference_choice(rank, affinity, top_k, knobs["alpha"], knobs.get("beta"))
    valid = torch.ones_like(ids, dtype=torch.bool)
    return rule_weights(logits, rank, ids, valid, top_k, rule), ids


# --- public API -------------------------------------------------------------------------

def check_logits(router_logits, top_k) -> None:
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


def check_step_args(router_logits: torch.Tensor, live, decode) -> None:
    if live is not None and (not isinstance(live, torch.Tensor) or live.dtype != torch.bool
                             or tuple(live.shape) != (router_logits.shape[0],)):
        raise ValueError(f"live must be None or a bool tensor of shape [{router_logits.shape[0]}], got "
                         f"{getattr(live, 'dtype', type(live).__name__)} {tuple(getattr(live, 'shape', ()))}")
    if isinstance(decode, torch.Tensor):
        if decode.numel() != 1 or decode.dtype != torch.bool:
            raise ValueError(f"decode must be a bool or a 0-dim bool tensor, got {decode.dtype} {tuple(decode.shape)}")
    elif not isinstance(decode, bool):
        raise ValueError(f"decode must be a bool or a 0-dim bool tensor, got {decode!r}")


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    policy: str = "lynx",
    alpha=_UNSET,
    beta=_UNSET,
    k0=_UNSET,
    budget=_UNSET,
    renormalize: bool = True,
    scoring: str = "softmax",
    softmax_after_topk: bool = False,
    score_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    scaling_factor: float = 1.0,
    bias_on_logits: bool = False,
    jitter_eps: float = 0.0,
    live: torch.Tensor | None = None,
    decode: bool | torch.Tensor = True,
    ep_ranks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-aware top-k over the ``T`` tokens of one step.

    Args:
        router_logits: ``[T, E]`` router logits (any float dtype; computed in fp32).
        top_k: experts per token.
        policy: the selection rule; its knobs as keywords (``policies``):
            ``"lynx"`` (AffinityBinning): ``alpha`` (bins are ``1 / alpha`` logits wide), ``beta``
            (deepest bin; None or left out: no clamp);
            ``"oea"``: ``k0`` (every token keeps its top k0; the rest only from their union);
            ``"xshare"``: ``budget`` (the batch uses at most that many experts beyond its top-1s).
        renormalize, scoring, softmax_after_topk, score_bias, num_groups, topk_groups, group_score,
        scaling_factor, bias_on_logits, jitter_eps: the router's rule (``RouterRule``); the
            defaults are a softmax router. ``scoring``: ``"softmax"``, ``"sigmoid"``,
            ``"sqrtsoftplus"`` (``sqrt(softplus(logits))``, DeepSeek-V4) or ``"sparsemixer"``
            (Phi-3.5-MoE, top_k=2: the best two logits, each weighed by a softmax over the experts
            within ``2 * jitter_eps`` of it, relative; ``renormalize`` does not apply).
            ``score_bias``: a selection-only bias ``[E]`` added to the scores before top-k (the
            weights use the unbiased scores). ``bias_on_logits=True``: the router ranks by the logits
            (plus ``score_bias`` if given), not by its scores; the weights are still the scores.
            GPT-OSS: ``softmax_after_topk=True``. DeepSeek-V3: ``scoring="sigmoid",
            score_bias=e_score_correction_bias, num_groups=n_group, topk_groups=topk_group,
            group_score="top2_sum", scaling_factor=routed_scaling_factor``. ERNIE-4.5:
            ``score_bias=e_score_correction_bias`` (softmax). Kolibri: ``scoring="sigmoid",
            score_bias=e_score_correction_bias, bias_on_logits=True``. Phi-3.5-MoE:
            ``scoring="sparsemixer", jitter_eps=router_jitter_noise``. Llama-4: ``scoring="sigmoid",
            renormalize=False, bias_on_logits=True`` (top-k of the logits, sigmoid weights).
        live: bool ``[T]``: the rows that are live tokens (None: all). Other rows (padding,
            finished sequences) do not vote and do not count in the batch; they are routed
            inside the kept set.
        decode: a bool or a 0-dim bool tensor on the logits' device: False gives every row
            plain top-k (a prefill).
        ep_ranks: expert parallelism over this many ranks (rank r owns experts [r E/R,
            (r+1) E/R)): the kept set holds at most ceil(|kept| / R) experts per rank besides
            the voters' top-1 experts (``policies.ep_cap``). None or 1: no cap.

    Returns:
        ``(topk_weights, topk_ids)``: fp32 and int64, both ``[T, top_k]``. A live token gets
        ``top_k`` distinct experts, its best-ranked in the batch's kept set (and within its
        allowed groups). Rows with NaN or +inf scores are routed as plain top-k and never vote.
        Nothing is synchronised with the host.
    """
    check_logits(router_logits, top_k)
    check_step_args(router_logits, live, decode)
    chosen = get_policy(policy)
    given = {name: value for name, value in (("alpha", alpha), ("beta", beta), ("k0", k0), ("budget", budget))
             if value is not _UNSET}
    knobs = chosen.check(given)
    chosen.check_against(knobs, top_k, router_logits.shape[1])
    rule = RouterRule(scoring, renormalize, softmax_after_topk, num_groups, topk_groups, group_score,
                      scaling_factor, bias_on_logits, jitter_eps)
    check_rule(rule, router_logits.shape[1], top_k, score_bias)
    check_ep_ranks(ep_ranks, router_logits.shape[1])
    weights, ids, _ = route(router_logits, score_bias, top_k, rule, policy, knobs, decode, live, ep_ranks)
    return weights, ids


__all__ = ["RouterRule", "reference_route", "route", "select_experts"]

"""The one call from the plugin into lynx's selector (``lynx_compile.select_experts``)."""

from __future__ import annotations

import inspect
from functools import cache

import torch

from ...selector import RouterRule, route_plain, select_experts


@cache
def _has_live_rows() -> bool:
    return "live" in inspect.signature(select_experts).parameters


def route(router_logits: torch.Tensor, top_k: int, *, policy: str, alpha: float, beta: int | None,
          live: torch.Tensor | None, decode: bool | torch.Tensor, score_bias: torch.Tensor | None,
          **rule) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` over the rows of one MoE layer call: (weights fp32, ids int64), [T, k]."""
    if _has_live_rows():
        return select_experts(router_logits, top_k, policy=policy, alpha=alpha, beta=beta, live=live,
                              decode=decode, score_bias=score_bias, **rule)
    return _emulate(router_logits, top_k, policy, alpha, beta, live, decode, score_bias, rule)


# TEMPORARY: emulates select_experts(policy=, live=, decode=) for a lynx-compile whose
# select_experts lacks them. Delete once main's selector has them (then route() calls it directly).
def _emulate(router_logits, top_k, policy, alpha, beta, live, decode, score_bias, rule):
    if policy != "lynx":
        raise ValueError(f"policy {policy!r} needs a lynx-compile whose select_experts takes policy=")
    logits = router_logits.float()
    bias = None if score_bias is None else score_bias.float()
    plain_weights, plain_ids = route_plain(logits, top_k, RouterRule(**rule), bias)
    if isinstance(decode, bool) and not decode:
        return plain_weights, plain_ids
    if live is None:
        weights, ids = select_experts(logits, top_k, alpha=alpha, beta=beta, score_bias=score_bias, **rule)
    else:  # live rows vote among themselves; the others keep plain top-k (boolean indexing syncs: fallback only)
        weights, ids = plain_weights.clone(), plain_ids.clone()
        if int(live.sum()) > 0:
            weights[live], ids[live] = select_experts(logits[live], top_k, alpha=alpha, beta=beta,
                                                      score_bias=score_bias, **rule)
    if isinstance(decode, torch.Tensor):
        weights = torch.where(decode, weights, plain_weights)
        ids = torch.where(decode, ids, plain_ids)
    return weights, ids

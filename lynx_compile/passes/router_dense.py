"""Dense sigmoid routing (transformers' Llama-4): the top-k logits are scattered into a
``-inf`` [tokens, experts] matrix and passed through a sigmoid, so the chosen experts weigh
``sigmoid(logit)`` and the others exactly 0; every expert then runs on every token
(``dispatch_dense.py`` matches that and reads only the chosen experts).

The graph has no [tokens, k] weights tensor: the match's ``weights`` is the top-k values (raw
logits), and the dense dispatch rewrite puts the weights node in (``rewrite.py``), replaying
the router's own sigmoid and casts on the k values; a selector replacing the router gets the
same ops on the logits of the experts it chose. The match's ``rule`` is sigmoid weights, not
renormalised, ranked by the logits (``bias_on_logits``): the router's top-k is over the logits,
and ranking by sigmoid(logits) would tie the experts whose sigmoid rounds to 1.0 (logits above
~17 in fp32) that the logits tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from ..selector import RouterRule
from .graph_utils import arg, is_last_dim, op_kind, shape
from .routers import RouterMatch, _build, router_pattern, topk_of_logits

# Ops between the scatter and the dense weights: the sigmoid and dtype casts, nothing else.
_SCORE_KINDS = frozenset({"sigmoid", "cast"})


@dataclass
class DenseRouterMatch(RouterMatch):
    scattered: Node | None = None  # full_like(logits, -inf).scatter_(1, ids, values)
    dense_weights: Node | None = None  # [tokens, experts]: sigmoid of it, cast back
    weight_ops: list[Node] = field(default_factory=list)  # the sigmoid and casts, in order


def _scatter_of_values(values: Node, ids: Node, logits: Node) -> Node | str:
    """``torch.full_like(logits, -inf).scatter_(1, ids, values)``: the only use of the values."""
    users = list(values.users)
    if len(users) != 1 or op_kind(users[0]) != "scatter":
        return "the top-k values are not only scattered into a [tokens, experts] matrix"
    scatter = users[0]
    base, dim, index, src = (arg(scatter, i, n) for i, n in enumerate(("input", "dim", "index", "src")))
    if index is not ids or src is not values or not is_last_dim(dim, 2):
        return "the scatter does not put the top-k values at the top-k ids along the experts dim"
    if not isinstance(base, Node) or base.target is not torch.full_like or base.args[0] is not logits:
        return "the top-k values are not scattered into a full_like of the logits"
    fill = arg(base, 1, "fill_value")
    if fill != float("-inf"):
        return f"the unchosen experts' scores are {fill}, not -inf (their sigmoid weight would not be 0)"
    if set(base.users) != {scatter}:
        return "the -inf matrix is used besides the scatter"
    return scatter


def _dense_weights(scatter: Node) -> tuple[Node, list[Node]] | str:
    """Follow the scattered matrix through single-use casts and one sigmoid."""
    node, ops = scatter, []
    while len(node.users) == 1 and op_kind(next(iter(node.users))) in _SCORE_KINDS:
        node = next(iter(node.users))
        ops.append(node)
    if [op_kind(n) for n in ops].count("sigmoid") != 1:
        return "the scattered scores are not turned into weights by one sigmoid"
    return node, ops


@router_pattern("dense_sigmoid")
def dense_sigmoid(topk: Node) -> DenseRouterMatch | str:
    """top-k of the logits -> scatter into -inf -> sigmoid (Llama-4's ``Llama4Router``)."""
    found = topk_of_logits(topk)
    if isinstance(found, str):
        return found
    logits, k, values, ids = found
    scatter = _scatter_of_values(values, ids, logits)
    if isinstance(scatter, str):
        return scatter
    found = _dense_weights(scatter)
    if isinstance(found, str):
        return found
    dense, ops = found
    if shape(dense) != shape(logits):
        return "the dense weights are not [tokens, experts]"
    match = _build("dense_sigmoid", topk, logits, values, ids, k, RouterRule("sigmoid", False, bias_on_logits=True))
    if isinstance(match, str):
        return match
    return DenseRouterMatch(**vars(match), scattered=scatter, dense_weights=dense, weight_ops=ops)

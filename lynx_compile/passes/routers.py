"""Router patterns: from a ``topk`` node back to the router logits and forward to its outputs.

Each pattern is one function ``topk node -> RouterMatch | reason``, registered in
``ROUTER_PATTERNS``; a new router rule is a new function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch.fx import Node

from .graph_utils import (
    arg,
    is_last_dim,
    module_path,
    module_stack,
    op_kind,
    shape,
    strip,
    tuple_outputs,
)


@dataclass
class RouterMatch:
    pattern: str
    topk: Node
    logits: Node  # what the selector op reads
    weights: Node  # its uses take the selector's weights
    ids: Node  # its uses take the selector's expert ids
    nodes: list[Node]  # router nodes the selector replaces
    top_k: int
    num_experts: int
    renormalize: bool
    layer_input: Node  # [batch, seq, hidden]: the selector needs seq to tell decode from prefill
    hidden_aliases: set[Node] = field(default_factory=set)  # views of layer_input
    module: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # enclosing module path -> class


RouterPattern = Callable[[Node], "RouterMatch | str"]
ROUTER_PATTERNS: dict[str, RouterPattern] = {}


def router_pattern(name: str):
    def register(fn: RouterPattern) -> RouterPattern:
        ROUTER_PATTERNS[name] = fn
        return fn

    return register


def match_router(topk: Node) -> RouterMatch | str:
    """The first pattern that matches, or the reasons none did."""
    reasons = []
    for name, pattern in ROUTER_PATTERNS.items():
        found = pattern(topk)
        if isinstance(found, RouterMatch):
            return found
        reasons.append(f"{name}: {found}")
    return "; ".join(reasons)


def topk_args(topk: Node) -> tuple[Node, int] | str:
    """(input, k) of a ``torch.topk`` call, or why it is not a router's top-k."""
    scores = arg(topk, 0, "input")
    k = arg(topk, 1, "k")
    dim = arg(topk, 2, "dim", -1)
    if not isinstance(scores, Node) or not isinstance(k, int):
        return "top-k size is not a constant"
    scores_shape = shape(scores)
    if scores_shape is None or len(scores_shape) != 2:
        return f"top-k input is not a 2-D [tokens, experts] tensor (shape {scores_shape})"
    if not is_last_dim(dim, 2) or not arg(topk, 3, "largest", True):
        return "top-k is not over the largest entries of the last dim"
    return scores, k


def layer_input(router_input: Node) -> tuple[Node, set[Node]] | None:
    """The [batch, seq, hidden] tensor a router's [tokens, hidden] input is a view of."""
    node = router_input
    while isinstance(node, Node):
        node_shape = shape(node)
        if node_shape is not None and len(node_shape) == 3:
            return node, _view_family(node)
        if op_kind(node) not in ("view", "cast") or not node.args:
            return None
        node = node.args[0]
    return None


def _view_family(root: Node) -> set[Node]:
    family, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in family:
            continue
        family.add(node)
        todo.extend(u for u in node.users if op_kind(u) in ("view", "cast"))
    return family


def _renormalization(values: Node) -> tuple[Node, list[Node]] | None:
    """``values / values.sum(-1, keepdim=True)`` after top-k: (result, its nodes), else None."""
    users = list(values.users)
    sums = [u for u in users if op_kind(u) == "sum" and u.args[0] is values]
    divs = [u for u in users if op_kind(u) == "div" and u.args[0] is values]
    if len(users) != 2 or len(sums) != 1 or len(divs) != 1:
        return None
    total, div = sums[0], divs[0]
    if div.args[1] is not total or not is_last_dim(arg(total, 1, "dim"), 2):
        return None
    if not arg(total, 2, "keepdim", False):
        return None
    return div, [total, div]


def _router_outputs(topk: Node) -> tuple[Node, Node] | str:
    outs = tuple_outputs(topk)
    if len(outs) != len(topk.users):
        return "top-k result is used as a whole, not as (values, indices)"
    if 0 not in outs or 1 not in outs:
        return "top-k values or indices are unused"
    return outs[0], outs[1]


def _logits_source(logits: Node) -> tuple[Node, set[Node]] | str:
    linear = strip(logits)
    if op_kind(linear) != "linear":
        return f"router scores come from {op_kind(linear)}, not a linear layer"
    found = layer_input(arg(linear, 0, "input"))
    if found is None:
        return "cannot find the [batch, seq, hidden] layer input (needed to tell decode from prefill)"
    return found


@router_pattern("softmax_topk")
def softmax_topk(topk: Node) -> RouterMatch | str:
    """softmax(logits) -> top-k -> optional renormalisation (Mixtral, Qwen2/3-MoE, OLMoE)."""
    parsed = topk_args(topk)
    if isinstance(parsed, str):
        return parsed
    probs, k = parsed
    if op_kind(probs) != "softmax":
        return f"top-k input is {op_kind(probs)}, not a softmax"
    if not is_last_dim(arg(probs, 1, "dim"), 2):
        return "softmax is not over the experts dim"
    logits = arg(probs, 0, "input")
    num_tokens, num_experts = shape(probs)
    if not 1 <= k <= num_experts:
        return f"top-k size {k} is outside [1, {num_experts}]"
    outputs = _router_outputs(topk)
    if isinstance(outputs, str):
        return outputs
    values, ids = outputs
    source = _logits_source(logits)
    if isinstance(source, str):
        return source
    root, aliases = source
    renorm = _renormalization(values)
    weights, extra = (values, []) if renorm is None else renorm
    if renorm is None and any(op_kind(u) == "div" for u in values.users):
        return "top-k weights are divided by something other than their sum"
    nodes = [topk, values, ids, *extra]
    if set(probs.users) == {topk}:
        nodes.insert(0, probs)
    return RouterMatch(
        pattern="softmax_topk",
        topk=topk,
        logits=logits,
        weights=weights,
        ids=ids,
        nodes=nodes,
        top_k=k,
        num_experts=num_experts,
        renormalize=renorm is not None,
        layer_input=root,
        hidden_aliases=aliases,
        module=module_path(topk),
        modules=module_stack(topk),
    )


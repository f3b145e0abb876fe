"""Router patterns: from a ``topk`` node back to the router logits and forward to its outputs.

Each pattern is one function ``topk node -> RouterMatch | reason``, registered in
``ROUTER_PATTERNS``; a new router rule is a new function here. Patterns share the pieces a
router is made of: the logits' source (a linear layer on the layer input), a group mask
(DeepSeek), and the weight transforms after top-k (renormalise, scale).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from ..selector import RouterRule
from .graph_utils import (
    arg,
    backward_region,
    cast_chain_end,
    dtype,
    is_last_dim,
    is_param_source,
    module_path,
    module_stack,
    mutates,
    op_kind,
    shape,
    strip,
    tuple_outputs,
)


@dataclass
class RouterMatch:
    pattern: str
    topk: Node  # the final top-k: the selector goes in its place
    logits: Node  # what the selector op reads
    weights: Node  # its uses take the selector's weights
    ids: Node  # its uses take the selector's expert ids
    nodes: set[Node]  # router nodes between the logits and the outputs (erased once unused)
    top_k: int
    num_experts: int
    rule: RouterRule
    layer_input: Node  # [batch, seq, hidden] (the shape rule reads seq from it), or [tokens, hidden]
    hidden_aliases: set[Node] = field(default_factory=set)  # views of layer_input
    score_bias: Node | None = None  # selection-only bias (DeepSeek-V3)
    module: str = ""
    modules: dict[str, str] = field(default_factory=dict)  # enclosing module path -> class
    # Where the selector's outputs go when they are not ``weights`` / ``ids`` (what the experts read):
    # a router that post-processes its choice before its experts (Zaya masks its skip class) has the
    # selector replace what it post-processes; an ids-only match replaces the ids alone and the
    # router's own formula, which reads them, weighs the chosen experts (Inkling).
    selected_weights: Node | None = None
    selected_ids: Node | None = None
    ids_only: bool = False
    logit_columns: int | None = None  # the selector reads logits[..., :n] (Inkling: the shared experts' follow)
    skip_class: bool = False  # the selector's last class is a free "skip" choice that runs no expert (Zaya)

    @property
    def classes(self) -> int:
        """How many choices the selector ranks: the experts, and the skip class where there is one."""
        return self.num_experts + self.skip_class


RouterPattern = Callable[[Node], "RouterMatch | str"]
ROUTER_PATTERNS: dict[str, RouterPattern] = {}
PATTERN_ROOTS: dict[str, str] = {}  # pattern -> the op kind it starts from


def router_pattern(name: str, root: str = "topk"):
    """Register a pattern that starts from nodes of kind ``root`` (a router's final top-k; a
    router without one names the node it starts from, e.g. sparsemixer's first max)."""
    def register(fn: RouterPattern) -> RouterPattern:
        ROUTER_PATTERNS[name] = fn
        PATTERN_ROOTS[name] = root
        return fn

    return register


def router_candidates(nodes) -> list[Node]:
    """The nodes some pattern starts from, in graph order."""
    roots = set(PATTERN_ROOTS.values())
    return [n for n in nodes if op_kind(n) in roots]


def guarded(pattern, *args):
    """A pattern's result; a pattern that trips over an unexpected graph is a non-match."""
    try:
        return pattern(*args)
    except Exception as error:  # noqa: BLE001  (any surprise means: leave the graph alone)
        return f"matcher error {type(error).__name__}: {error}"


class Refusal(str):
    """A reason from a pattern that recognised the router but cannot support it: it is the
    whole story, so the other patterns' reasons are left out of the report."""


def match_router(topk: Node) -> RouterMatch | str:
    """The first pattern that matches, or the reasons none did (of the patterns that start
    from this kind of node)."""
    reasons = []
    for name, pattern in ROUTER_PATTERNS.items():
        if PATTERN_ROOTS[name] != op_kind(topk):
            continue
        found = guarded(pattern, topk)
        if isinstance(found, RouterMatch):
            return found
        if isinstance(found, Refusal):
            return Refusal(f"{name}: {found}")
        reasons.append(f"{name}: {found}")
    return "; ".join(reasons)


# --- shared pieces ----------------------------------------------------------------------

def topk_args(topk: Node, max_dims: int = 2) -> tuple[Node, int] | str:
    """(input, k) of a router's ``torch.topk`` over the experts, or why it is not one. With
    ``max_dims=3`` the input may also be [batch, seq, experts] (Zaya's router)."""
    scores = arg(topk, 0, "input")
    k = arg(topk, 1, "k")
    if not isinstance(scores, Node) or not isinstance(k, int):
        return "top-k size is not a constant"
    scores_shape = shape(scores)
    if scores_shape is None or not 2 <= len(scores_shape) <= max_dims:
        also = " or [batch, seq, experts]" if max_dims > 2 else ""
        return f"top-k input is not a 2-D [tokens, experts]{also} tensor (shape {scores_shape})"
    if not is_last_dim(arg(topk, 2, "dim", -1), len(scores_shape)) or not arg(topk, 3, "largest", True):
        return "top-k is not over the largest entries of the last dim"
    if not 1 <= k <= scores_shape[-1]:
        return f"top-k size {k} is outside [1, {scores_shape[-1]}]"
    return scores, k


def topk_outputs(topk: Node, need_values: bool) -> tuple[Node | None, Node] | str:
    outs = tuple_outputs(topk)
    if len(outs) != len(topk.users):
        return "top-k result is used as a whole, not as (values, indices)"
    if 1 not in outs or (need_values and 0 not in outs):
        return "top-k values or indices are unused"
    return outs.get(0), outs[1]


def layer_input(router_input: Node) -> tuple[Node, set[Node]] | None:
    """The tensor a router's [tokens, hidden] input is a view of: the [batch, seq, hidden] layer
    input where there is one, else the [tokens, hidden] tensor itself; and its views."""
    node, flat = router_input, None
    while isinstance(node, Node):
        node_shape = shape(node)
        if node_shape is not None and len(node_shape) == 3:
            return node, _view_family(node)
        if node_shape is not None and len(node_shape) == 2:
            flat = node
        if op_kind(node) not in ("view", "cast") or not node.args:
            break
        node = node.args[0]
    return None if flat is None else (flat, _view_family(flat))


def _view_family(root: Node) -> set[Node]:
    family, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in family:
            continue
        family.add(node)
        todo.extend(u for u in node.users if op_kind(u) in ("view", "cast") and u.args[0] is node)
    return family


def logits_source(logits: Node, router: str = "") -> tuple[Node, set[Node]] | str:
    """The layer input behind router logits computed by a linear layer, possibly transformed
    elementwise after it (``logit_transform_input``: a multiplier, a tanh softcap, casts).
    ``router``: the router's module path; a linear that reads a tensor the router computes
    itself is the last layer of a router network (``network_input``)."""
    linear = logits
    while op_kind(linear) != "linear":
        before = logit_transform_input(linear)
        if before is None:
            return f"router scores come from {op_kind(linear)}, not a linear layer"
        linear = before
    found = layer_input(normalised_input(arg(linear, 0, "input")))
    if found is not None and router and found[0].op != "placeholder" and router in module_stack(found[0]):
        found = network_input(linear, router) or found
    if found is None:
        return "the router does not read a [tokens, hidden] view of the layer input"
    return found


def network_input(linear: Node, router: str) -> tuple[Node, set[Node]] | None:
    """The layer input of a router that computes its logits with a network of its own (Zaya's:
    a down-projection, an RMSNorm, two GELU layers, then the logits' linear): the one tensor made
    outside the router module that a linear inside it reads (Zaya's later layers also add a state
    carried from the previous layer's router, which no linear reads). Only the layer input's
    shape and views are needed (the shape rule, the experts' input); the network stays as it is."""
    def outside(node: Node) -> bool:
        return router not in module_stack(node) or is_param_source(node)

    region = backward_region(linear, outside)
    if region is None:
        return None
    entries = {strip(arg(n, 0, "input"), {"cast", "view"}) for n in region if op_kind(n) == "linear"}
    entries = [n for n in entries if isinstance(n, Node) and n not in region]  # (a graph input is a placeholder)
    return layer_input(entries[0]) if len(entries) == 1 else None


def logit_transform_input(node: Node) -> Node | None:
    """The logits an elementwise transform of router logits reads: a cast, ``x * c``, ``c * x``,
    ``x / c`` with a constant ``c`` (MuseSpark's output multiplier; a softcap's scaling), or
    ``tanh(x)`` (Laguna's softcap ``tanh(L / c) * c``); None for anything else. The selector reads
    the transformed logits, so the transform itself needs no rule: this only finds the linear."""
    kind = op_kind(node)
    if kind == "cast" or (kind == "tanh" and len(node.args) == 1 and not node.kwargs):
        return node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if kind in ("mul", "div") and len(node.args) == 2 and not node.kwargs:
        left, right = node.args
        if isinstance(left, Node) and _const(right) is not None:
            return left
        if kind == "mul" and isinstance(right, Node) and _const(left) is not None:
            return right
    return None


def normalised_input(node: Node) -> Node:
    """The tensor a router's input normalises, or ``node`` itself: Gemma-4's router reads
    ``rms_norm(x) * scale * hidden ** -0.5`` of the layer input ``x`` (an RMSNorm without its own
    weight, a per-channel weight, a constant). Only the layer input's shape is needed (the shape
    rule), so the normalisation stays in the graph as it is."""
    current = node
    while isinstance(current, Node):
        if op_kind(current) == "cast":
            current = current.args[0]
            continue
        if op_kind(current) != "mul" or len(current.args) != 2:
            break
        left, right = current.args
        if isinstance(left, Node) and (_const(right) is not None or is_param_source(right)):
            current = left
        elif _is_rms_factor(right, left):
            return left
        else:
            break
    return node


def _is_rms_factor(factor: object, x: Node) -> bool:
    """``(x ** 2).mean(-1, keepdim=True) + eps`` to the power -0.5 (or its rsqrt)."""
    kind = op_kind(factor) if isinstance(factor, Node) else None
    if kind == "pow" and arg(factor, 1, "exponent") == -0.5:
        base = factor.args[0]
    elif kind in ("fn:rsqrt", "method:rsqrt"):
        base = factor.args[0]
    else:
        return False
    if op_kind(base) == "add" and _const(base.args[1]) is not None:
        base = base.args[0]
    if op_kind(base) not in ("method:mean", "fn:mean") or not is_last_dim(arg(base, 1, "dim"), 2):
        return False
    squared = base.args[0]
    return (op_kind(squared) == "pow" and squared.args[0] is x
            and arg(squared, 1, "exponent") == 2)


def _const(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _tiny_epsilon(node: Node) -> float | None:
    """The epsilon of ``total + eps`` or ``total.clamp(min=eps)`` when it is at most 1e-6
    (it changes the renormalised weights only for a sum below it), else None."""
    if op_kind(node) == "add":
        eps = _const(node.args[1]) if len(node.args) == 2 else None
    else:
        extra = {k for k in node.kwargs if k != "min"} | ({"max"} if len(node.args) > 2 else set())
        eps = None if extra else _const(arg(node, 1, "min"))
    return eps if eps is not None and 0 <= eps <= 1e-6 else None


def weight_transforms(weights: Node, ndim: int = 2) -> tuple[Node, bool, float] | str:
    """Renormalisation and scaling applied to top-k weights (``ndim``: theirs).

    Recognises ``w / w.sum(-1, keepdim=True)`` (optionally ``+ eps`` or ``.clamp(min=eps)`` in
    the denominator (ERNIE-4.5's ``norm_min``), in place or not) and then ``w * constant``.
    Returns (final node, renormalised, scale).
    """
    node, renormalize, scale = cast_chain_end(weights), False, 1.0
    users = list(node.users)
    sums = [u for u in users if op_kind(u) == "sum" and u.args[0] is node]
    if sums:
        total = sums[0]
        if not is_last_dim(arg(total, 1, "dim"), ndim) or not arg(total, 2, "keepdim", False):
            return "top-k weights are summed over something other than the experts dim"
        denominator = total
        if len(total.users) == 1 and op_kind(next(iter(total.users))) in ("add", "clamp"):
            denominator = next(iter(total.users))
            if _tiny_epsilon(denominator) is None:
                return "the renormalisation denominator adds something other than a tiny epsilon"
        divs = [u for u in users if op_kind(u) == "div" and u.args[0] is node and u.args[1] is denominator]
        if len(users) != 2 or len(divs) != 1:
            return "top-k weights are used beside their renormalisation"
        node, renormalize = divs[0], True
    elif any(op_kind(u) == "div" for u in users):
        return "top-k weights are divided by something other than their sum"
    if len(node.users) == 1:
        user = next(iter(node.users))
        factor = _const(user.args[1]) if op_kind(user) == "mul" and user.args[0] is node else None
        if factor is not None:
            node, scale = user, factor
    return node, renormalize, scale


def match_group_mask(masked: Node) -> tuple[Node, int, int, str, Node] | str:
    """DeepSeek's group limit: ``scores.masked_fill(~group_mask(...).bool(), fill)``.

    Returns (scores, num_groups, topk_groups, group score rule, the masked_fill node).
    """
    scores, invert = masked.args[0], arg(masked, 1, "mask")
    to_bool = invert.args[0] if isinstance(invert, Node) and invert.target is operator.invert else None
    expanded = strip(to_bool, {"cast", "view"}) if to_bool is not None else None
    if not isinstance(expanded, Node) or op_kind(expanded) != "zeros_like":
        return "the score mask is not built from a group mask"
    scatters = [u for u in expanded.users if mutates(u, expanded) and op_kind(u) == "scatter"]
    if len(scatters) != 1:
        return "the group mask is not filled by one scatter_"
    group_topk = scatters[0].args[2].args[0] if op_kind(scatters[0].args[2]) == "getitem" else None
    if op_kind(group_topk) != "topk":
        return "the group mask does not come from a top-k over groups"
    group_scores = arg(group_topk, 0, "input")
    topk_groups = arg(group_topk, 1, "k")
    reduced = strip(group_scores, {"getitem"})
    if op_kind(reduced) == "sum" and op_kind(strip(reduced.args[0], {"getitem"})) == "topk":
        inner_topk, rule = strip(reduced.args[0], {"getitem"}), "top2_sum"
        if arg(inner_topk, 1, "k") != 2:
            return "group scores sum a top-k other than the best two"
        grouped = inner_topk.args[0]
    elif op_kind(reduced) == "method:max":
        grouped, rule = reduced.args[0], "max"
    else:
        return f"group scores come from {op_kind(reduced)}, not max or a top-2 sum"
    grouped_shape = shape(grouped)
    if op_kind(grouped) != "view" or grouped_shape is None or len(grouped_shape) != 3 or grouped.args[0] is not scores:
        return "the groups are not a [tokens, groups, experts/groups] view of the scores"
    return scores, grouped_shape[1], topk_groups, rule, masked


def group_limit(choice: Node) -> tuple[Node, tuple[int, int, str], float | None] | str:
    """The scores under an optional DeepSeek group limit, (num_groups, topk_groups, group score
    rule) and the value the other groups are set to; (1, 1, "max") and None without one."""
    if op_kind(choice) != "masked_fill":
        return choice, (1, 1, "max"), None
    found = match_group_mask(choice)
    if isinstance(found, str):
        return found
    scores, num_groups, topk_groups, group_score, masked = found
    return scores, (num_groups, topk_groups, group_score), arg(masked, 2, "value")


def score_function(node: object) -> tuple[str, Node] | None:
    """``(scoring, logits)`` of a router's score function over the experts: softmax, sigmoid or
    ``sqrt(softplus(L))`` (DeepSeek-V4); None for anything else."""
    kind = op_kind(node) if isinstance(node, Node) else None
    if kind == "softmax" and is_last_dim(arg(node, 1, "dim"), len(shape(node) or (0, 0))):
        return "softmax", arg(node, 0, "input")
    if kind == "sigmoid" and len(node.args) == 1:
        return "sigmoid", node.args[0]
    if kind in ("fn:sqrt", "method:sqrt") and len(node.args) == 1:
        inner = node.args[0]
        default_softplus = arg(inner, 1, "beta", 1) == 1 and arg(inner, 2, "threshold", 20) == 20
        if op_kind(inner) in ("fn:softplus", "method:softplus") and default_softplus:
            return "sqrtsoftplus", inner.args[0]
    return None


_SAME_VALUES = frozenset({"cast", "method:detach"})  # (a cast widens scores or is a no-op in a router)


def scored_columns(scores: Node) -> tuple[Node, int | None]:
    """What ranked scores are read from: the score node behind casts and ``detach()`` (Zaya ranks
    ``probs.detach().float() + bias``), and the leading columns taken of it, None for all
    (Inkling ranks ``sigmoid(L)[..., :-S]``: its last S columns are its shared experts')."""
    node = strip(scores, _SAME_VALUES)
    sliced = leading_columns(node)
    return (node, None) if sliced is None else (strip(sliced[0], _SAME_VALUES), sliced[1])


def leading_columns(node: object) -> tuple[Node, int] | None:
    """``(x, n)`` when ``node`` is ``x[..., :n]`` of a 2-D ``x`` (also ``x[:, :n]``, or ``:-m`` for the
    first ``columns - m``), with ``0 < n < columns``; else None."""
    if op_kind(node) != "getitem" or len(node.args) != 2 or not isinstance(node.args[1], tuple):
        return None
    x, index = node.args
    x_shape = shape(x)
    if x_shape is None or len(x_shape) != 2 or len(index) != 2 or not isinstance(x_shape[1], int):
        return None
    rows, columns = index
    if rows is not Ellipsis and rows != slice(None) or not isinstance(columns, slice):
        return None
    if columns.start not in (None, 0) or columns.step not in (None, 1) or not isinstance(columns.stop, int):
        return None
    count = columns.stop if columns.stop >= 0 else x_shape[1] + columns.stop
    return (x, count) if 0 < count < x_shape[1] else None


def _chain(node: Node) -> set[Node]:
    """``node`` and what it is a cast, ``detach()`` or leading-column slice of (the same scores)."""
    found = set()
    while isinstance(node, Node) and node not in found:
        found.add(node)
        if op_kind(node) in _SAME_VALUES and node.args:
            node = node.args[0]
        elif leading_columns(node) is not None:
            node = node.args[0]
        else:
            break
    return found


def skip_class(weights: Node, ids: Node, classes: int) -> tuple[Node, Node] | str | None:
    """Zaya's free "skip" class: the router's last class (id ``classes - 1``) runs no expert, and the
    router masks it before its experts read the choice: ``skip = ids == classes - 1``,
    ``weights.masked_fill(skip, 0)``, ``ids.masked_fill(skip, 0)``. Returns the masked (weights, ids)
    as the experts read them ([tokens, k], after any reshape), None when the ids are not compared
    with the last class, or why the masking is not that."""
    tests = [u for u in ids.users if op_kind(u) in ("fn:eq", "method:eq") and u.args[0] is ids]
    if not tests:
        return None
    if len(tests) != 1 or tests[0].args[1:] != (classes - 1,):
        return f"the chosen ids are compared with something other than the last class ({classes - 1})"
    fills = {f.args[0]: f for f in tests[0].users if op_kind(f) == "masked_fill" and len(f.args) == 3
             and f.args[1] is tests[0] and f.args[2] in (0, 0.0) and not f.kwargs}
    if len(tests[0].users) != 2 or set(fills) != {weights, ids}:
        return f"choosing the last class ({classes - 1}) does not set exactly its weight and id to 0"
    flat = [_as_rows(fills[weights]), _as_rows(fills[ids])]
    if any(node is None for node in flat):
        return "the masked weights and ids are not viewed as [tokens, k] for the experts"
    return flat[0], flat[1]


def _as_rows(node: Node) -> Node | None:
    """``node`` if 2-D, else its one-user view chain's first 2-D view ([batch, seq, k] -> [tokens, k])."""
    while shape(node) is not None and len(shape(node)) != 2:
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is None or op_kind(user) != "view" or user.args[0] is not node:
            return None
        node = user
    return node if shape(node) is not None else None


def selection_bias(choice: Node, num_experts: int) -> tuple[Node, Node] | None:
    """``(x, bias)`` of ``x + bias`` where ``bias`` is a per-expert buffer (a cast or view of a
    parameter or buffer of ``num_experts`` entries, e.g. ERNIE's ``bias.squeeze()``)."""
    if op_kind(choice) != "add" or len(choice.args) != 2 or choice.kwargs:
        return None
    for x, bias in (choice.args, choice.args[::-1]):
        if (isinstance(x, Node) and isinstance(bias, Node) and is_param_source(strip(bias, {"cast", "view"}))
                and shape(bias) == (num_experts,)):
            return x, bias
    return None


def _fill_fits(fill: float | None, biased: bool) -> str | None:
    """Why a group limit's fill value can change the choice, or None. Filling the other groups
    with 0 leaves them last only under unbiased (positive) scores."""
    if fill is None or fill == float("-inf") or (fill == 0.0 and not biased):
        return None
    return f"a group limit that fills the other groups with {fill}, not -inf" + ("" if biased else " or 0")


def scored_outputs(topk: Node, scoring: str, columns: int | None, fill: float | None,
                   biased: bool) -> tuple[Node | None, Node] | str:
    """The top-k's (values or None, ids) once its scores are known, or why the choice they make
    is not one the selector can make: a softmax read in part, a group fill that can reorder."""
    if columns is not None and scoring == "softmax":
        return "the top-k ranks some columns of a softmax taken over more columns"
    misfit = _fill_fits(fill, biased)
    if misfit:
        return misfit
    return topk_outputs(topk, need_values=False)


def _build(pattern, topk, logits, weights, ids, top_k, rule, score_bias=None, **extra) -> RouterMatch | str:
    """The match, with the layer input found behind the logits. ``extra``: RouterMatch's optional
    fields (``selected_*``, ``ids_only``, ``logit_columns``, ``skip_class``)."""
    source = logits_source(logits, module_path(topk))
    if isinstance(source, str):
        return source
    root, aliases = source

    def stop(node: Node) -> bool:
        return node is logits or node.op in ("placeholder", "get_attr")

    nodes = (backward_region(weights, stop) or set()) | (backward_region(ids, stop) or set())
    classes = extra.get("logit_columns") or shape(logits)[-1]
    return RouterMatch(
        pattern=pattern, topk=topk, logits=logits, weights=weights, ids=ids, nodes=nodes, top_k=top_k,
        num_experts=classes - extra.get("skip_class", False), rule=rule, layer_input=root, hidden_aliases=aliases,
        score_bias=score_bias, module=module_path(topk), modules=module_stack(topk), **extra,
    )


# --- patterns ---------------------------------------------------------------------------

@router_pattern("softmax_topk")
def softmax_topk(topk: Node) -> RouterMatch | str:
    """softmax -> [+ selection bias] -> [group limit] -> top-k -> top-k values or the unbiased
    probabilities gathered at the chosen experts -> [renormalise] -> [scale].

    Mixtral, Qwen2/3-MoE, OLMoE (renormalised or not), DeepSeek-V2 (greedy or group-limited),
    Mistral-4 (group-limited, gathered), ERNIE-4.5 (a bias on the probabilities).
    """
    return scored_topk(topk, "softmax_topk", ("softmax",))


def topk_of_logits(topk: Node) -> tuple[Node, int, Node, Node] | str:
    """(logits, k, values, ids) of a top-k taken over the router logits themselves (GPT-OSS,
    Llama-4), its values used."""
    parsed = topk_args(topk)
    if isinstance(parsed, str):
        return parsed
    logits, k = parsed
    if op_kind(strip(logits)) != "linear":
        return f"top-k input is {op_kind(strip(logits))}, not router logits"
    outputs = topk_outputs(topk, need_values=True)
    if isinstance(outputs, str):
        return outputs
    return (logits, k, *outputs)


@router_pattern("topk_softmax")
def topk_softmax(topk: Node) -> RouterMatch | str:
    """top-k of the logits -> softmax over those k (GPT-OSS)."""
    found = topk_of_logits(topk)
    if isinstance(found, str):
        return found
    logits, k, values, ids = found
    users = list(values.users)
    if any(op_kind(u) == "scatter" for u in users):  # transformers' Llama-4: router_dense.py
        return "the top-k values are scattered into a [tokens, experts] matrix (dense routing)"
    if len(users) != 1 or op_kind(users[0]) != "softmax" or not is_last_dim(arg(users[0], 1, "dim"), 2):
        return "the top-k values are not turned into weights by a softmax over the k"
    rule = RouterRule("softmax", True, True)
    return _build("topk_softmax", topk, logits, users[0], ids, k, rule)


@router_pattern("sigmoid_topk")
def sigmoid_topk(topk: Node) -> RouterMatch | str:
    """sigmoid or sqrt-softplus -> [+ selection bias] -> [group limit] -> top-k -> gather the
    unbiased scores -> [renormalise] -> [scale] (DeepSeek-V3/V4, GLM-4.5 and other sigmoid routers)."""
    return scored_topk(topk, "sigmoid_topk", ("sigmoid", "sqrtsoftplus"))


def ranked_choice(topk: Node, max_dims: int = 2):
    """What a router's top-k ranks: ``(choice, group, fill, k, biased)`` with the choice under an
    optional group limit (``group_limit``) and ``biased`` its ``(x, bias)`` split if it adds a
    per-expert bias (``selection_bias``), else None; or why the top-k is not a router's."""
    parsed = topk_args(topk, max_dims)
    if isinstance(parsed, str):
        return parsed
    if len(shape(parsed[0])) != 2 and op_kind(parsed[0]) == "masked_fill":
        return "the top-k ranks masked [batch, seq, experts] scores (group limits are read on [tokens, experts])"
    limited = group_limit(parsed[0])
    if isinstance(limited, str):
        return limited
    choice, group, fill = limited
    return choice, group, fill, parsed[1], selection_bias(choice, shape(parsed[0])[-1])


def scored_topk(topk: Node, pattern: str, scorings: tuple[str, ...]) -> RouterMatch | str:
    """A router that scores the experts, ranks by the scores (plus a selection bias) and weighs
    by the unbiased scores of the chosen experts; the scores may be [batch, seq, experts] and
    their last class a free skip choice (Zaya: ``skip_class``)."""
    ranked = ranked_choice(topk, max_dims=3)
    if isinstance(ranked, str):
        return ranked
    choice, group, fill, k, biased = ranked
    ndim = len(shape(choice))
    scores, bias = biased or (choice, None)
    source, columns = scored_columns(scores)
    found = score_function(source)
    if found is None or found[0] not in scorings:
        if op_kind(choice) == "add" and biased is None and score_function(choice.args[0]) is not None:
            return "the selection scores add something other than a per-expert bias buffer"
        return f"top-k input is {op_kind(source)}, not {' or '.join(scorings)} scores"
    scoring, logits = found
    outputs = scored_outputs(topk, scoring, columns, fill, bias is not None)
    if isinstance(outputs, str):
        return outputs
    values, ids = outputs
    if values is not None and bias is not None:
        return "top-k values of biased scores are used as weights"
    if values is not None:  # no bias: the top-k values are the chosen scores (inside the allowed groups)
        chosen = values
    else:
        same = _chain(scores)
        gathers = [u for u in ids.users if op_kind(u) == "gather" and u.args[0] in same]
        if len(gathers) != 1 or not is_last_dim(arg(gathers[0], 1, "dim"), ndim):
            return "the weights are not the router's scores gathered at the chosen experts"
        chosen = gathers[0]
    transformed = weight_transforms(chosen, ndim)
    if isinstance(transformed, str):
        return transformed
    weights, renormalize, scale = transformed
    rule = RouterRule(scoring, renormalize, False, *group, scale)
    extra = {"logit_columns": columns}
    skip = skip_class(weights, ids, shape(choice)[-1])
    if isinstance(skip, str):
        return skip
    if skip is not None:
        if rule.grouped:
            return "a skip class under a group limit"
        extra.update(selected_weights=weights, selected_ids=ids, skip_class=True)
        weights, ids = skip
    elif ndim != 2:
        return (f"the router's choice is {ndim}-D ({shape(choice)}): only a router with a skip class is read "
                "as [batch, seq, experts]")
    return _build(pattern, topk, logits, weights, ids, k, rule, score_bias=bias, **extra)


@router_pattern("logit_bias_topk")
def logit_bias_topk(topk: Node) -> RouterMatch | str:
    """top-k of ``logits + selection bias`` -> score the unbiased logits of the chosen experts
    (``sigmoid(L.gather(ids))`` or ``score(L).gather(ids)``) -> [renormalise] -> [scale] (Kolibri)."""
    ranked = ranked_choice(topk)
    if isinstance(ranked, str):
        return ranked
    choice, group, fill, k, biased = ranked
    if biased is None:
        return "top-k input is not logits plus a per-expert bias"
    logits, bias = biased
    if score_function(logits) is not None:
        return "the bias is added to scores, not to logits"
    if isinstance(logits_source(logits), str):
        return f"top-k input adds a bias to {op_kind(logits)}, not to router logits"
    if fill is not None and fill != float("-inf"):
        return f"a group limit that fills the other groups with {fill}, not -inf"
    outputs = topk_outputs(topk, need_values=False)
    if isinstance(outputs, str):
        return outputs
    values, ids = outputs
    if values is not None:
        return "top-k values of biased logits are used as weights"
    chosen = _scored_gather(logits, ids)
    if isinstance(chosen, str):
        return chosen
    scoring, scored = chosen
    transformed = weight_transforms(scored)
    if isinstance(transformed, str):
        return transformed
    weights, renormalize, scale = transformed
    rule = RouterRule(scoring, renormalize, False, *group, scale, bias_on_logits=True)
    return _build("logit_bias_topk", topk, logits, weights, ids, k, rule, score_bias=bias)


def _scored_gather(logits: Node, ids: Node) -> tuple[str, Node] | str:
    """(scoring, node) of the chosen experts' scores: ``score(L.gather(ids))`` with sigmoid or
    sqrt-softplus (a softmax over the chosen logits alone would be GPT-OSS's rule, which has no
    bias), or ``score(L).gather(ids)``."""
    gathers = [u for u in ids.users if op_kind(u) == "gather" and is_last_dim(arg(u, 1, "dim"), 2)]
    if len(gathers) != 1:
        return "the weights are not the router's scores gathered at the chosen experts"
    gather = gathers[0]
    if gather.args[0] is logits and len(gather.users) == 1:
        found = score_function(next(iter(gather.users)))
        if found is not None and found[0] != "softmax" and found[1] is gather:
            return found[0], next(iter(gather.users))
    found = score_function(gather.args[0])
    if found is not None and found[1] is logits:
        return found[0], gather
    return "the weights are not the scores of the chosen experts' unbiased logits"


@router_pattern("sparsemixer", root="method:max")
def sparsemixer(first_max: Node) -> RouterMatch | str:
    """Phi-3.5-MoE's sparsemixer at inference: the best logit (``max``), then the best of the rest
    (``scatter`` -inf, ``max``); each weight a softmax over the logits within ``2 * jitter_eps``
    (relative) of the chosen one; ``cat`` of the two. ``first_max`` is the first max."""
    logits = first_max.args[0] if first_max.args else None
    if (not isinstance(logits, Node) or shape(logits) is None or len(shape(logits)) != 2
            or not is_last_dim(arg(first_max, 1, "dim"), 2) or not arg(first_max, 2, "keepdim", False)):
        return "not a max over the experts of [tokens, experts] logits"
    first = _max_outputs(first_max)
    if isinstance(first, str):
        return first
    threshold, first_id = first
    masked = [u for u in first_id.users if op_kind(u) == "fn:scatter" and u.args[0] is logits]
    if len(masked) != 1 or tuple(masked[0].args[1:]) != (-1, first_id, float("-inf")):
        return "the first choice is not removed by scatter(logits, -1, ids, -inf)"
    second_maxes = [u for u in masked[0].users if op_kind(u) == "method:max"]
    second = _max_outputs(second_maxes[0]) if len(second_maxes) == 1 else "no max over the rest"
    if isinstance(second, str):
        return second
    eps = set()
    weights = []
    for scores, (bound, chosen) in ((logits, first), (masked[0], second)):
        found = _window_weight(logits, scores, bound, chosen)
        if isinstance(found, str):
            return found
        eps.add(found[0])
        weights.append(found[1])
    if len(eps) != 1:
        return "the two windows differ"
    cats = [_cat_of(weights), _cat_of([first_id, second[1]])]
    if any(isinstance(c, str) for c in cats):
        return next(c for c in cats if isinstance(c, str))
    rule = RouterRule("sparsemixer", False, jitter_eps=eps.pop() / 2)
    return _build("sparsemixer", first_max, logits, cats[0], cats[1], 2, rule)


def _max_outputs(node: Node) -> tuple[Node, Node] | str:
    outs = tuple_outputs(node)
    if not is_last_dim(arg(node, 1, "dim"), 2) or not arg(node, 2, "keepdim", False) or set(outs) != {0, 1}:
        return "a max whose values and indices are not both used"
    return outs[0], outs[1]


def _window_weight(logits: Node, scores: Node, bound: Node, chosen: Node) -> tuple[float, Node] | str:
    """``softmax(scores.masked_fill((bound - logits) / logits.abs().clamp(min=bound) > c, -inf))
    .gather(-1, chosen)``: (c, the gathered weight)."""
    fills = [u for u in scores.users if op_kind(u) == "masked_fill" and u.args[0] is scores
             and arg(u, 2, "value") == float("-inf")]
    for fill in fills:
        test = arg(fill, 1, "mask")
        if op_kind(test) != "fn:gt" or _const(test.args[1]) is None:
            continue
        ratio = test.args[0]
        if op_kind(ratio) != "div" or op_kind(ratio.args[0]) != "sub" or op_kind(ratio.args[1]) != "clamp":
            continue
        difference, factor = ratio.args
        magnitude = factor.args[0]
        if (difference.args != (bound, logits) or op_kind(magnitude) != "method:abs" or magnitude.args[0] is not logits
                or arg(factor, 1, "min") is not bound or arg(factor, 2, "max") is not None):
            continue
        probs = [u for u in fill.users if op_kind(u) == "softmax" and is_last_dim(arg(u, 1, "dim"), 2)]
        gathers = [u for p in probs for u in p.users if op_kind(u) == "gather"]
        if len(probs) == 1 and len(gathers) == 1 and arg(gathers[0], 2, "index") is chosen \
                and is_last_dim(arg(gathers[0], 1, "dim"), 2):
            return _const(test.args[1]), gathers[0]
    return "a sparsemixer weight is not a softmax over a relative window around the chosen logit"


def _cat_of(parts: list[Node]) -> Node | str:
    users = [u for u in parts[0].users if op_kind(u) == "fn:concat" or op_kind(u) == "fn:cat"]
    if len(users) != 1 or list(arg(users[0], 0, "tensors")) != parts or not is_last_dim(arg(users[0], 1, "dim"), 2):
        return "the two choices are not concatenated over the last dim"
    return users[0]


@router_pattern("hash_routing", root="getitem")
def hash_routing(lookup: Node) -> RouterMatch | str:
    """DeepSeek-V4's hash-routed layers: ``ids = table[token_ids]`` (a static [vocab, k] table),
    weights = the router's scores gathered there. Recognised only to say why it stays."""
    table, index = (lookup.args + (None, None))[:2]
    table_shape = shape(table)
    if not (is_param_source(table) and table_shape is not None and len(table_shape) == 2
            and dtype(table) in (torch.int32, torch.int64) and isinstance(index, Node)
            and dtype(index) in (torch.int32, torch.int64)):
        return "not a lookup in an integer [vocab, k] table"
    ids = cast_chain_end(lookup)
    if not any(op_kind(u) == "gather" and score_function(u.args[0]) is not None for u in ids.users):
        return "the looked-up ids do not pick router scores"
    vocab, k = table_shape
    return Refusal(f"each token's {k} experts are read from a static [{vocab}, {k}] token-id table "
                   "(table[token ids]), not ranked by scores: there is nothing for a batch-aware "
                   "selection to rank")

"""Ids-only router matches: the selector chooses the experts, the router's own formula weighs them.

A router whose top-k ranks scores lynx knows (``score(L)``, optionally plus a selection bias,
under a group limit, over the leading columns of the logits) but weighs the chosen experts by a
formula lynx's ops do not return (Inkling normalises the routed weights together with its shared
experts' gates) is rewritten at its top-k alone: the selector's ids replace ``topk(...)[1]``,
whose values must be unused, and the graph's own weight formula, which reads the ids, stays as it
is. The weights are then the model's own formula at the chosen experts (ALGORITHM.md step 7),
whatever that formula is. The patterns that replace the weights as well come first
(``routers.py``); this one is registered after them.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..selector import RouterRule
from .graph_utils import dtype, module_path, module_stack, op_kind, same_sizes, shape
from .routers import (
    RouterMatch,
    _build,
    ranked_choice,
    router_pattern,
    score_function,
    scored_columns,
    scored_outputs,
)


@router_pattern("scored_ids")
def scored_ids(topk: Node) -> RouterMatch | str:
    """score -> [+ selection bias] -> [group limit] -> top-k, its indices only -> the router's own weights."""
    ranked = ranked_choice(topk)
    if isinstance(ranked, str):
        return ranked
    choice, group, fill, k, biased = ranked
    scores, bias = biased or (choice, None)
    source, columns = scored_columns(scores)
    found = score_function(source)
    if found is None:
        return f"top-k input is {op_kind(source)}, not scores of router logits"
    scoring, logits = found
    outputs = scored_outputs(topk, scoring, columns, fill, bias is not None)
    if isinstance(outputs, str):
        return outputs
    values, ids = outputs
    if values is not None:
        return "the top-k values are used (an ids-only rewrite replaces the indices alone)"
    weights = routed_weights(topk, ids)
    if isinstance(weights, str):
        return weights
    rule = RouterRule(scoring, False, False, *group)  # (the op's own weights go unused)
    return _build("scored_ids", topk, logits, weights, ids, k, rule, score_bias=bias, ids_only=True,
                  logit_columns=columns)


def routed_weights(topk: Node, ids: Node) -> Node | str:
    """The [tokens, k] weights the experts read beside the ids: made inside the router's module
    from the ids, and read outside it by the module that reads the ids (the experts; Inkling's
    shared experts' gates, made alike, go to another module)."""
    router = module_path(topk)
    if not router:
        return "the router is not a module of its own: its weights cannot be told from its other outputs"

    def inside(node: Node) -> bool:
        return router in module_stack(node)

    made, todo = set(), [ids]
    while todo:
        node = todo.pop()
        if node not in made:
            made.add(node)
            todo.extend(u for u in node.users if inside(u))
    readers = {module_path(u) for n in made if dtype(n) in (torch.int32, torch.int64) for u in n.users if not inside(u)}
    if not readers:
        return "the chosen ids are not read outside the router"
    candidates = [n for n in made if _is_float(n) and same_sizes(shape(n), shape(ids))
                  and any(not inside(u) and module_path(u) in readers for u in n.users)]
    if len(candidates) != 1:
        return (f"{len(candidates)} [tokens, k] tensors made from the chosen ids are read where the ids are "
                f"({', '.join(sorted(readers)) or '-'}), not one set of weights")
    return candidates[0]


def _is_float(node: Node) -> bool:
    value_type = dtype(node)
    return value_type is not None and value_type.is_floating_point

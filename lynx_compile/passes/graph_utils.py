"""Small helpers for reading dynamo FX graphs: op kinds, shapes, module paths, regions."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Surface forms dynamo leaves in a graph, folded into one kind name per op.
_FUNCTION_KINDS: dict[object, str] = {
    torch.topk: "topk",
    torch.sort: "sort",
    torch.argsort: "sort",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.histc: "histc",
    torch.bincount: "bincount",
    torch.cumsum: "cumsum",
    torch.sum: "sum",
    torch.empty_like: "empty_like",
    torch.zeros_like: "zeros_like",
    torch.arange: "arange",
    torch.chunk: "chunk",
    torch.bmm: "bmm",
    torch.matmul: "matmul",
    torch.einsum: "einsum",
    torch.functional.einsum: "einsum",
    torch.gather: "gather",
    torch.index_select: "index_select",
    torch.repeat_interleave: "repeat_interleave",
    torch.transpose: "transpose",
    torch.reshape: "view",
    torch.squeeze: "view",
    torch.unsqueeze: "view",
    torch.masked_fill: "masked_fill",
    torch.clamp: "clamp",
    F.linear: "linear",
    F.silu: "silu",
    F.gelu: "gelu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.square: "square",
    operator.pow: "pow",
    torch.pow: "pow",
    operator.getitem: "getitem",
    operator.setitem: "setitem",
    operator.mul: "mul",
    operator.imul: "mul",
    torch.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    torch.div: "div",
    operator.add: "add",
    operator.iadd: "add",
    torch.add: "add",
    operator.sub: "sub",
    operator.floordiv: "floordiv",
    operator.ge: "ge",
    torch.ge: "ge",
    operator.ne: "ne",
    torch.ne: "ne",
    operator.mod: "mod",
    torch.remainder: "mod",
    torch.where: "where",
    operator.neg: "neg",
}
if hasattr(torch, "_grouped_mm"):
    _FUNCTION_KINDS[torch._grouped_mm] = "grouped_mm"
if hasattr(F, "grouped_mm"):
    _FUNCTION_KINDS[F.grouped_mm] = "grouped_mm"

# Operators called through torch.ops, by qualified name (no import of their libraries needed).
_OPERATOR_KINDS = {
    "transformers::grouped_mm_fallback": "grouped_mm",
    "aten::_grouped_mm": "grouped_mm",
    "lynx::select_experts": "lynx_select",
    "lynx::grouped_experts": "lynx_experts",
    # Collectives as dynamo records them (torch.distributed's functional collectives).
    "_c10d_functional::all_reduce": "collective",
    "_c10d_functional::all_reduce_": "collective",
    "_c10d_functional::all_gather_into_tensor": "collective",
    "_c10d_functional::reduce_scatter_tensor": "collective",
    "_c10d_functional::all_to_all_single": "collective",
    "_c10d_functional::broadcast": "collective",
    "_c10d_functional::wait_tensor": "wait_tensor",
}

_METHOD_KINDS = {
    "float": "cast", "to": "cast", "type": "cast", "int": "cast", "long": "cast",
    "half": "cast", "bfloat16": "cast", "bool": "cast", "type_as": "cast",
    "view": "view", "reshape": "view", "contiguous": "view", "unsqueeze": "view",
    "squeeze": "view", "flatten": "view", "expand": "view",
    "transpose": "transpose", "t": "transpose", "permute": "transpose",
    "clamp_": "clamp", "clamp": "clamp", "masked_fill_": "masked_fill",
    "masked_fill": "masked_fill", "index_add_": "index_add", "sum": "sum", "softmax": "softmax",
    "sigmoid": "sigmoid", "topk": "topk", "sort": "sort", "argsort": "sort", "chunk": "chunk",
    "cumsum": "cumsum", "histc": "histc", "bincount": "bincount", "gather": "gather",
    "repeat_interleave": "repeat_interleave", "div_": "div", "div": "div", "mul": "mul",
    "mul_": "mul", "add": "add", "add_": "add", "ge": "ge", "new_zeros": "zeros_like",
    "scatter": "scatter", "scatter_": "scatter", "index_select": "index_select",
    "ne": "ne", "remainder": "mod", "to_local": "to_local", "tanh": "tanh", "square": "square", "pow": "pow",
    "relu": "relu",
}

# Ops that only move, view or re-type data: a region may hold any number of them.
LAYOUT_KINDS = frozenset({"cast", "view", "transpose", "getitem"})


def is_param_source(node: object) -> bool:
    """A graph input holding weights: a placeholder or attribute, or the local shard of a DTensor
    one (``param.to_local()``, as transformers' tensor- and expert-parallel styles swap them in)."""
    if not isinstance(node, Node):
        return False
    if op_kind(node) == "to_local" and node.args and not node.kwargs:
        node = node.args[0]
    return isinstance(node, Node) and node.op in ("placeholder", "get_attr")


def op_kind(node: Node) -> str:
    """A short name for what ``node`` computes (``"topk"``, ``"mul"``, ``"grouped_mm"``...)."""
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target)
        if kind is not None:
            return kind
        qualified = getattr(node.target, "_qualified_op_name", None) or _overload_name(node.target)
        if qualified in _OPERATOR_KINDS:
            return _OPERATOR_KINDS[qualified]
        return f"fn:{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, f"method:{node.target}")
    return node.op


def _overload_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    return None


def example_value(node: object):
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: object) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_size_value(node: object) -> bool:
    """A (symbolic) scalar from size arithmetic, such as ``s0 * s1`` in a dynamic graph."""
    return isinstance(example_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def same_size(a, b) -> bool:
    """Sizes equal for sure (symbolic sizes compared without adding guards)."""
    return statically_known_true(a == b)


def same_sizes(a: tuple | None, b: tuple) -> bool:
    return a is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def dtype(node: object) -> torch.dtype | None:
    value = example_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def arg(node: Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_last_dim(dim, ndim: int) -> bool:
    return dim in (-1, ndim - 1)


_PATH_PREFIX = re.compile(r"^[LG]\['[^']*'\]\.?")  # dynamo's roots: a local (self) or a global


def _normalize_path(path: str) -> str:
    path = _PATH_PREFIX.sub("", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return re.sub(r"\.+", ".", path).strip(".")


def module_stack(node: Node) -> dict[str, str]:
    """Enclosing modules of ``node``, outermost first: dotted path -> class name."""
    stack = node.meta.get("nn_module_stack") or {}
    return {_normalize_path(path): getattr(cls, "__name__", str(cls)) for path, cls in stack.values()}


def module_classes(node: Node) -> dict[str, object]:
    """Enclosing modules of ``node``: dotted path -> class (as dynamo recorded it)."""
    stack = node.meta.get("nn_module_stack") or {}
    return {_normalize_path(path): cls for path, cls in stack.values()}


def module_path(node: Node) -> str:
    """Dotted path of the innermost module that produced ``node`` (``model.layers.3.mlp.gate``)."""
    paths = list(module_stack(node))
    return paths[-1] if paths else ""


def common_module(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


def strip(node: object, kinds: frozenset[str] | set[str] = frozenset({"cast"})) -> object:
    """Follow ``node`` back through single-input ops of the given kinds."""
    while isinstance(node, Node) and op_kind(node) in kinds and node.args:
        node = node.args[0]
    return node


def cast_chain_end(node: Node) -> Node:
    """``node`` followed through single-user dtype casts (a router's ``.to(dtype)``)."""
    while len(node.users) == 1 and op_kind(next(iter(node.users))) == "cast":
        node = next(iter(node.users))
    return node


def single_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def tuple_outputs(node: Node) -> dict[int, Node]:
    """``getitem`` users of a tuple-returning node, by index."""
    return {
        user.args[1]: user
        for user in node.users
        if op_kind(user) == "getitem" and isinstance(user.args[1], int)
    }


_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def mutates(node: Node, target: Node) -> bool:
    """Whether ``node`` writes into ``target`` in place (``x[i] = v``, ``x.clamp_()``, ``x /= y``)."""
    if not node.args or node.args[0] is not target:
        return False
    if node.op == "call_function":
        return node.target in _INPLACE_OPERATORS
    return node.op == "call_method" and node.target.endswith("_")


def backward_region(output: Node, stop: Callable[[Node], bool], limit: int = 400) -> set[Node] | None:
    """Nodes ``output`` depends on, walking back until ``stop``; None past ``limit`` nodes.

    A node that writes into a region node in place is part of the region too. Size
    arithmetic (non-tensor values, shared with the rest of a dynamic-shape graph) is not.
    """
    region: set[Node] = set()
    todo = [output]
    while todo:
        node = todo.pop()
        if node in region or stop(node) or is_size_value(node):
            continue
        region.add(node)
        if len(region) > limit:
            return None
        todo.extend(node.all_input_nodes)
        todo.extend(u for u in node.users if mutates(u, node))
    return region


def region_inputs(region: set[Node]) -> list[Node]:
    seen: dict[Node, None] = {}
    for node in region:
        for inp in node.all_input_nodes:
            if inp not in region:
                seen[inp] = None
    return list(seen)


def escaping_nodes(region: set[Node], output: Node) -> list[Node]:
    """Region nodes other than ``output`` that something outside the region still uses."""
    return [n for n in region if n is not output and any(u not in region for u in n.users)]


def erase_dead(graph: torch.fx.Graph, candidates: Iterable[Node]) -> None:
    """Erase the candidates nothing outside them uses any more (in-place writers go with
    the tensor they write into)."""
    dead = set(candidates)
    changed = True
    while changed:
        changed = False
        for node in list(dead):
            target = node.args[0] if node.args else None
            writes_into_live = isinstance(target, Node) and mutates(node, target) and target not in dead
            alive = writes_into_live or any(u not in dead for u in node.users)
            if alive:
                dead.discard(node)
                changed = True
    erase_nodes(graph, dead)


def erase_nodes(graph: torch.fx.Graph, nodes: Iterable[Node]) -> None:
    """Erase ``nodes`` (which must have no users left outside the set), last first."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        graph.erase_node(node)

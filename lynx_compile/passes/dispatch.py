"""Experts dispatch patterns: the subgraph that runs the chosen experts for each token.

Each pattern is one function ``(graph, RouterMatch) -> DispatchMatch | reason`` registered in
``DISPATCH_PATTERNS``. A match is the whole region between the router outputs (and the
layer's hidden states) and the per-token combined output, checked op by op: anything the
pattern does not account for (a bias, a post-expert norm, an unknown activation) rejects
the match, so lynx never replaces computation it does not understand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node

from .graph_utils import (
    LAYOUT_KINDS,
    arg,
    backward_region,
    dtype,
    escaping_nodes,
    is_size_value,
    module_path,
    op_kind,
    region_inputs,
    same_size,
    same_sizes,
    shape,
    strip,
)
from .routers import RouterMatch


@dataclass
class DispatchMatch:
    pattern: str
    output: Node  # its uses take the experts op's output
    region: set[Node]  # nodes the experts op replaces (output included)
    hidden: Node  # [tokens, hidden]
    ids: Node
    weights: Node
    w_gate_up: Node
    w_down: Node
    activation: str
    layout: str  # see kernels/experts_ref.py
    module: str
    w_up: Node | None = None
    b_gate_up: Node | None = None
    b_down: Node | None = None
    activation_args: tuple[float, ...] = ()


DispatchPattern = Callable[[Graph, RouterMatch], "DispatchMatch | str"]
DISPATCH_PATTERNS: dict[str, DispatchPattern] = {}


def dispatch_pattern(name: str):
    def register(fn: DispatchPattern) -> DispatchPattern:
        DISPATCH_PATTERNS[name] = fn
        return fn

    return register


def match_dispatch(graph: Graph, router: RouterMatch) -> DispatchMatch | str:
    reasons = []
    for name, pattern in DISPATCH_PATTERNS.items():
        found = pattern(graph, router)
        if isinstance(found, DispatchMatch):
            return found
        reasons.append(f"{name}: {found}")
    return "; ".join(reasons)


ACTIVATION_KINDS = {"silu": "silu", "relu": "relu", "gelu": "gelu"}


def activation_name(node: Node) -> str | None:
    name = ACTIVATION_KINDS.get(op_kind(node))
    if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return name


def cast_chain_end(node: Node) -> Node:
    """``node`` followed through single-user dtype casts (the router's ``.to(dtype)``)."""
    while len(node.users) == 1 and op_kind(next(iter(node.users))) == "cast":
        node = next(iter(node.users))
    return node


def find_slot_sum(start: Node, num_tokens: int, top_k: int, limit: int = 300) -> Node | None:
    """The first ``x.view(T, k, H).sum(dim=1)`` downstream of ``start``: the combine over k."""
    seen, todo, found = set(), [start], []
    while todo and len(seen) < limit:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if op_kind(node) == "sum" and arg(node, 1, "dim") == 1:
            src = shape(node.args[0])
            if src is not None and len(src) == 3 and same_sizes(src[:2], (num_tokens, top_k)):
                found.append(node)
        todo.extend(node.users)
    if not found:
        return None
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return min(found, key=order.__getitem__)


def expert_region(router: RouterMatch, output: Node) -> tuple[set[Node], Node, Node, Node] | str:
    """The dispatch region ending at ``output``: (region, hidden, ids, weights) inputs."""
    ids, weights = cast_chain_end(router.ids), cast_chain_end(router.weights)
    boundary = {ids, weights} | router.hidden_aliases

    def stop(node: Node) -> bool:
        return node in boundary or node.op in ("placeholder", "get_attr")

    region = backward_region(output, stop)
    if region is None:
        return "the experts computation is not a self-contained region"
    hidden = [n for n in region_inputs(region) if n in router.hidden_aliases]
    outside = [
        n for n in region_inputs(region)
        if n not in boundary and n.op not in ("placeholder", "get_attr") and not is_size_value(n)
    ]
    if outside:
        return f"the experts computation also reads {outside[0].name}"
    if len(hidden) != 1 or shape(hidden[0]) is None or len(shape(hidden[0])) != 2:
        return "the experts do not read the layer input as one [tokens, hidden] tensor"
    escaping = escaping_nodes(region, output)
    if escaping:
        return f"an intermediate of the experts computation ({escaping[0].name}) is used elsewhere"
    return region, hidden[0], ids, weights


def _combine_output(slot_sum: Node, hidden: Node) -> Node | None:
    """The slot sum, or its single cast back to the hidden dtype when the sum was wider."""
    if dtype(slot_sum) == dtype(hidden):
        return slot_sum
    users = list(slot_sum.users)
    if len(users) == 1 and op_kind(users[0]) == "cast" and dtype(users[0]) == dtype(hidden):
        return users[0]
    return None


def _weight_param(mm: Node) -> tuple[Node, int]:
    """The parameter behind a grouped mm's weight operand, and how many transposes it went through."""
    node, transposes = mm.args[1] if len(mm.args) > 1 else None, 0
    while isinstance(node, Node) and op_kind(node) in ("transpose", "cast", "view"):
        transposes += op_kind(node) == "transpose"
        node = node.args[0]
    return node, transposes


def _is_sentinel_mask(node: Node, num_experts: int) -> bool:
    """``x.masked_fill(ids >= E, 0)``: transformers' expert-parallel guard, a no-op here."""
    mask = strip(arg(node, 1, "mask"), LAYOUT_KINDS)
    return (
        op_kind(mask) == "ge"
        and mask.args[1] == num_experts
        and arg(node, 2, "value") in (0, 0.0)
    )


def _is_half(node: Node, chunk: Node, index: int) -> bool:
    return op_kind(node) == "getitem" and node.args[0] is chunk and node.args[1] == index


# Ops that only compute the token permutation and group offsets (no arithmetic on values).
_BOOKKEEPING = frozenset({
    "sort", "floordiv", "histc", "bincount", "cumsum", "empty_like", "zeros_like", "arange",
    "setitem", "ge", "clamp", "index_select", "gather", "scatter",
})


@dispatch_pattern("hf_grouped_mm")
def hf_grouped_mm(graph: Graph, router: RouterMatch) -> DispatchMatch | str:
    """transformers' default experts path: sort by expert, two grouped GEMMs, combine."""
    num_tokens, top_k, num_experts = shape(router.logits)[0], router.top_k, router.num_experts
    slot_sum = find_slot_sum(router.ids, num_tokens, top_k)
    if slot_sum is None:
        return "no per-token sum over the k expert outputs follows the router"
    found = expert_region(router, slot_sum)
    if isinstance(found, str):
        return found
    region, hidden, ids, weights = found
    output = _combine_output(slot_sum, hidden)
    if output is None:
        return "the combined experts output is not cast back to the hidden dtype"
    if output is not slot_sum:
        region.add(output)
        if escaping_nodes(region, output):
            return "the slot sum is used before its cast back to the hidden dtype"

    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    kinds = Counter(op_kind(n) for n in nodes)
    act_nodes = [n for n in nodes if activation_name(n)]
    unexpected = [
        n for n in nodes
        if op_kind(n) not in LAYOUT_KINDS | _BOOKKEEPING | {"grouped_mm", "mul", "sum", "chunk", "masked_fill"}
        and n not in act_nodes
    ]
    if unexpected:
        return f"unexpected {op_kind(unexpected[0])} ({unexpected[0].name}) in the experts computation"
    masks = [n for n in nodes if op_kind(n) == "masked_fill"]
    if any(not _is_sentinel_mask(n, num_experts) for n in masks):
        return "a masked_fill other than the expert-parallel sentinel guard"
    expected = {"grouped_mm": 2, "mul": 2, "sum": 1, "chunk": 1}
    for kind, count in expected.items():
        if kinds[kind] != count:
            return f"expected {count} {kind} op(s) in the experts computation, found {kinds[kind]}"
    if len(act_nodes) != 1:
        return f"expected one activation between the two GEMMs, found {len(act_nodes)}"

    first, second = [n for n in nodes if op_kind(n) == "grouped_mm"]
    (gate_up, t1), (down, t2) = _weight_param(first), _weight_param(second)
    if gate_up is None or down is None or (t1, t2) != (1, 1):
        return "grouped GEMM weights are not transposed views of the expert parameters"
    up_shape, down_shape, hidden_dim = shape(gate_up), shape(down), shape(hidden)[1]
    if (
        up_shape is None or down_shape is None or len(up_shape) != 3
        or up_shape[0] != num_experts or not same_size(up_shape[2], hidden_dim) or up_shape[1] % 2
        or not same_sizes(down_shape, (num_experts, hidden_dim, up_shape[1] // 2))
    ):
        return f"expert weights {up_shape} / {down_shape} are not the [E, 2I, H] / [E, H, I] layout"

    act = act_nodes[0]
    chunk = next(n for n in nodes if op_kind(n) == "chunk")
    if (
        strip(chunk.args[0], LAYOUT_KINDS | {"masked_fill"}) is not first
        or arg(chunk, 1, "chunks") != 2
        or arg(chunk, 2, "dim") not in (-1, 1)
    ):
        return "the gate/up split is not a 2-way split of the first GEMM's output"
    halves = {}
    for mul in (n for n in nodes if op_kind(n) == "mul"):
        operands = {strip(a, {"cast"}) for a in mul.args if isinstance(a, Node)}
        if act in operands:
            halves = {o for o in operands if o is not act}
    if not _is_half(strip(act.args[0], {"cast"}), chunk, 0) or not any(_is_half(h, chunk, 1) for h in halves):
        return "the experts do not compute act(gate) * up"
    return DispatchMatch(
        pattern="hf_grouped_mm",
        output=output,
        region=region,
        hidden=hidden,
        ids=ids,
        weights=weights,
        w_gate_up=gate_up,
        w_down=down,
        activation=activation_name(act),
        layout="gate_up_concat",
        module=module_path(first),
    )

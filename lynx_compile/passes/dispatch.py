"""Experts dispatch patterns: the subgraph that runs the chosen experts for each token.

Each pattern is one function ``(graph, RouterMatch) -> DispatchMatch | reason`` registered in
``DISPATCH_PATTERNS``. A match is the whole region between the router outputs (and the
layer's hidden states) and the per-token combined output, checked op by op: every node must
be accounted for as bookkeeping (permutations, offsets, views) or as one of the pattern's
pieces (two GEMMs, optional biases, the gated activation, a known post-expert norm
(``post_norms.py``), the routed weight, the sum over k). Anything else (an unknown norm or
activation...) rejects the match, so lynx never replaces computation it does not understand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.fx import Graph, Node

from ..kernels.experts_ref import LAYOUTS
from .gates import GATE_FORMS, GateMatch
from .graph_utils import (
    LAYOUT_KINDS,
    arg,
    backward_region,
    cast_chain_end,
    dtype,
    escaping_nodes,
    example_value,
    is_param_source,
    is_size_value,
    module_path,
    module_stack,
    op_kind,
    region_inputs,
    same_size,
    same_sizes,
    shape,
    strip,
)
from .post_norms import POST_NORM_FORMS, match_post_norm
from .routers import RouterMatch, guarded


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
    ep_rank: int = 0  # expert parallelism: this rank of ep_ranks owns experts [ep_rank * E/ep_ranks, ...)
    ep_ranks: int = 1  # 1: not expert-parallel (an EP-aware selector can read it from here)
    post_norm: str = "none"  # the norm of each expert output row before its weight (experts_ref.POST_NORMS)
    post_norm_weight: Node | None = None
    post_norm_args: tuple[float, ...] = ()


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
        found = guarded(pattern, graph, router)
        if isinstance(found, DispatchMatch):
            return found
        reasons.append(f"{name}: {found}")
    if any(u.op == "output" for u in cast_chain_end(router.ids).users):
        return ("the expert ids leave the graph: the experts run after a graph break. Either " + EAGER_EXPERTS_HINT
                + "; or expert parallelism exchanges tokens with all-to-all (transformers' ep_implementation="
                "'all_to_all'), whose split sizes are read back to the host: lynx rewrites the all-reduce form "
                "(ep_size == tp_size)")
    return "; ".join(reasons)


EAGER_EXPERTS_HINT = (
    "transformers' 'eager' experts implementation loops over experts with nonzero(), which "
    "graph-breaks, so no backend sees the experts. Fix: model.set_experts_implementation('grouped_mm') "
    "(or from_pretrained(..., experts_implementation='grouped_mm'))"
)


# --- region helpers ---------------------------------------------------------------------

def find_downstream(start: Node, accept: Callable[[Node], bool], limit: int = 300) -> Node | None:
    """The first node (in graph order) downstream of ``start`` that ``accept`` takes."""
    seen, todo, found = set(), [start], []
    while todo and len(seen) < limit:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if accept(node):
            found.append(node)
        todo.extend(node.users)
    if not found:
        return None
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return min(found, key=order.__getitem__)


def expert_region(router: RouterMatch, output: Node, routing: tuple[Node, Node] | None = None,
                  ) -> tuple[set[Node], Node, Node, Node] | str:
    """The dispatch region ending at ``output``: (region, hidden, ids, weights) inputs.

    ``routing``: the (ids, weights) the experts read when they are not the router's own
    (expert parallelism: this rank's local ids and masked weights, see ``expert_parallel_routing``).
    """
    ids, weights = routing or (cast_chain_end(router.ids), cast_chain_end(router.weights))
    boundary = {ids, weights} | router.hidden_aliases

    def stop(node: Node) -> bool:
        return node in boundary or is_param_source(node)

    region = backward_region(output, stop)
    if region is None:
        return "the experts computation is not a self-contained region"
    own = experts_own_inputs(region, output, boundary, ids)
    own_input = None
    if own is not None:  # the experts read their own copy of the tokens (Gemma-4)
        own_input, own_weights = own
        weights = own_weights or weights
        boundary |= {own_input, weights}
        region = backward_region(output, stop)
    collectives = [n for n in region if op_kind(n) in ("collective", "wait_tensor")]
    if collectives:
        return (f"a collective ({collectives[0].name}) runs inside the experts computation, before the routing "
                "weights are applied: lynx does not move collectives (reduce after the weighted sum over the k experts)")
    inputs = region_inputs(region)
    hidden = [n for n in inputs if n in router.hidden_aliases or n is own_input]
    outside = [n for n in inputs if n not in boundary and not is_param_source(n) and not is_size_value(n)]
    if outside:
        return f"the experts computation also reads {outside[0].name}"
    if len(hidden) != 1 or shape(hidden[0]) is None or len(shape(hidden[0])) != 2:
        return "the experts do not read the layer input as one [tokens, hidden] tensor"
    if weights not in inputs or ids not in inputs:
        return "the experts do not read the router's weights and ids"
    escaping = escaping_nodes(region, output)
    if escaping:
        return f"an intermediate of the experts computation ({escaping[0].name}) is used elsewhere"
    return region, hidden[0], ids, weights


def experts_own_inputs(region: set[Node], output: Node, boundary: set[Node], ids: Node,
                       ) -> tuple[Node, Node | None] | None:
    """(tokens, weights): the [tokens, hidden] tensor the experts module is called with when it is
    computed outside the module from the router's input, and the [tokens, k] weights it is called
    with when they are computed outside from the router's (None: the router's own). Gemma-4 routes
    the residual, feeds the experts ``pre_feedforward_layernorm_2`` of it and weighs them by
    ``weights * per_expert_scale[ids]``. The experts pair those rows with the router's ids as
    transformers' code does (same tokens, same order), so lynx's op reads the same tensors; the
    computation that makes them stays in the graph (reading the selector's ids and weights).
    None when the experts read the router's input itself."""
    experts = module_path(output)
    if not experts:
        return None
    inside = {n for n in region if experts in module_stack(n)}
    entries = [n for n in region_inputs(inside)
               if n not in boundary and not is_param_source(n) and not is_size_value(n)]
    if not entries or any(n not in region for n in entries):  # each made on the way from the router
        return None
    ids_shape = shape(ids)
    tokens = [n for n in entries if len(shape(n) or ()) == 2 and not same_sizes(shape(n), ids_shape)]
    weights = [n for n in entries if same_sizes(shape(n), ids_shape) and dtype(n) is not None and dtype(n).is_floating_point]
    if len(tokens) != 1 or len(tokens) + len(weights) != len(entries) or len(weights) > 1:
        return None
    if ids_shape is None or not same_size(shape(tokens[0])[0], ids_shape[0]):
        return None
    return tokens[0], (weights[0] if weights else None)


@dataclass
class ExpertParallelRouting:
    """transformers' all-reduce expert parallelism (``AllReduceEP``) on one rank: rank ``rank``
    owns experts ``[rank * local_experts, (rank + 1) * local_experts)``; other ranks' slots get
    the sentinel local id ``local_experts`` and weight 0."""

    ids: Node  # torch.where(off_rank, local_experts, ids % local_experts)
    weights: Node  # weights.masked_fill(off_rank, 0.0)
    local_experts: int
    rank: int


def expert_parallel_routing(router: RouterMatch) -> ExpertParallelRouting | str | None:
    """The rank's translation of the router's global ids into local ones, if the graph has it.

    ``off_rank = ids // L != rank; local = where(off_rank, L, ids % L); w = w.masked_fill(off_rank, 0)``.
    None when the ids are not divided into ranks; a reason when they are, but not in this form.
    """
    ids, weights = cast_chain_end(router.ids), cast_chain_end(router.weights)
    divisions = [u for u in ids.users if op_kind(u) == "floordiv" and u.args[0] is ids]
    if not divisions:
        return None
    local = divisions[0].args[1]
    num_experts = router.num_experts
    if len(divisions) != 1 or isinstance(local, bool) or not isinstance(local, int) or local < 1 or num_experts % local:
        return "the expert ids are divided by something other than a number of experts per rank"
    off_rank = [u for u in divisions[0].users if op_kind(u) == "ne" and u.args[0] is divisions[0]]
    remainders = [u for u in ids.users if op_kind(u) == "mod" and u.args[0] is ids and u.args[1] == local]
    if len(off_rank) != 1 or len(remainders) != 1 or set(ids.users) - router.nodes != {divisions[0], remainders[0]}:
        return "the expert ids are split into ranks other than as (ids // L != rank, ids % L)"
    rank = off_rank[0].args[1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_experts // local:
        return f"the rank of the expert-parallel split is not a constant in [0, {num_experts // local})"
    selects = [u for u in off_rank[0].users if op_kind(u) == "where"]
    masks = [u for u in off_rank[0].users if op_kind(u) == "masked_fill"]
    if (len(selects) != 1 or selects[0].args[1:] != (local, remainders[0]) or len(masks) != 1
            or masks[0].args[0] is not weights or arg(masks[0], 2, "value") not in (0, 0.0)
            or set(off_rank[0].users) != {selects[0], masks[0]}):
        return "off-rank slots are not given the sentinel id and weight 0 (where(off, L, ids % L), masked_fill(off, 0))"
    return ExpertParallelRouting(selects[0], masks[0], local, rank)


def shard_description(param: Node, local_shape: tuple) -> str:
    """How a DTensor parameter's local shard differs from the whole tensor, e.g. ``dim 1: 40 of 80``."""
    source = param.args[0] if op_kind(param) == "to_local" else param
    full = tuple(getattr(example_value(source), "shape", local_shape))
    return ", ".join(f"dim {d}: {a} of {b}" for d, (a, b) in enumerate(zip(local_shape, full)) if a != b)


def downstream_within(region: set[Node], sources: list[Node]) -> set[Node]:
    """Region nodes that depend on any of ``sources``."""
    found, todo = set(), [u for s in sources for u in s.users if u in region]
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(u for u in node.users if u in region)
    return found


def combine_output(slot_sum: Node, hidden: Node) -> Node | None:
    """The per-token sum, or its single cast back to the hidden dtype when the sum was wider."""
    if dtype(slot_sum) == dtype(hidden):
        return slot_sum
    users = list(slot_sum.users)
    if len(users) == 1 and op_kind(users[0]) == "cast" and dtype(users[0]) == dtype(hidden):
        return users[0]
    return None


def is_sentinel_mask(node: Node, num_experts: int) -> bool:
    """``x.masked_fill(ids >= E, 0)``: transformers' expert-parallel guard, a no-op here."""
    mask = strip(arg(node, 1, "mask"), LAYOUT_KINDS)
    return op_kind(mask) == "ge" and mask.args[1] == num_experts and arg(node, 2, "value") in (0, 0.0)


def expert_param(node: object, gathered: bool) -> tuple[Node | None, int]:
    """The [E, ...] parameter behind a GEMM operand, and how many transposes it went through.

    ``gathered``: the operand is ``param[expert_ids]`` (one matrix per row, batched_mm).
    """
    transposes = 0
    while isinstance(node, Node) and op_kind(node) in ("transpose", "cast", "view"):
        transposes += op_kind(node) == "transpose"
        node = node.args[0]
    if gathered:
        if op_kind(node) != "getitem" or not isinstance(node.args[1], Node):
            return None, transposes
        node = node.args[0]
    if not is_param_source(node) or len(shape(node) or ()) != 3:
        return None, transposes
    return node, transposes


# Ops that only compute the token permutation and group offsets (no arithmetic on values).
_BOOKKEEPING = frozenset({
    "sort", "floordiv", "histc", "bincount", "cumsum", "empty_like", "zeros_like", "arange",
    "setitem", "ge", "index_select", "gather", "scatter",
})


@dataclass
class _Gemm:
    node: Node
    param: Node
    transposed: bool  # weights stored [E, in, out] (x @ W) rather than [E, out, in] (x @ W.T)
    bias: Node | None = None
    bias_add: Node | None = None


def _gemms(nodes: list[Node]) -> list[_Gemm] | str:
    """The two expert GEMMs of transformers' grouped_mm or batched_mm experts path."""
    found = []
    for node in nodes:
        kind = op_kind(node)
        if kind == "grouped_mm":  # grouped_mm(x, W or W.T, offs): W.T is the nn.Linear layout
            param, transposes = expert_param(node.args[1], gathered=False)
            transposed = transposes == 0
        elif kind == "bmm":  # bmm(W[ids], x[..., None]) or bmm(x[:, None], W[ids]) (transposed)
            param, transposes = expert_param(node.args[0], gathered=True)
            transposed = False
            if param is None:
                param, transposes = expert_param(node.args[1], gathered=True)
                transposed = True
            if transposes:
                return "a batched expert GEMM reads transposed weights"
        else:
            continue
        if param is None:
            return f"the weights of {node.name} are not an [E, ., .] expert parameter"
        found.append(_Gemm(node, param, transposed))
    if len(found) != 2:
        return f"expected 2 expert GEMMs, found {len(found)}"
    return found


def _bias_of(gemm: _Gemm, nodes: list[Node]) -> str | None:
    """Attach ``out.add_(bias[expert_ids])`` following a GEMM (GPT-OSS); returns a reason on failure."""
    adds = [n for n in nodes if op_kind(n) == "add" and strip(n.args[0], LAYOUT_KINDS) is gemm.node]
    if not adds:
        return None
    if len(adds) > 1:
        return f"more than one addition to {gemm.node.name}"
    bias, _ = expert_param(adds[0].args[1], gathered=True) if isinstance(adds[0].args[1], Node) else (None, 0)
    if bias is None:
        bias = _gathered_param_2d(adds[0].args[1])
    if bias is None:
        return f"{gemm.node.name} adds something other than a per-expert bias"
    gemm.bias, gemm.bias_add = bias, adds[0]
    return None


def _gathered_param_2d(node: object) -> Node | None:
    node = strip(node, {"cast", "view"})
    if op_kind(node) != "getitem" or not isinstance(node.args[1], Node):
        return None
    param = node.args[0]
    ok = is_param_source(param) and len(shape(param) or ()) == 2
    return param if ok else None


@dispatch_pattern("hf_experts")
def hf_experts(graph: Graph, router: RouterMatch) -> DispatchMatch | str:
    """transformers' ``grouped_mm`` and ``batched_mm`` experts paths: two expert GEMMs with
    optional biases, a gated activation (or an activation alone, without a gate), the routed
    weight, and a sum over the k slots."""
    num_tokens, top_k, num_experts = shape(router.ids)[0], router.top_k, router.num_experts  # ids: [tokens, k]

    def is_slot_sum(node: Node) -> bool:  # x.view(T, k, H).sum(dim=1)
        src = shape(node.args[0]) if node.args else None
        return (op_kind(node) == "sum" and arg(node, 1, "dim") == 1 and src is not None and len(src) == 3
                and same_sizes(src[:2], (num_tokens, top_k)))

    slot_sum = find_downstream(router.ids, is_slot_sum)
    if slot_sum is None:
        return "no per-token sum over the k expert outputs follows the router"
    ep = expert_parallel_routing(router)
    if isinstance(ep, str):
        return ep
    if ep is not None:  # this rank's experts: local ids with a sentinel, parameters of L experts
        num_experts = ep.local_experts
    found = expert_region(router, slot_sum, (ep.ids, ep.weights) if ep else None)
    if isinstance(found, str):
        return found
    region, hidden, ids, weights = found
    output = combine_output(slot_sum, hidden)
    if output is None:
        return "the combined experts output is not cast back to the hidden dtype"
    if output is not slot_sum:
        region.add(output)

    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(region, key=order.__getitem__)
    gemms = _gemms(nodes)
    if isinstance(gemms, str):
        return gemms
    first, second = gemms
    for gemm in gemms:
        reason = _bias_of(gemm, nodes)
        if reason:
            return reason
    if first.transposed != second.transposed:
        return "the two expert GEMMs store their weights differently"
    gate = _match_gate(first.node, nodes)
    if isinstance(gate, str):
        return gate
    if strip(_gemm_input(second), LAYOUT_KINDS) is not gate.output:
        return f"the second GEMM does not read the activation matched ({gate.activation}, {gate.form})"

    norm = match_post_norm(second.node, region, hidden)
    if isinstance(norm, str):
        return f"the experts' outputs go through a post-expert norm lynx does not know ({norm})"
    norm_nodes = norm.nodes if norm else set()
    weighted = [n for n in nodes if op_kind(n) == "mul" and n not in gate.nodes and n not in norm_nodes]
    if len(weighted) != 1 or not _weighs_output(weighted[0], norm.output if norm else second.node, weights):
        return ("the experts' outputs are not multiplied by the routing weights once (nor normed first by a "
                f"known post-expert norm: {', '.join(form.__name__ for form in POST_NORM_FORMS)})")
    accounted = {first.node, second.node, slot_sum, output, weighted[0], *gate.nodes, *norm_nodes}
    accounted |= {g.bias_add for g in gemms if g.bias_add is not None}
    # Bookkeeping may only compute the permutation and offsets from the expert ids: any
    # such op on the hidden states, weights or parameters is computation lynx does not model.
    values = downstream_within(region, [hidden, weights, first.param, second.param])
    for node in nodes:
        kind = op_kind(node)
        if node in accounted or kind in LAYOUT_KINDS or kind == "repeat_interleave":  # batched_mm: x per slot
            continue
        if kind == "masked_fill" and is_sentinel_mask(node, num_experts):
            continue
        if node not in values and (kind in _BOOKKEEPING or (kind == "clamp" and _clamps_ids(node, num_experts))):
            continue
        return f"unexpected {kind} ({node.name}) in the experts computation"

    layout = _layout(first, second, gate, shape(hidden)[1], num_experts)
    if layout not in LAYOUTS:
        return layout  # the reason it is none
    pattern = "hf_experts"
    if ep is not None:
        first_expert = ep.rank * ep.local_experts
        pattern += (f" (expert-parallel rank {ep.rank}: experts {first_expert}-{first_expert + ep.local_experts - 1}"
                    f" of {router.num_experts})")
    elif op_kind(first.param) == "to_local" and shard_description(first.param, shape(first.param)):
        pattern += f" (tensor-parallel shard: {shard_description(first.param, shape(first.param))})"
    if norm:
        pattern += f" + post-expert norm {norm.kind} ({', '.join(f'{a:g}' for a in norm.args)})"
    return DispatchMatch(
        pattern=pattern, output=output, region=region, hidden=hidden, ids=ids, weights=weights,
        w_gate_up=first.param, w_down=second.param, activation=gate.activation, layout=layout,
        module=module_path(first.node), b_gate_up=first.bias, b_down=second.bias,
        activation_args=gate.activation_args,
        ep_rank=ep.rank if ep else 0, ep_ranks=router.num_experts // ep.local_experts if ep else 1,
        post_norm=norm.kind if norm else "none", post_norm_weight=norm.weight if norm else None,
        post_norm_args=norm.args if norm else (),
    )


def _gemm_input(gemm: _Gemm) -> Node:
    """The activations operand: grouped_mm(x, W), bmm(W[ids], x[..., None]), bmm(x[:, None], W[ids])."""
    node = gemm.node
    if op_kind(node) == "grouped_mm" or gemm.transposed:
        return node.args[0]
    return node.args[1]


def _match_gate(first: Node, nodes: list[Node]) -> GateMatch | str:
    reasons = []
    for form in GATE_FORMS:
        found = form(first, nodes)
        if isinstance(found, GateMatch):
            return found
        reasons.append(found)
    return "; ".join(reasons)


def _weighs_output(mul: Node, down_gemm: Node, weights: Node) -> bool:
    """``mul`` is (the second GEMM's output, + bias) * (the routing weights, permuted)."""
    operands = [a for a in mul.args if isinstance(a, Node)]
    return (
        len(operands) == 2
        and any(strip(o, LAYOUT_KINDS | {"masked_fill", "add"}) is down_gemm for o in operands)
        and any(_derives_from(o, weights) for o in operands)
    )


def _derives_from(node: Node, source: Node) -> bool:
    while isinstance(node, Node):
        if node is source:
            return True
        if op_kind(node) not in LAYOUT_KINDS or not node.args:
            return False
        node = node.args[0]
    return False


def _clamps_ids(node: Node, num_experts: int) -> bool:
    """``expert_ids.clamp_(max=E - 1)``: the expert-parallel guard on ids, a no-op here."""
    return arg(node, 2, "max", arg(node, 1, "min")) == num_experts - 1


def _layout(first: _Gemm, second: _Gemm, gate: GateMatch, hidden_dim, num_experts: int) -> str:
    """The experts op layout name, or the reason the weights fit none."""
    up, down = shape(first.param), shape(second.param)
    if (first.bias is not None or second.bias is not None) and (not first.transposed or gate.form == "up_only"):
        return f"expert biases with {'gate-less' if gate.form == 'up_only' else 'the [E, 2I, H]'} weights are not supported"
    if up[0] != num_experts or down[0] != num_experts:
        return f"expert parameters hold {up[0]} / {down[0]} experts, the router {num_experts}"
    if gate.form == "up_only":
        if first.transposed:
            return "experts without a gate with transposed ([E, H, I]) weights: not supported"
        ok = same_size(up[2], hidden_dim) and same_sizes(down, (num_experts, hidden_dim, up[1]))
        return "up_only" if ok else f"expert weights {up} / {down} are not [E, I, H] / [E, H, I]"
    if gate.form == "interleaved" and not first.transposed:
        return "gate/up interleaved in the rows of [E, 2I, H] weights: not a known layout"
    if not first.transposed:  # [E, 2I, H] and [E, H, I]
        ok = same_size(up[2], hidden_dim) and up[1] % 2 == 0 and same_sizes(down, (num_experts, hidden_dim, up[1] // 2))
        return "gate_up_concat" if ok else f"expert weights {up} / {down} are not [E, 2I, H] / [E, H, I]"
    ok = same_size(up[1], hidden_dim) and up[2] % 2 == 0 and same_sizes(down, (num_experts, up[2] // 2, hidden_dim))
    if not ok:
        return f"expert weights {up} / {down} are not [E, H, 2I] / [E, I, H]"
    return "gate_up_interleaved_t" if gate.form == "interleaved" else "gate_up_concat_t"

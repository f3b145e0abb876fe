"""Dense experts (transformers' Llama-4 ``Llama4TextMoe``): every expert runs on every token,
its input scaled by the token's dense routing weight::

    rows = hidden.repeat(E, 1) * weights.T.reshape(-1, 1)        # [E*T, H], expert-major
    gate, up = torch.bmm(rows.view(E, T, H), gate_up).chunk(2, -1)   # gate_up [E, H, 2I]
    out = torch.bmm(up * act(gate), down).view(E, T, H).sum(dim=0)    # down [E, I, H]

An unchosen expert gets weight sigmoid(-inf) = 0, so its input rows are 0 and, with no biases,
so are ``up`` and its output, whatever finite value act(0) has. The sum over the E experts is
therefore the sum over the k chosen ones of expert(w x): the experts op computes it when each
(token, slot) is one row ``w x`` with weight 1 (``rewrite.replace_input_weighted_dispatch``),
reading only the chosen experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, Node

from .dispatch import DispatchMatch, dispatch_pattern, find_downstream
from .gates import concat_gate
from .graph_utils import (
    arg,
    backward_region,
    dtype,
    escaping_nodes,
    is_param_source,
    is_size_value,
    module_path,
    op_kind,
    region_inputs,
    same_size,
    same_sizes,
    shape,
    strip,
)
from .router_dense import DenseRouterMatch
from .routers import RouterMatch

_VIEWS = frozenset({"view"})


@dataclass
class InputWeightedDispatch(DispatchMatch):
    """A dispatch whose routing weights scale the experts' input, not their output. ``weights``
    is the router's top-k values until the rewrite puts the weights node in."""

    router: DenseRouterMatch | None = None


def _is_expert_sum(node: Node, num_experts: int) -> bool:  # out.view(E, T, H).sum(dim=0)
    source = shape(node.args[0]) if node.args else None
    return (op_kind(node) == "sum" and arg(node, 1, "dim") in (0, (0,), [0]) and not arg(node, 2, "keepdim", False)
            and source is not None and len(source) == 3 and same_size(source[0], num_experts))


def _expert_param(node: object, expected: tuple) -> Node | None:
    """A [E, in, out] parameter used as is (``torch.bmm(x, W)``: y = x @ W[e])."""
    return node if is_param_source(node) and same_sizes(shape(node), expected) else None


def _is_transpose_01(node: object, source: Node) -> bool:
    """``source.T`` of a 2-D tensor: ``.t()``, ``.transpose(0, 1)`` (any spelling of the two
    dims) or ``.permute(1, 0)``."""
    if op_kind(node) != "transpose" or node.args[0] is not source:
        return False
    dims = tuple(node.args[1:])
    if node.target == "t":
        return True
    if node.target == "permute":
        return dims in ((1, 0), ((1, 0),), ((-1, -2),), (-1, -2))
    return {d % 2 for d in dims if isinstance(d, int)} == {0, 1} and len(dims) == 2


def _weighted_rows(mul: Node, router: DenseRouterMatch, num_tokens, num_experts: int, hidden_dim,
                   ) -> tuple[Node, set[Node]] | str:
    """``hidden.repeat(E, 1) * weights.T.reshape(-1, 1)``: (the hidden node it repeats, the
    repeat and transpose), or why it is not that."""
    if op_kind(mul) != "mul" or len(mul.args) != 2 or not all(isinstance(a, Node) for a in mul.args):
        return "the experts' input is not the repeated hidden states times the routing weights"
    if not same_sizes(shape(mul), (num_experts * num_tokens, hidden_dim)):
        return f"the weighted expert input is {shape(mul)}, not [E*T, H]"
    repeats = [a for a in mul.args if op_kind(strip(a, _VIEWS)) == "method:repeat"]
    columns = [a for a in mul.args if _is_transpose_01(strip(a, _VIEWS), router.dense_weights)]
    if len(repeats) != 1 or len(columns) != 1 or repeats[0] is columns[0]:
        return "the experts' input is not hidden.repeat(E, 1) * weights.T.reshape(-1, 1)"
    if not same_sizes(shape(columns[0]), (num_experts * num_tokens, 1)):
        return f"the routing weights column is {shape(columns[0])}, not [E*T, 1] (expert-major)"
    repeat = strip(repeats[0], _VIEWS)
    counts = tuple(repeat.args[1:]) if len(repeat.args) > 2 else tuple(repeat.args[1])
    hidden = repeat.args[0]
    if counts != (num_experts, 1) or hidden not in router.hidden_aliases or len(shape(hidden)) != 2:
        return "the hidden states are not repeated once per expert along the tokens (repeat(E, 1))"
    if dtype(mul) != dtype(hidden):
        return "the weighted expert input changes the hidden states' dtype"
    return hidden, {repeat, strip(columns[0], _VIEWS)}


def _two_gemms(nodes: list[Node], output: Node) -> tuple[Node, Node] | str:
    """(first, second) ``torch.bmm`` of the region; the second is the one the sum reads."""
    gemms = [n for n in nodes if op_kind(n) == "bmm"]
    if len(gemms) != 2:
        return f"expected two batched expert GEMMs (torch.bmm), found {len(gemms)}"
    summed = strip(output.args[0], _VIEWS)
    if summed is not gemms[1]:
        return f"the sum over the experts reads {op_kind(summed)} ({summed.name}), not the second GEMM's output"
    return gemms[0], gemms[1]


@dispatch_pattern("dense_experts")
def dense_experts(graph: Graph, router: RouterMatch) -> InputWeightedDispatch | str:
    """Llama-4's experts: all E on every token, the routing weight scaling the input."""
    if not isinstance(router, DenseRouterMatch):
        return "the router does not route densely"
    num_experts, num_tokens = router.num_experts, shape(router.logits)[0]
    output = find_downstream(router.dense_weights, lambda n: _is_expert_sum(n, num_experts))
    if output is None:
        return "no sum over the experts' outputs follows the dense routing weights"
    boundary = {router.dense_weights} | router.hidden_aliases
    region = backward_region(output, lambda n: n in boundary or is_param_source(n))
    if region is None:
        return "the experts computation is not a self-contained region"
    outside = [n for n in region_inputs(region)
               if n not in boundary and not is_param_source(n) and not is_size_value(n)]
    if outside:
        return f"the experts computation also reads {outside[0].name}"
    nodes = sorted(region, key={n: i for i, n in enumerate(graph.nodes)}.__getitem__)
    gemms = _two_gemms(nodes, output)
    if isinstance(gemms, str):
        return gemms
    first, second = gemms
    hidden_dim = (shape(first.args[0]) or (None,) * 3)[-1]
    if not same_sizes(shape(first.args[0]), (num_experts, num_tokens, hidden_dim)) or \
            not same_sizes(shape(output.args[0]), (num_experts, num_tokens, hidden_dim)):
        return (f"the experts' inputs {shape(first.args[0])} and summed outputs {shape(output.args[0])} "
                "are not [E, T, H]")
    inter = shape(first)[2] // 2
    gate_up = _expert_param(first.args[1], (num_experts, hidden_dim, 2 * inter))
    down = _expert_param(second.args[1], (num_experts, inter, hidden_dim))
    if gate_up is None or down is None:
        return (f"the expert weights {shape(first.args[1])} / {shape(second.args[1])} are not "
                "[E, H, 2I] / [E, I, H] parameters")
    gate = concat_gate(first, nodes)
    if isinstance(gate, str):
        return gate
    if strip(second.args[0], _VIEWS) is not gate.output:
        return "the second GEMM does not read the gated activation"
    mul = strip(first.args[0], _VIEWS)
    rows = _weighted_rows(mul, router, num_tokens, num_experts, hidden_dim)
    if isinstance(rows, str):
        return rows
    hidden, inputs = rows
    if dtype(output) != dtype(hidden):
        return "the summed experts output is not in the hidden dtype"

    # Everything else in the region may only reshape: no permutation, no other arithmetic.
    chunk = next(n for n in gate.nodes if op_kind(n) == "chunk")
    accounted = {output, first, second, mul, *inputs, *gate.nodes}
    for node in nodes:
        if node in accounted or op_kind(node) == "view" or (op_kind(node) == "getitem" and node.args[0] is chunk):
            continue
        return f"unexpected {op_kind(node)} ({node.name}) in the experts computation"
    # The router's scatter and sigmoid go too: the rewrite computes the k weights itself.
    region |= {router.scattered.args[0], router.scattered, *router.weight_ops}
    escaping = escaping_nodes(region, output)
    if escaping:
        return f"an intermediate of the dense routing or experts ({escaping[0].name}) is used elsewhere"
    return InputWeightedDispatch(
        pattern="dense_experts (input-weighted)", output=output, region=region, hidden=hidden, ids=router.ids,
        weights=router.weights, w_gate_up=gate_up, w_down=down, activation=gate.activation,
        activation_args=gate.activation_args,
        layout="gate_up_concat_t", module=module_path(first), router=router,
    )

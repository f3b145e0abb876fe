"""gpt-fast style experts: ``w1/w3 [E, I, H]`` and ``w2 [E, H, I]`` indexed by the expert
ids and applied with einsum (pytorch-labs/gpt-fast, mixtral-moe), combined by an einsum
with the routing weights."""

from __future__ import annotations

from torch.fx import Graph, Node

from .dispatch import DispatchMatch, dispatch_pattern, expert_region, find_downstream
from .gates import activation_name
from .graph_utils import LAYOUT_KINDS, dtype, module_path, op_kind, same_sizes, shape, strip
from .routers import RouterMatch

# Equations with letters renamed in order of appearance, so any spelling matches.
_PROJECT = "ab,acdb->acd"  # x[t,h] . W[ids][t,a,o,h] -> [t,a,o]   (W[e] is nn.Linear [out, in])
_DOWN = "abc,abdc->abd"  # h[t,a,o] . W2[ids][t,a,i,o] -> [t,a,i]
_COMBINE = "abc,ab->ac"  # outs[t,a,h] . weights[t,a] -> [t,h]


def canonical_equation(equation: str) -> str:
    letters: dict[str, str] = {}
    out = []
    for ch in equation.replace(" ", ""):
        if ch.isalpha():
            letters.setdefault(ch, chr(ord("a") + len(letters)))
            out.append(letters[ch])
        else:
            out.append(ch)
    return "".join(out)


def _einsum(node: Node, equation: str) -> bool:
    return op_kind(node) == "einsum" and isinstance(node.args[0], str) and canonical_equation(node.args[0]) == equation


def _gathered(node: object) -> Node | None:
    """``param[expert_ids]`` -> param."""
    node = strip(node, {"cast"})
    if op_kind(node) != "getitem" or not isinstance(node.args[1], Node):
        return None
    param = node.args[0]
    return param if isinstance(param, Node) and param.op in ("placeholder", "get_attr") else None


@dispatch_pattern("gather_einsum")
def gather_einsum(graph: Graph, router: RouterMatch) -> DispatchMatch | str:
    combine = find_downstream(router.ids, lambda n: _einsum(n, _COMBINE))
    if combine is None:
        return "no einsum combining expert outputs with the routing weights"
    found = expert_region(router, combine)
    if isinstance(found, str):
        return found
    region, hidden, ids, weights = found
    if dtype(combine) != dtype(hidden):
        return "the combined output is not in the hidden dtype"
    down = strip(combine.args[1], {"cast"})
    projections = [n for n in region if _einsum(n, _PROJECT)]
    acts = [n for n in region if activation_name(n)]
    if not _einsum(down, _DOWN) or len(projections) != 2 or len(acts) != 1:
        return "not three expert projections (gate, up, down) and one activation"
    act = acts[0]
    gate_proj = strip(act.args[0], {"cast"})
    mul = strip(down.args[1], {"cast"})
    operands = [strip(a, {"cast"}) for a in mul.args] if op_kind(mul) == "mul" else []
    up_proj = next((o for o in operands if o is not act), None)
    if act not in operands or up_proj not in projections or gate_proj not in projections or up_proj is gate_proj:
        return "the down projection does not read act(gate) * up"
    accounted = {combine, down, gate_proj, up_proj, act, mul}
    stray = [n for n in region if n not in accounted and op_kind(n) not in LAYOUT_KINDS]
    if stray:
        return f"unexpected {op_kind(stray[0])} ({stray[0].name}) in the experts computation"
    w_gate, w_up, w_down = (_gathered(p.args[2]) for p in (gate_proj, up_proj, down))
    if None in (w_gate, w_up, w_down):
        return "the projections' weights are not expert parameters indexed by the expert ids"
    num_experts, hidden_dim = router.num_experts, shape(hidden)[1]
    inter = shape(w_gate)[1]
    if not (same_sizes(shape(w_gate), (num_experts, inter, hidden_dim)) and shape(w_up) == shape(w_gate)
            and same_sizes(shape(w_down), (num_experts, hidden_dim, inter))):
        return f"expert weights {shape(w_gate)} / {shape(w_up)} / {shape(w_down)} are not [E, I, H] x2 / [E, H, I]"
    if any(strip(p.args[1], {"cast"}) is not hidden for p in (gate_proj, up_proj)):
        return "the gate and up projections do not read the layer input"
    return DispatchMatch(
        pattern="gather_einsum", output=combine, region=region, hidden=hidden, ids=ids, weights=weights,
        w_gate_up=w_gate, w_down=w_down, w_up=w_up, activation=activation_name(act), layout="gate_up_split",
        module=module_path(gate_proj),
    )

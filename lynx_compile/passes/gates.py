"""The activation between the two expert GEMMs: ``act(gate) * up`` and its variants, or
``act(up)`` for experts without a gate.

A gated form is a split of the first GEMM's output into gate and up (``concat_split``,
``interleaved_split``) and one of the gated activations (``GLU_FORMS``), each a function
``(gate, up, region) -> Glu | None`` that recognises exactly one formula of
``kernels/experts_ref.py`` and reads its constants from the graph. The dispatch pattern then
checks that every arithmetic node of the region is one of the matched ones, so a variant with
one more op (a different clamp, an extra scale) is left unmatched rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch.fx import Node

from .graph_utils import LAYOUT_KINDS, arg, op_kind, strip

ACTIVATION_KINDS = {"silu": "silu", "relu": "relu", "gelu": "gelu"}


@dataclass
class GateMatch:
    activation: str  # an ACTIVATIONS name of kernels/experts_ref.py
    output: Node  # the activation's result, read by the second GEMM
    form: str  # "concat" (gate half, up half), "interleaved" (alternating columns) or "up_only" (no gate)
    nodes: set[Node] = field(default_factory=set)  # the arithmetic of the activation
    activation_args: tuple[float, ...] = ()


@dataclass
class Glu:
    activation: str
    output: Node
    nodes: set[Node]
    args: tuple[float, ...] = ()


def activation_name(node: Node) -> str | None:
    name = ACTIVATION_KINDS.get(op_kind(node))
    if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return name


# --- graph reading ----------------------------------------------------------------------

def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _consumers(node: Node, region: set[Node], kinds: set[str] | None = None) -> list[Node]:
    """Region nodes of one of ``kinds`` (None: any) that read ``node``, directly or through dtype casts."""
    found, todo = [], [node]
    while todo:
        for user in todo.pop().users:
            if user not in region:
                continue
            if op_kind(user) == "cast":
                todo.append(user)
            elif kinds is None or op_kind(user) in kinds:
                found.append(user)
    return found


def _one(node: Node, region: set[Node], kind: str) -> Node | None:
    found = _consumers(node, region, {kind})
    return found[0] if len(found) == 1 else None


def _operands(node: Node) -> list[object]:
    return [strip(a) for a in node.args[:2]] if len(node.args) == 2 and not node.kwargs else []


def _binary(node: Node, region: set[Node], kind: str, other: Callable[[object], bool], commutes: bool = True,
            ) -> Node | None:
    """The one region node ``node <kind> x`` (or ``x <kind> node`` if it commutes) with ``other(x)``."""
    found = []
    for op in _consumers(node, region, {kind}):
        operands = _operands(op)
        if len(operands) == 2 and (
                (operands[0] is node and other(operands[1])) or (commutes and operands[1] is node and other(operands[0]))):
            found.append(op)
    return found[0] if len(found) == 1 else None


def _product(a: Node, b: Node, region: set[Node]) -> Node | None:
    return _binary(a, region, "mul", lambda x: x is b)


def _by_constant(node: Node, region: set[Node], kind: str) -> tuple[Node, float] | None:
    """``node * c`` / ``node / c`` / ``node + c`` with ``c`` a number: (the op, c)."""
    op = _binary(node, region, kind, lambda x: _number(x) is not None, commutes=kind != "div")
    if op is None:
        return None
    operands = _operands(op)
    return op, _number(operands[1] if operands[0] is node else operands[0])


def _clamp(node: Node, region: set[Node]) -> tuple[Node, float | None, float | None] | None:
    """The one clamp of ``node``: (clamp, min, max); a bound that is not a number is None."""
    clamp = _one(node, region, "clamp")
    if clamp is None or strip(clamp.args[0]) is not node:
        return None
    return clamp, _number(arg(clamp, 1, "min")), _number(arg(clamp, 2, "max"))


def _clamped_pair(gate: Node, up: Node, region: set[Node]) -> tuple[Node, Node, float] | None:
    """``clamp(gate, max=l)`` and ``clamp(up, -l, l)``: (clamped gate, clamped up, l)."""
    g, u = _clamp(gate, region), _clamp(up, region)
    if g is None or u is None:
        return None
    (g, _, limit), (u, u_min, u_max) = g, u
    if limit is None or arg(g, 1, "min") is not None or u_min != -limit or u_max != limit:
        return None
    return g, u, limit


# --- gated activations ------------------------------------------------------------------

def plain_glu(gate: Node, up: Node, region: set[Node]) -> Glu | None:
    """``f(gate) * up``, f in silu, gelu (exact or tanh), relu."""
    acts = [n for n in _consumers(gate, region, set(ACTIVATION_KINDS)) if strip(n.args[0]) is gate]
    if len(acts) != 1:
        return None
    out = _product(acts[0], up, region)
    return Glu(activation_name(acts[0]), out, {acts[0], out}) if out is not None else None


def swiglu_oai(gate: Node, up: Node, region: set[Node]) -> Glu | None:
    """GPT-OSS, MiniMax-M3: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=l)``."""
    clamped = _clamped_pair(gate, up, region)
    if clamped is None:
        return None
    g, u, limit = clamped
    scaled = _by_constant(g, region, "mul")
    sigmoid = _one(scaled[0], region, "sigmoid") if scaled else None
    glu = _product(g, sigmoid, region) if sigmoid is not None else None
    plus_one = _by_constant(u, region, "add")
    if glu is None or plus_one is None or plus_one[1] != 1:
        return None
    out = _product(plus_one[0], glu, region)
    if out is None:
        return None
    return Glu("swiglu_oai", out, {g, u, scaled[0], sigmoid, glu, plus_one[0], out}, (scaled[1], limit))


def silu_clamped(gate: Node, up: Node, region: set[Node]) -> Glu | None:
    """HY-V4: ``silu(clamp(gate, max=l)) * clamp(up, -l, l)``."""
    clamped = _clamped_pair(gate, up, region)
    if clamped is None:
        return None
    g, u, limit = clamped
    silu = _one(g, region, "silu")
    out = _product(silu, u, region) if silu is not None else None
    return Glu("silu_clamped", out, {g, u, silu, out}, (limit,)) if out is not None else None


def _softcap(node: Node, region: set[Node]) -> tuple[Node, set[Node], float] | None:
    """``tanh(node / c) * c``: (its result, its nodes, c)."""
    divided = _by_constant(node, region, "div")
    tanh = _one(divided[0], region, "tanh") if divided else None
    scaled = _by_constant(tanh, region, "mul") if tanh is not None else None
    if scaled is None or scaled[1] != divided[1] or divided[1] <= 0:
        return None
    return scaled[0], {divided[0], tanh, scaled[0]}, divided[1]


def swiglu_softcapped(gate: Node, up: Node, region: set[Node]) -> Glu | None:
    """Inkling2: ``cap(gate, a) * sigmoid(gate) * cap(up, b)``, ``cap(x, c) = tanh(x / c) * c``."""
    gate_cap, up_cap = _softcap(gate, region), _softcap(up, region)
    sigmoid = _one(gate, region, "sigmoid")
    if gate_cap is None or up_cap is None or sigmoid is None:
        return None
    glu = _product(gate_cap[0], sigmoid, region)
    out = _product(glu, up_cap[0], region) if glu is not None else None
    if out is None:
        return None
    return Glu("swiglu_softcapped", out, {*gate_cap[1], *up_cap[1], sigmoid, glu, out}, (gate_cap[2], up_cap[2]))


GLU_FORMS = (plain_glu, swiglu_oai, silu_clamped, swiglu_softcapped)
GLU_NAMES = ("act(gate) * up for act in silu, gelu, relu; GPT-OSS's clamped SwiGLU; clamped SiLU (HY-V4); "
             "softcapped SwiGLU (Inkling2)")


# --- splits of the first GEMM's output into gate and up --------------------------------------

def _reads(node: object, source: Node) -> bool:
    return strip(node, LAYOUT_KINDS | {"masked_fill"}) is source


def concat_split(first: Node, nodes: list[Node]) -> tuple[Node, Node, set[Node]] | str:
    """``gate, up = x.chunk(2, -1)`` (transformers' default)."""
    chunks = [n for n in nodes if op_kind(n) == "chunk" and _reads(n.args[0], first)]
    if len(chunks) != 1 or arg(chunks[0], 1, "chunks") != 2 or arg(chunks[0], 2, "dim") not in (-1, 1):
        return "no 2-way split of the first GEMM's output"
    halves = {n.args[1]: n for n in chunks[0].users if op_kind(n) == "getitem"}
    if set(halves) != {0, 1} or len(chunks[0].users) != 2:
        return "the 2-way split is not read as its two halves"
    return halves[0], halves[1], {chunks[0]}


def _is_slice(node: Node, source: Node, start) -> bool:
    index = node.args[1] if op_kind(node) == "getitem" else None
    return (
        _reads(node.args[0], source) and isinstance(index, tuple) and len(index) == 2
        and index[0] is Ellipsis and index[1] == slice(start, None, 2)
    )


def interleaved_split(first: Node, nodes: list[Node]) -> tuple[Node, Node, set[Node]] | str:
    """GPT-OSS: ``gate, up = x[..., ::2], x[..., 1::2]``."""
    gates = [n for n in nodes if op_kind(n) == "getitem" and _is_slice(n, first, None)]
    ups = [n for n in nodes if op_kind(n) == "getitem" and _is_slice(n, first, 1)]
    if len(gates) != 1 or len(ups) != 1:
        return "no x[..., ::2] / x[..., 1::2] split of the first GEMM's output"
    return gates[0], ups[0], set()


def _gated_form(name: str, split: Callable[[Node, list[Node]], tuple[Node, Node, set[Node]] | str]):
    """The gate form of one split: (gate, up, the split's own nodes) from ``split``, then a GLU_FORMS formula."""
    def form(first: Node, nodes: list[Node]) -> GateMatch | str:
        found = split(first, nodes)
        if isinstance(found, str):
            return f"{name} gate: {found}"
        gate, up, split_nodes = found
        region = set(nodes)
        for glu_form in GLU_FORMS:
            glu = glu_form(gate, up, region)
            if glu is not None:
                return GateMatch(glu.activation, glu.output, name, glu.nodes | split_nodes, glu.args)
        feeds = sorted({op_kind(n) for n in _consumers(gate, region)})
        return (f"{name} gate: the activation of gate and up is none of {GLU_NAMES} "
                f"(the gate half feeds {', '.join(feeds) or 'nothing'})")

    form.__name__ = f"{name}_gate"
    return form


# --- experts without a gate ----------------------------------------------------------------

def _squares(node: Node, region: set[Node]) -> Node | None:
    """``square(node)``, ``node ** 2`` or ``node * node``."""
    found = [n for n in _consumers(node, region, {"square"}) if strip(n.args[0]) is node]
    found += [n for n in _consumers(node, region, {"pow"}) if _operands(n)[:1] == [node] and _number(n.args[1]) == 2]
    found += [n for n in _consumers(node, region, {"mul"}) if _operands(n) == [node, node]]
    return found[0] if len(found) == 1 else None


def up_only(first: Node, nodes: list[Node]) -> GateMatch | str:
    """``act(up)``: transformers' ``has_gate=False`` experts (NemotronH), act in silu, gelu, relu, relu2."""
    region = set(nodes)
    # the whole output (no slice of it), past casts, views and an expert-parallel masked_fill
    acts = [n for n in nodes if activation_name(n) and strip(n.args[0], {"cast", "view", "masked_fill"}) is first]
    if len(acts) != 1:
        return "no gate: no known activation (silu, gelu, relu, relu2) on the first GEMM's output"
    act = acts[0]
    square = _squares(act, region) if op_kind(act) == "relu" else None
    if square is not None:
        return GateMatch("relu2", square, "up_only", {act, square})
    return GateMatch(activation_name(act), act, "up_only", {act})


concat_gate = _gated_form("concat", concat_split)
GATE_FORMS = (concat_gate, _gated_form("interleaved", interleaved_split), up_only)

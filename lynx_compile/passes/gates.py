"""Gated activations between the two expert GEMMs: ``act(gate) * up`` and its variants.

Each form is a function ``(first GEMM, region nodes in order) -> GateMatch | reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node

from .graph_utils import LAYOUT_KINDS, arg, op_kind, strip

ACTIVATION_KINDS = {"silu": "silu", "relu": "relu", "gelu": "gelu"}


@dataclass
class GateMatch:
    activation: str  # an ACTIVATIONS name of kernels/experts_ref.py
    output: Node  # the gated activation, read by the second GEMM
    interleaved: bool  # gate/up in alternating columns (GPT-OSS) rather than two halves
    nodes: set[Node] = field(default_factory=set)  # the arithmetic of the gate
    activation_args: tuple[float, ...] = ()


def activation_name(node: Node) -> str | None:
    name = ACTIVATION_KINDS.get(op_kind(node))
    if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return name


def _reads(node: object, source: Node) -> bool:
    return strip(node, LAYOUT_KINDS | {"masked_fill"}) is source


def _half(node: object, chunk: Node, index: int) -> bool:
    node = strip(node, {"cast"})
    return op_kind(node) == "getitem" and node.args[0] is chunk and node.args[1] == index


def concat_gate(first: Node, nodes: list[Node]) -> GateMatch | str:
    """``gate, up = x.chunk(2, -1); act(gate) * up`` (transformers' default gate)."""
    chunks = [n for n in nodes if op_kind(n) == "chunk" and _reads(n.args[0], first)]
    if len(chunks) != 1 or arg(chunks[0], 1, "chunks") != 2 or arg(chunks[0], 2, "dim") not in (-1, 1):
        return "concat gate: no 2-way split of the first GEMM's output"
    chunk = chunks[0]
    acts = [n for n in nodes if activation_name(n) and _half(n.args[0], chunk, 0)]
    if len(acts) != 1:
        return "concat gate: no known activation (silu, gelu, relu) on the gate half"
    act = acts[0]
    for mul in (n for n in nodes if op_kind(n) == "mul"):
        operands = [strip(a, {"cast"}) for a in mul.args if isinstance(a, Node)]
        if len(operands) == 2 and act in operands and any(_half(o, chunk, 1) for o in operands):
            return GateMatch(activation_name(act), mul, False, {chunk, act, mul})
    return "concat gate: the activation is not multiplied by the up half"


def _is_slice(node: Node, source: Node, start) -> bool:
    index = node.args[1] if op_kind(node) == "getitem" else None
    return (
        _reads(node.args[0], source) and isinstance(index, tuple) and len(index) == 2
        and index[0] is Ellipsis and index[1] == slice(start, None, 2)
    )


def _single_user(node: Node, kind: str) -> Node | None:
    users = [u for u in node.users if op_kind(u) == kind]
    return users[0] if len(users) == 1 else None


def swiglu_oai_gate(first: Node, nodes: list[Node]) -> GateMatch | str:
    """GPT-OSS: gate/up interleaved, ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=l)``."""
    gates = [n for n in nodes if op_kind(n) == "getitem" and _is_slice(n, first, None)]
    ups = [n for n in nodes if op_kind(n) == "getitem" and _is_slice(n, first, 1)]
    if len(gates) != 1 or len(ups) != 1:
        return "interleaved gate: no x[..., ::2] / x[..., 1::2] split of the first GEMM's output"
    gate = _single_user(gates[0], "clamp")
    up = _single_user(ups[0], "clamp")
    if gate is None or up is None:
        return "interleaved gate: gate and up are not clamped"
    limit = arg(gate, 2, "max")
    if arg(gate, 1, "min") is not None or arg(up, 1, "min") != -limit or arg(up, 2, "max") != limit:
        return "interleaved gate: clamps are not clamp(gate, max=l), clamp(up, -l, l)"
    scaled = next((u for u in gate.users if op_kind(u) == "mul" and isinstance(u.args[1], float)), None)
    sigmoid = _single_user(scaled, "sigmoid") if scaled is not None else None
    glu = next((u for u in gate.users if op_kind(u) == "mul" and sigmoid in u.args), None)
    plus_one = _single_user(up, "add")
    if glu is None or plus_one is None or plus_one.args[1] != 1:
        return "interleaved gate: not (up + 1) * gate * sigmoid(alpha * gate)"
    out = next((u for u in plus_one.users if op_kind(u) == "mul" and glu in u.args), None)
    if out is None:
        return "interleaved gate: not (up + 1) * gate * sigmoid(alpha * gate)"
    parts = {gate, up, scaled, sigmoid, glu, plus_one, out}
    return GateMatch("swiglu_oai", out, True, parts, (float(scaled.args[1]), float(limit)))


GATE_FORMS = (concat_gate, swiglu_oai_gate)

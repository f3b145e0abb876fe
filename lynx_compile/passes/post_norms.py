"""Post-expert norms: a normalisation of each expert's output row before its routing weight.

transformers' experts with ``has_post_expert_norm=True`` (MuseSpark) call
``proj_out = self.post_expert_norm(proj_out)`` between the down projection and
``proj_out * weights``. Each form is a function ``(down, region, hidden) -> PostNormMatch | reason
| None`` that recognises exactly one formula of ``kernels/experts_ref.POST_NORMS`` (None: the
region has no start of it), its casts included, since the op rounds where the formula does, and
reads its weight and constants from the graph. The dispatch pattern then checks that every
arithmetic node of the region is accounted for, so a norm with one op more is left unmatched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .graph_utils import (
    LAYOUT_KINDS, arg, cast_chain_end, dtype, is_last_dim, is_param_source, op_kind, same_size, shape, strip,
)


@dataclass
class PostNormMatch:
    kind: str  # a POST_NORMS name of kernels/experts_ref.py
    output: Node  # the normed rows (before their cast back), which the routing weights multiply
    weight: Node  # the norm's [H] parameter
    args: tuple[float, ...] = ()
    nodes: set[Node] = field(default_factory=set)  # the norm's arithmetic


PostNormForm = Callable[[Node, set[Node], Node], PostNormMatch | str | None]


def match_post_norm(down: Node, region: set[Node], hidden: Node) -> PostNormMatch | str | None:
    """The post-expert norm of the down GEMM ``down``'s rows: a match, the reason a norm-like
    start is none of the forms, or None where nothing in the region starts one."""
    reasons = []
    for form in POST_NORM_FORMS:
        found = form(down, region, hidden)
        if isinstance(found, PostNormMatch):
            return found
        if found is not None:
            reasons.append(found)
    return "; ".join(reasons) or None


# --- graph reading ----------------------------------------------------------------------

def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _reads_rows(node: object, down: Node) -> bool:
    """``node`` is the down GEMM's rows (squeezed, + bias, sentinel-masked), through casts only at the end."""
    return strip(strip(node), LAYOUT_KINDS | {"masked_fill", "add"}) is down


def _cast_chain(start: Node, end: Node) -> list[Node] | None:
    """The casts from ``start`` back to ``end`` (``start`` included, ``end`` not), or None."""
    chain, node = [], start
    while node is not end:
        if not isinstance(node, Node) or op_kind(node) != "cast" or not node.args:
            return None
        chain.append(node)
        node = node.args[0]
    return chain


def _unit_offset(node: object) -> tuple[Node, Node] | None:
    """``(1 + w)`` behind casts, ``w`` a 1-D parameter: (the addition, w)."""
    add = strip(node)
    if not isinstance(add, Node) or op_kind(add) != "add" or len(add.args) != 2 or add.kwargs:
        return None
    left, right = add.args
    weight = right if _number(left) == 1.0 else left if _number(right) == 1.0 else None
    if not is_param_source(weight) or len(shape(weight) or ()) != 1:
        return None
    return add, weight


def _only_user(node: Node, kinds: tuple[str, ...], region: set[Node]) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0] in region and op_kind(users[0]) in kinds else None


def _rms_of(z: Node, region: set[Node]) -> tuple[Node, float, set[Node]] | str:
    """``z * rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)``: (the product, eps, its nodes)."""
    users = list(z.users)
    powers = [u for u in users if op_kind(u) == "pow" and u.args[0] is z and arg(u, 1, "exponent") == 2]
    if len(users) != 2 or len(powers) != 1:
        return "the scaled rows are not squared once and multiplied once"
    mean = _only_user(powers[0], ("method:mean", "fn:mean"), region)
    if mean is None or not is_last_dim(arg(mean, 1, "dim"), 2) or arg(mean, 2, "keepdim") is not True:
        return "the squares are not averaged over the hidden dim (keepdim)"
    shifted = _only_user(mean, ("add",), region)
    operands = list(shifted.args) if shifted is not None and not shifted.kwargs else []
    eps = [_number(o) for o in operands if o is not mean]
    if len(operands) != 2 or mean not in operands or len(eps) != 1 or eps[0] is None or eps[0] < 0:
        return "the mean square is not shifted by a constant eps >= 0"
    root = _only_user(shifted, ("fn:rsqrt", "method:rsqrt"), region)
    if root is None or len(root.args) != 1 or root.kwargs:
        return "the shifted mean square is not taken to rsqrt"
    product = _only_user(root, ("mul",), region)
    if product is None or set(product.args) != {z, root} or len(product.args) != 2 or product.kwargs:
        return "the rows are not multiplied by the rsqrt of their mean square"
    return product, eps[0], {powers[0], mean, shifted, root, product}


# --- forms ------------------------------------------------------------------------------

def input_scaled_rms(down: Node, region: set[Node], hidden: Node) -> PostNormMatch | str | None:
    """MuseSpark's ``MuseSparkTextInputScaledRMSNorm``: ``z = (y.float() * (1 + w).float())``
    rounded to y's dtype and back to fp32, then ``(z * rsqrt(z.pow(2).mean(-1, keepdim=True) + eps))``
    rounded to y's dtype; y's dtype must be the hidden dtype (the op's rounding)."""
    scales = [n for n in region if op_kind(n) == "mul" and len(n.args) == 2 and not n.kwargs
              and any(_unit_offset(a) for a in n.args) and any(_reads_rows(a, down) for a in n.args)]
    if not scales:
        return None
    if len(scales) != 1:
        return "input_scaled_rms: the expert rows are scaled by (1 + w) more than once"
    scaled = scales[0]
    rows_arg = next(a for a in scaled.args if _reads_rows(a, down))
    scale_arg = next(a for a in scaled.args if a is not rows_arg)
    offset, weight = _unit_offset(scale_arg)
    if not same_size(shape(weight)[0], shape(hidden)[1]):
        return f"input_scaled_rms: the norm's weight {tuple(shape(weight))} is not [hidden]"
    low, fp32 = dtype(hidden), torch.float32
    scale_casts = _cast_chain(scale_arg, offset)
    if dtype(offset) != dtype(weight) or scale_casts is None or any(dtype(c) != fp32 for c in scale_casts):
        return "input_scaled_rms: 1 + w is not added in w's dtype and widened to fp32"
    rows_casts = _cast_chain(rows_arg, strip(rows_arg))  # casts only, by strip's definition
    if dtype(scaled) != fp32 or dtype(strip(rows_arg)) != low or any(dtype(c) not in (low, fp32) for c in rows_casts):
        return f"input_scaled_rms: the expert rows (in {low}) are not scaled in fp32"
    z = cast_chain_end(scaled)
    if dtype(z) != fp32 or (low != fp32 and low not in {dtype(c) for c in _cast_chain(z, scaled)}):
        return f"input_scaled_rms: the scaled rows are not rounded to {low} and widened to fp32 before the norm"
    rms = _rms_of(z, region)
    if isinstance(rms, str):
        return f"input_scaled_rms: {rms}"
    product, eps, nodes = rms
    if dtype(cast_chain_end(product)) != low:
        return f"input_scaled_rms: the normed rows are not rounded to {low}"
    return PostNormMatch("input_scaled_rms", product, weight, (eps,), {offset, scaled, *nodes})


POST_NORM_FORMS: tuple[PostNormForm, ...] = (input_scaled_rms,)

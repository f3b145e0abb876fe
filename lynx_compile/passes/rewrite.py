"""Graph surgery: put the lynx ops where a matched router and experts dispatch were."""

from __future__ import annotations

import operator

import torch
from torch._dynamo.source import ConstantSource
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from .. import ops  # noqa: F401  (registers torch.ops.lynx)
from ..policies import Policy
from ..step import step_buffers
from .dispatch import DispatchMatch
from .graph_utils import dtype, erase_dead, erase_nodes, example_value
from .routers import RouterMatch


def _call(graph: Graph, target, args: tuple, like: Node, kwargs: dict | None = None) -> Node:
    """Insert ``target(*args)`` with ``like``'s source metadata and a fake example value.
    A string target is a tensor method (``"to"``), as dynamo itself records it."""
    if isinstance(target, str):
        node = graph.call_method(target, args, kwargs or {})
        target = getattr(torch.Tensor, target)
    else:
        node = graph.call_function(target, args, kwargs or {})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_args = map_arg(args, example_value)
    fake_mode = next(
        (v.fake_mode for v in torch.utils._pytree.tree_leaves(fake_args) if hasattr(v, "fake_mode")),
        None,
    )
    if fake_mode is not None:
        with fake_mode:
            node.meta["example_value"] = target(*fake_args, **(kwargs or {}))
    return node


def replace_dispatch(graph: Graph, match: DispatchMatch) -> Node:
    with graph.inserting_before(match.output):
        node = _call(
            graph,
            torch.ops.lynx.grouped_experts.default,
            (match.hidden, match.ids, match.weights, match.w_gate_up, match.w_down, match.w_up,
             match.b_gate_up, match.b_down, match.activation, match.layout, list(match.activation_args)),
            like=match.output,
        )
    match.output.replace_all_uses_with(node)
    erase_nodes(graph, match.region)
    return node


def step_context_nodes(gm: GraphModule, like: Node) -> tuple[Node, Node]:
    """get_attr nodes for the step context of ``like``'s device (``lynx_compile.step``), added to
    ``gm`` once. The buffers are registered on ``gm``, so AOTAutograd passes them to the
    compiled graph on every call (by reference: it sees every in-place update; a CUDA graph
    treats them as static inputs)."""
    graph = gm.graph
    existing = [n for n in graph.nodes if n.op == "get_attr" and n.target in _STEP_BUFFERS]
    if existing:
        found = {n.target: n for n in existing}
        return found[_STEP_BUFFERS[0]], found[_STEP_BUFFERS[1]]
    value = example_value(like)
    fake_mode = getattr(value, "fake_mode", None)
    nodes = []
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for name, buffer in zip(_STEP_BUFFERS, step_buffers(value.device)):
        gm.register_buffer(name, buffer)
        if hasattr(gm, "_param_name_to_source"):  # dynamo's record of where each parameter came from
            gm._param_name_to_source[name] = ConstantSource(f"lynx_step_context.{name}")
        with graph.inserting_before(first):
            node = graph.get_attr(name)
        if fake_mode is not None:
            node.meta["example_value"] = fake_mode.from_tensor(buffer, static_shapes=True)
        nodes.append(node)
    return nodes[0], nodes[1]


_STEP_BUFFERS = ("_lynx_step_state", "_lynx_step_mask")


def replace_router(gm: GraphModule, match: RouterMatch, policy: Policy, knobs: dict, decode_only: bool,
                   sequence_dim: int | None, ep_ranks: int | None = None) -> Node:
    graph = gm.graph
    rule = match.rule
    state, mask = step_context_nodes(gm, match.logits)
    with graph.inserting_before(match.topk):
        if sequence_dim is None:  # no shape rule: only an engine's step context makes a decode step
            seq_len = -1
        else:
            seq_len = example_value(match.layer_input).shape[sequence_dim]
            if not isinstance(seq_len, int):  # dynamic sequence length: read it at run time
                seq_len = _call(graph, torch.ops.aten.sym_size.int, (match.layer_input, sequence_dim), like=match.topk)
        select = _call(
            graph,
            torch.ops.lynx.select_experts.default,
            (match.logits, match.score_bias, state, mask, match.top_k, seq_len, policy.name,
             policy.encode(knobs, ep_ranks),
             decode_only, rule.scoring, rule.renormalize, rule.softmax_after_topk, rule.num_groups,
             rule.topk_groups, rule.group_score, rule.scaling_factor, rule.bias_on_logits,
             rule.jitter_eps),
            like=match.topk,
        )
        weights = _call(graph, operator.getitem, (select, 0), like=match.topk)
        ids = _call(graph, operator.getitem, (select, 1), like=match.topk)
    if dtype(match.weights) != torch.float32:  # keep the dtype the router handed on
        with graph.inserting_after(weights):
            weights = _call(graph, "to", (weights,), like=match.topk, kwargs={"dtype": dtype(match.weights)})
    match.weights.replace_all_uses_with(weights)
    match.ids.replace_all_uses_with(ids)
    erase_dead(graph, match.nodes)
    return select

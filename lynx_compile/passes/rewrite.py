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
from .dispatch_dense import InputWeightedDispatch
from .graph_utils import dtype, erase_dead, erase_nodes, example_value
from .router_dense import DenseRouterMatch
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
    if isinstance(match, InputWeightedDispatch):
        return replace_input_weighted_dispatch(graph, match)
    args = (match.hidden, match.ids, match.weights, match.w_gate_up, match.w_down, match.w_up,
            match.b_gate_up, match.b_down, match.activation, match.layout, list(match.activation_args))
    if match.post_norm != "none":  # (the op's trailing arguments; graphs without a norm keep its short form)
        args += (match.post_norm_weight, match.post_norm, list(match.post_norm_args))
    with graph.inserting_before(match.output):
        node = _call(graph, torch.ops.lynx.grouped_experts.default, args, like=match.output)
    match.output.replace_all_uses_with(node)
    erase_nodes(graph, match.region)
    return node


def _router_weight_ops(graph: Graph, router: DenseRouterMatch, chosen: Node) -> tuple[Node, set[Node]]:
    """The dense router's sigmoid and casts (e.g. ``.float()``, sigmoid, ``.to(dtype)``) applied
    to ``chosen`` [T, k] logits: the weights the dense matrix holds at those experts."""
    weights, made = chosen, set()
    for op in router.weight_ops:
        weights = _call(graph, op.target, (weights, *op.args[1:]), like=op, kwargs=dict(op.kwargs))
        made.add(weights)
    return weights, made


def replace_input_weighted_dispatch(graph: Graph, match: InputWeightedDispatch) -> Node:
    """Experts that weigh their input (Llama-4): ``sum_j expert_{id_j}(w_j x)``. Each (token, slot)
    becomes one row ``w_j x`` with its own expert id and weight 1 (k = 1: the tokens themselves).

    The graph has no [T, k] weights node (the router scatters the top-k values into a dense
    matrix): it is made here by replaying the router's sigmoid and casts on the k values, which
    is what the dense matrix holds at the chosen experts, and handed to the router match, so
    that a selector that replaces the router replaces these weights too."""
    router = match.router
    hidden_dim = example_value(match.hidden).shape[1]
    with graph.inserting_before(match.output):
        weights, made = _router_weight_ops(graph, router, router.weights)
        if router.top_k == 1:
            rows = _call(graph, operator.mul, (match.hidden, weights), like=match.output)
            ids = match.ids
        else:
            per_slot = _call(graph, operator.mul, (_call(graph, "unsqueeze", (match.hidden, 1), like=match.output),
                                                   _call(graph, "unsqueeze", (weights, -1), like=match.output)),
                             like=match.output)
            rows = _call(graph, "reshape", (per_slot, -1, hidden_dim), like=match.output)
            ids = _call(graph, "reshape", (match.ids, -1, 1), like=match.output)
        ones = _call(graph, torch.ones_like, (ids,), like=match.output, kwargs={"dtype": dtype(rows)})
        node = _call(
            graph,
            torch.ops.lynx.grouped_experts.default,
            (rows, ids, ones, match.w_gate_up, match.w_down, None, None, None, match.activation, match.layout,
             list(match.activation_args)),
            like=match.output,
        )
        if router.top_k > 1:
            per_token = _call(graph, "view", (node, -1, router.top_k, hidden_dim), like=match.output)
            node = _call(graph, "sum", (per_token, 1), like=match.output)
    match.output.replace_all_uses_with(node)
    erase_nodes(graph, match.region)
    router.weights = weights
    router.nodes |= made
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
    dense = isinstance(match, DenseRouterMatch)
    rule = match.rule
    state, mask = step_context_nodes(gm, match.logits)
    chosen_weights = None if match.ids_only else (match.selected_weights or match.weights)
    chosen_ids = match.selected_ids or match.ids
    with graph.inserting_before(match.topk):
        if sequence_dim is None:  # no shape rule: only an engine's step context makes a decode step
            seq_len = -1
        else:
            seq_len = _size(graph, match.layer_input, sequence_dim, match.topk)
        select = _call(
            graph,
            torch.ops.lynx.select_experts.default,
            (selector_logits(graph, match), match.score_bias, state, mask, match.top_k, seq_len, policy.name,
             policy.encode(knobs, ep_ranks),
             decode_only, rule.scoring, rule.renormalize, rule.softmax_after_topk, rule.num_groups,
             rule.topk_groups, rule.group_score, rule.scaling_factor, rule.bias_on_logits,
             rule.jitter_eps),
            like=match.topk,
        )
        ids = _as_router_shape(graph, _call(graph, operator.getitem, (select, 1), like=match.topk), match)
        if chosen_weights is not None:
            weights = _as_router_shape(graph, _call(graph, operator.getitem, (select, 0), like=match.topk), match)
        if dense:  # the router's own weights of the chosen experts, with its casts
            chosen = _call(graph, torch.gather, (match.logits, -1, ids), like=match.topk)
            weights, _ = _router_weight_ops(graph, match, chosen)
    if chosen_weights is not None:
        if not dense and dtype(chosen_weights) != torch.float32:  # keep the dtype the router handed on
            with graph.inserting_after(weights):
                weights = _call(graph, "to", (weights,), like=match.topk, kwargs={"dtype": dtype(chosen_weights)})
        chosen_weights.replace_all_uses_with(weights)
    chosen_ids.replace_all_uses_with(ids)
    erase_dead(graph, match.nodes)
    return select


def _size(graph: Graph, node: Node, dim: int, like: Node):
    """``node``'s size along ``dim``: an int, or read at run time where the size is dynamic."""
    size = example_value(node).shape[dim]
    if isinstance(size, int):
        return size
    return _call(graph, torch.ops.aten.sym_size.int, (node, dim), like=like)


def selector_logits(graph: Graph, match: RouterMatch) -> Node:
    """The [tokens, classes] logits the selector reads: the router's logits, their leading
    ``logit_columns`` (Inkling's routed experts), [batch, seq, classes] flattened (Zaya)."""
    logits = match.logits
    if match.logit_columns is not None:
        logits = _call(graph, operator.getitem, (logits, (Ellipsis, slice(None, match.logit_columns, None))),
                       like=match.topk)
    if example_value(logits).dim() != 2:
        logits = _call(graph, "reshape", (logits, -1, match.classes), like=match.topk)
    return logits


def _as_router_shape(graph: Graph, chosen: Node, match: RouterMatch) -> Node:
    """The selector's [tokens, k] output viewed as the router's top-k ([batch, seq, k] for a
    [batch, seq, classes] router)."""
    ndim = example_value(match.logits).dim()
    if ndim == 2:
        return chosen
    sizes = [_size(graph, match.logits, d, match.topk) for d in range(ndim - 1)]
    return _call(graph, "view", (chosen, *sizes, match.top_k), like=match.topk)

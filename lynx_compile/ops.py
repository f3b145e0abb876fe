"""The two custom ops the lynx passes insert into a graph.

``lynx::select_experts`` replaces a router's top-k; ``lynx::grouped_experts`` replaces the
experts dispatch. Both are opaque to Inductor (``torch.library.custom_op`` with a fake
implementation), so a compiled graph calls them like any fallback kernel.
"""

from __future__ import annotations

import functools

import torch

from . import capture
from .kernels.experts_cpu import grouped_experts_cpu
from .kernels.experts_ref import check_experts_args, grouped_experts_reference
from .selector import RouterRule, route_batch_aware, route_plain


def is_decode_step(num_tokens: int, seq_len: int) -> bool:
    """Memory-bound decode: one new token per sequence and at least 2 tokens in the step."""
    return seq_len == 1 and num_tokens >= 2


@torch.library.custom_op("lynx::select_experts", mutates_args=())
def select_experts_op(
    router_logits: torch.Tensor,
    score_bias: torch.Tensor | None,
    top_k: int,
    seq_len: int,
    alpha: float,
    beta: int | None,
    decode_only: bool,
    scoring: str,
    renormalize: bool,
    softmax_after_topk: bool,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing for one MoE layer: batch-aware in decode steps, plain top-k otherwise.

    ``seq_len`` is the sequence length of the layer input, read from the graph (a prefill
    of 16 tokens and a decode step of 16 sequences have the same token count). The rest
    is the router's rule (``selector.RouterRule``).
    """
    rule = _rule(scoring, renormalize, softmax_after_topk, num_groups, topk_groups, group_score, scaling_factor)
    return _route(router_logits, score_bias, top_k, seq_len, alpha, beta, decode_only, rule, route_batch_aware)


@functools.lru_cache(maxsize=None)
def _rule(*fields) -> RouterRule:
    """The op's rule arguments as a RouterRule, built (and validated) once per distinct rule."""
    return RouterRule(*fields)


def _route(router_logits, score_bias, top_k, seq_len, alpha, beta, decode_only, rule, batch_aware):
    logits = router_logits.float()
    bias = None if score_bias is None else score_bias.float()
    num_tokens = logits.shape[0]
    rerouted = num_tokens >= 2 and (not decode_only or is_decode_step(num_tokens, seq_len))
    if rerouted:
        weights, ids = batch_aware(logits, top_k, alpha, beta, rule, bias)
    else:  # the router's own ops, so prefill numerics are unchanged
        weights, ids = route_plain(logits, top_k, rule, bias)
    capture.record_routing(logits, seq_len, ids, weights, rerouted, rule, alpha, beta, bias)
    return weights, ids


@select_experts_op.register_kernel("cuda")
def _(router_logits, score_bias, top_k, seq_len, alpha, beta, decode_only, scoring, renormalize,
      softmax_after_topk, num_groups, topk_groups, group_score, scaling_factor):
    rule = _rule(scoring, renormalize, softmax_after_topk, num_groups, topk_groups, group_score, scaling_factor)
    kernels = _cuda_kernels()
    # The Triton selector covers ungrouped softmax routers; softmax over the chosen k logits
    # (GPT-OSS) is softmax -> top-k -> renormalise.
    triton_rules = (RouterRule(renormalize=renormalize), RouterRule(renormalize=True, softmax_after_topk=True))
    if kernels is not None and rule in triton_rules and score_bias is None:
        def batch_aware(logits, top_k, alpha, beta, rule, bias):
            return kernels.select_experts_triton(logits, top_k, alpha, beta, True if rule.softmax_after_topk else rule.renormalize)
    else:  # rules the Triton kernel does not cover run the torch reference on the GPU
        batch_aware = route_batch_aware
    return _route(router_logits, score_bias, top_k, seq_len, alpha, beta, decode_only, rule, batch_aware)


@select_experts_op.register_fake
def _(router_logits, score_bias, top_k, seq_len, alpha, beta, decode_only, *rule):
    num_tokens = router_logits.shape[0]
    weights = router_logits.new_empty((num_tokens, top_k), dtype=torch.float32)
    ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int64)
    return weights, ids


@torch.library.custom_op("lynx::grouped_experts", mutates_args=())
def grouped_experts_op(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_up: torch.Tensor | None,
    b_gate_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    activation: str,
    layout: str,
    activation_args: list[float],
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(hidden[t])``.

    Gated-MLP experts stored as ``layout`` describes (``kernels/experts_ref.py``). Output has
    ``hidden``'s dtype and shape. An id equal to the number of experts in the weights is an
    empty slot (expert parallelism: the expert lives on another rank) and adds nothing. This default implementation serves devices without a
    specialised kernel.
    """
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    return grouped_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up,
                                     b_gate_up, b_down, activation, layout, activation_args)


@grouped_experts_op.register_kernel("cpu")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args):
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    return grouped_experts_cpu(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up,
                               b_down, activation, layout, activation_args)


@grouped_experts_op.register_kernel("cuda")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args):
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    kernels = _cuda_kernels()
    run = kernels.grouped_experts_triton if kernels else grouped_experts_reference
    return run(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
               activation, layout, activation_args)


@functools.cache
def _cuda_kernels():
    """The Triton kernels module, or None where Triton is not installed."""
    try:
        from .kernels import triton_kernels
    except ImportError:
        return None
    return triton_kernels


@grouped_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args):
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    return torch.empty_like(hidden)

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
from .selector import batch_aware_topk, softmax_topk_weights, topk_ids


def is_decode_step(num_tokens: int, seq_len: int) -> bool:
    """Memory-bound decode: one new token per sequence and at least 2 tokens in the step."""
    return seq_len == 1 and num_tokens >= 2


@torch.library.custom_op("lynx::select_experts", mutates_args=())
def select_experts_op(
    router_logits: torch.Tensor,
    top_k: int,
    seq_len: int,
    alpha: float,
    beta: int | None,
    renormalize: bool,
    decode_only: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing for one MoE layer: batch-aware in decode steps, plain top-k otherwise.

    ``seq_len`` is the sequence length of the layer input, read from the graph (a prefill
    of 16 tokens and a decode step of 16 sequences have the same token count).
    """
    return _route(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only, _batch_aware_torch)


def _batch_aware_torch(logits, top_k, alpha, beta, renormalize):
    ids = batch_aware_topk(logits, top_k, alpha, beta)
    return softmax_topk_weights(logits, ids, top_k, renormalize), ids


def _route(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only, batch_aware):
    logits = router_logits.float()
    num_tokens = logits.shape[0]
    rerouted = num_tokens >= 2 and (not decode_only or is_decode_step(num_tokens, seq_len))
    if rerouted:
        weights, ids = batch_aware(logits, top_k, alpha, beta, renormalize)
    else:
        # Plain routing with the model's own ops, so prefill numerics are unchanged.
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    capture.record_routing(logits, seq_len, ids, weights, rerouted)
    return weights, ids


@select_experts_op.register_kernel("cuda")
def _(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only):
    kernels = _cuda_kernels()
    batch_aware = kernels.select_experts_triton if kernels else _batch_aware_torch
    return _route(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only, batch_aware)


@select_experts_op.register_fake
def _(router_logits, top_k, seq_len, alpha, beta, renormalize, decode_only):
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
    ``hidden``'s dtype and shape. This default implementation serves devices without a
    specialised kernel.
    """
    capture.record_dispatch(topk_ids)
    return grouped_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up,
                                     b_gate_up, b_down, activation, layout, activation_args)


@grouped_experts_op.register_kernel("cpu")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args):
    capture.record_dispatch(topk_ids)
    return grouped_experts_cpu(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up,
                               b_down, activation, layout, activation_args)


@grouped_experts_op.register_kernel("cuda")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args):
    capture.record_dispatch(topk_ids)
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

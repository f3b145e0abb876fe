"""The two custom ops the lynx passes insert into a graph.

``lynx::select_experts`` replaces a router's top-k; ``lynx::grouped_experts`` replaces the
experts dispatch. Both are ``torch.library.custom_op``s with fake implementations. The experts
op is opaque to Inductor (a compiled graph calls its kernel like any fallback); the selector is
small static-shaped torch (on CPU around two C++ ops, ``kernels/select_cpu.py``), which the
backend lets Inductor trace and fuse (``select_experts_decomposition``) unless the user asks to
observe every call.
"""

from __future__ import annotations

import functools

import torch

from . import capture
from .kernels.experts_cpu import grouped_experts_cpu
from .kernels.experts_ref import check_experts_args, check_post_norm, grouped_experts_reference
from .policies import get_policy
from .policies.rules import RouterRule
from .selector import route
from .step import step_decision


@torch.library.custom_op("lynx::select_experts", mutates_args=())
def select_experts_op(
    router_logits: torch.Tensor,
    score_bias: torch.Tensor | None,
    step_state: torch.Tensor | None,
    step_mask: torch.Tensor | None,
    top_k: int,
    seq_len: int,
    policy: str,
    policy_args: list[float],
    decode_only: bool,
    scoring: str,
    renormalize: bool,
    softmax_after_topk: bool,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scaling_factor: float,
    bias_on_logits: bool = False,
    jitter_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing for one MoE layer: batch-aware in steps that re-route, plain top-k otherwise.

    ``step_state``/``step_mask``: the device's step context (``lynx_compile.step``), read at run
    time. ``seq_len``: the layer input's sequence length read from the graph (the shape rule:
    a step is a decode step when it is 1), or -1 where the layout gives none. ``policy`` and its
    ``policy_args`` (``policies.Policy.encode``: its knobs, then the expert-parallel cap's rank
    count if any), then the router's rule (``RouterRule``).
    """
    rule = _rule(scoring, renormalize, softmax_after_topk, num_groups, topk_groups, group_score, scaling_factor,
                 bias_on_logits, jitter_eps)
    weights, ids, voters, live = _select(router_logits, score_bias, step_state, step_mask, top_k, seq_len,
                                         policy, policy_args, decode_only, rule)
    capture.record_routing(router_logits, seq_len, ids, weights, voters, live, rule, policy,
                           get_policy(policy).decode(policy_args), score_bias)
    return weights, ids


def _select(router_logits, score_bias, step_state, step_mask, top_k, seq_len, policy, policy_args, decode_only,
            rule: RouterRule):
    rerouting, live = step_decision(step_state, step_mask, router_logits.shape[0], seq_len, decode_only,
                                    router_logits.device)
    chosen = get_policy(policy)
    weights, ids, voters = route(router_logits, score_bias, top_k, rule, policy, chosen.decode(policy_args), rerouting,
                                 live, chosen.ep_ranks(policy_args))
    return weights, ids, voters, live


def select_experts_decomposition(router_logits, score_bias, step_state, step_mask, top_k, seq_len, policy,
                                 policy_args, decode_only, *rule_fields):
    """What Inductor traces in place of the op (``backend.py``): the same routing, fused."""
    weights, ids, _, _ = _select(router_logits, score_bias, step_state, step_mask, top_k, seq_len, policy,
                                 policy_args, decode_only, _rule(*rule_fields))
    return weights, ids


@functools.lru_cache(maxsize=None)
def _rule(*fields) -> RouterRule:
    """The op's rule arguments as a RouterRule, built (and validated) once per distinct rule."""
    return RouterRule(*fields)


@select_experts_op.register_fake
def _(router_logits, score_bias, step_state, step_mask, top_k, *rest):
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
    post_norm_weight: torch.Tensor | None = None,
    post_norm: str = "none",
    post_norm_args: list[float] | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * norm(expert_{topk_ids[t, j]}(hidden[t]))``.

    MLP experts (gated, or an up projection alone) stored as ``layout`` describes (``kernels/experts_ref.py``). Output has
    ``hidden``'s dtype and shape. An id equal to the number of experts in the weights is an
    empty slot (expert parallelism: the expert lives on another rank) and adds nothing. ``norm``:
    the post-expert norm ``post_norm`` with its weight and ``post_norm_args`` (``experts_ref.POST_NORMS``;
    by default none). This default implementation serves devices without a specialised kernel.
    """
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    return grouped_experts_reference(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up,
                                     b_gate_up, b_down, activation, layout, activation_args,
                                     post_norm_weight, post_norm, post_norm_args)


@grouped_experts_op.register_kernel("cpu")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args,
      post_norm_weight=None, post_norm="none", post_norm_args=None):
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    return grouped_experts_cpu(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up,
                               b_down, activation, layout, activation_args, post_norm_weight, post_norm, post_norm_args)


@grouped_experts_op.register_kernel("cuda")
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args,
      post_norm_weight=None, post_norm="none", post_norm_args=None):
    capture.record_dispatch(topk_ids, w_gate_up.shape[0])
    kernels = _cuda_kernels()
    run = kernels.grouped_experts_triton if kernels else grouped_experts_reference
    return run(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
               activation, layout, activation_args, post_norm_weight, post_norm, post_norm_args)


@functools.cache
def _cuda_kernels():
    """The Triton kernels module, or None where Triton is not installed."""
    try:
        from .kernels import triton_kernels
    except ImportError:
        return None
    return triton_kernels


@grouped_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args,
      post_norm_weight=None, post_norm="none", post_norm_args=None):
    check_experts_args(w_gate_up, w_down, w_up, b_gate_up, b_down, activation, layout, activation_args)
    check_post_norm(post_norm, post_norm_weight, post_norm_args, hidden.shape[-1])
    return torch.empty_like(hidden)

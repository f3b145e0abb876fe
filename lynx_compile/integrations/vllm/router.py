"""``LynxRouter``: wraps the router vLLM built for a MoE layer and re-routes its decode steps.

The wrapped router computes vLLM's own top-k first, unchanged; then the opaque op
``lynx_vllm::reroute`` returns it as is (prefill, mixed steps, piecewise graphs) or replaces
it with the batch-aware choice. The op is opaque so that torch.compile, which traces vLLM's
MoE on CPU, keeps the decision out of the compiled graph: it is made on every call from the
forward context. On GPU the whole MoE layer already is one opaque op (``vllm.moe_forward``).

``LynxRouter`` is a ``BaseRouter``: vLLM's routed-experts capture and EPLB's logical ->
physical mapping apply to the ids it returns, as they would to the wrapped router's. Expert
ids stay global (logical); expert parallel's expert map is applied downstream by the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from .rules import RouterSpec, score_bias
from .select import route
from .step import read_step

# layer name -> its LynxRouter, for the op (which takes strings, not objects).
ROUTERS: dict[str, LynxRouter] = {}


@dataclass(frozen=True)
class LayerPlan:
    """How one MoE layer is re-routed."""

    name: str
    policy: str
    spec: RouterSpec
    top_k: int
    knobs: dict  # the policy's knobs (lynx: alpha, beta; oea: k0; xshare: budget)
    decode_only: bool
    trust_padding: bool


class LynxRouter(BaseRouter):
    def __init__(self, inner: BaseRouter, plan: LayerPlan, stats):
        super().__init__(top_k=inner.top_k, global_num_experts=inner.global_num_experts,
                         eplb_state=inner.eplb_state)
        self.inner = inner
        self.plan = plan
        self.stats = stats
        ROUTERS[plan.name] = self

    def __getattr__(self, name: str):
        # Attributes model code reads off its router (e.g. e_score_correction_bias) are the inner router's.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def routing_method_type(self):
        return self.inner.routing_method_type

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = self.inner._compute_routing(hidden_states, router_logits, indices_type, input_ids=input_ids)
        return torch.ops.lynx_vllm.reroute(router_logits, weights, ids, self.plan.name)

    def reroute(self, router_logits: torch.Tensor, plain_weights: torch.Tensor, plain_ids: torch.Tensor):
        plan = self.plan
        step = read_step(router_logits.shape[0], plan.decode_only, plan.trust_padding)
        if not step.reroute:
            weights, ids = plain_weights.clone(), plain_ids.clone()
        else:
            weights, ids = route(router_logits, plan.top_k, policy=plan.policy, knobs=plan.knobs, live=step.live,
                                 decode=True, score_bias=score_bias(self.inner), **plan.spec.keywords())
            # Slots vLLM's router marked as skipped (-1: padding rows) stay skipped.
            skipped = plain_ids < 0
            ids = torch.where(skipped, plain_ids, ids.to(plain_ids.dtype))
            weights = torch.where(skipped, plain_weights, weights.to(plain_weights.dtype))
        self.stats.record(plan.name, plain_ids, ids, step.live, step.decode, step.reroute)
        return weights, ids


@torch.library.custom_op("lynx_vllm::reroute", mutates_args=())
def reroute_op(router_logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's (weights, ids) for this call, or lynx's batch-aware choice in a decode step."""
    router = ROUTERS.get(layer_name)
    if router is None:
        raise RuntimeError(f"lynx: no MoE layer named {layer_name!r} was built with lynx in this process")
    return router.reroute(router_logits, weights, ids)


@reroute_op.register_fake
def _(router_logits, weights, ids, layer_name):
    return torch.empty_like(weights), torch.empty_like(ids)

"""What rule a vLLM router routes by, read from the router vLLM built for a MoE layer.

Each supported router class is matched exactly (a subclass may route differently), and its
attributes are turned into the ``select_experts`` keywords that reproduce its top-k. A
router lynx cannot reproduce gets a reason instead, and vLLM keeps routing that layer.

GPT-OSS needs no rule of its own here: vLLM builds its router as softmax top-k renormalised,
which is softmax over the chosen k logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouterSpec:
    """The router's rule as ``select_experts`` keywords; the score bias is read at call time."""

    scoring: str = "softmax"
    renormalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scaling_factor: float = 1.0
    has_bias: bool = False

    def keywords(self) -> dict:
        return dict(scoring=self.scoring, renormalize=self.renormalize, num_groups=self.num_groups,
                    topk_groups=self.topk_groups, group_score=self.group_score,
                    scaling_factor=self.scaling_factor)

    def describe(self, top_k: int, num_experts: int) -> str:
        text = f"{self.scoring} top-{top_k} of {num_experts}"
        if self.has_bias:
            text += " + selection bias"
        if self.num_groups > 1:
            text += f", best {self.topk_groups} of {self.num_groups} groups ({self.group_score})"
        text += ", renormalised" if self.renormalize else ", not renormalised"
        if self.scaling_factor != 1.0:
            text += f", x{self.scaling_factor:g}"
        return text


def score_bias(router) -> torch.Tensor | None:
    """The router's selection-only bias, as it is now (weights are loaded after the router is built)."""
    bias = getattr(router, "e_score_correction_bias", None)
    return None if bias is None else bias.data


def router_spec(router, num_experts: int) -> RouterSpec | str:
    """The rule of ``router`` over ``num_experts`` logits, or why lynx leaves it alone."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import FusedTopKBiasRouter
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter

    kind = type(router)
    name = kind.__name__
    if kind is FusedTopKRouter:
        return _ungrouped(router.scoring_func, router.renormalize, 1.0, None, name)
    if kind is FusedTopKBiasRouter:
        if router._hash_indices_table is not None or router.bias_vl is not None:
            return f"{name}: hash or vision routing (DeepSeek-V4) is not a top-k lynx can reproduce"
        if router.num_fused_shared_experts:
            return f"{name}: fused shared-expert slots are appended to the routed top-k"
        return _ungrouped(router.scoring_func, router.renormalize, router.routed_scaling_factor,
                          router.e_score_correction_bias, name)
    if kind is GroupedTopKRouter:
        if router.num_fused_shared_experts:
            return f"{name}: fused shared-expert slots are appended to the routed top-k"
        # GroupedTopKRouter falls back to ungrouped top-k when the grouping is degenerate.
        groups = router.num_expert_group
        if num_experts <= groups or num_experts % groups:
            if router.e_score_correction_bias is None:
                return f"{name}: degenerate grouping without bias runs a softmax top-k whatever scoring_func says"
            return _ungrouped(router.scoring_func, router.renormalize, router.routed_scaling_factor,
                              router.e_score_correction_bias, name)
        return _grouped(router, name)
    if kind is CPURouter:
        if router.custom_routing_function is not None:
            return f"{name}: a custom routing function ({_function_name(router.custom_routing_function)})"
        if router.use_grouped_topk:
            return _grouped(router, name)
        if router.scoring_func != "softmax":
            return f"{name}: scoring {router.scoring_func!r} without grouping"
        return RouterSpec(renormalize=bool(router.renormalize))
    return f"{name}: not a router lynx knows (supported: FusedTopKRouter, FusedTopKBiasRouter, " \
           f"GroupedTopKRouter, CPURouter)"


def _ungrouped(scoring: str, renormalize: bool, scaling: float, bias, name: str) -> RouterSpec | str:
    if scoring not in ("softmax", "sigmoid"):
        return f"{name}: scoring {scoring!r}"
    if bias is not None and scoring != "sigmoid":
        return f"{name}: a bias added to softmax probabilities before top-k"
    return RouterSpec(scoring=scoring, renormalize=bool(renormalize), scaling_factor=float(scaling),
                      has_bias=bias is not None)


def _grouped(router, name: str) -> RouterSpec | str:
    """vLLM's grouped top-k: a group scores its best two (biased) scores with a bias, else its best."""
    scoring = router.scoring_func
    bias = router.e_score_correction_bias
    if scoring not in ("softmax", "sigmoid"):
        return f"{name}: scoring {scoring!r}"
    if bias is not None and scoring != "sigmoid":
        return f"{name}: a bias added to softmax probabilities before top-k"
    groups, best = int(router.num_expert_group), int(router.topk_group)
    if groups <= 1:  # one group is every expert: plain (biased) top-k
        groups = best = 1
    return RouterSpec(scoring=scoring, renormalize=bool(router.renormalize), num_groups=groups,
                      topk_groups=best, group_score="top2_sum" if bias is not None else "max",
                      scaling_factor=float(router.routed_scaling_factor), has_bias=bias is not None)


def _function_name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__

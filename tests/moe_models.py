"""Tiny transformers MoE models for tests, built from configs (no downloads), and for each
family an independent reference router that routes with ``lynx_compile.select_experts``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from lynx_compile import select_experts

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
    bos_token_id=None,
)
_DEEPSEEK = dict(
    _COMMON, num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=16,
    num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=0, n_shared_experts=1,
    q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
)


@dataclass
class Family:
    config: Callable[[], object]
    top_k: int
    num_experts: int
    rule: str  # the report's rule text
    layout: str
    router: str  # attribute of the MoE block holding the router
    route: Callable  # (router module, router logits fp32, alpha, beta) -> (weights, ids), via select_experts
    weights_in_logits_dtype: bool = False  # the router casts its weights to the logits' dtype
    fp32_logits: bool = False  # the router computes its linear layer in fp32 (DeepSeek)

    def reference_forward(self, gate, alpha, beta, chosen: list):
        """A replacement ``gate.forward`` routing with ``select_experts``; records the ids."""

        def forward(hidden_states):
            x = hidden_states.reshape(-1, hidden_states.shape[-1])
            bias = getattr(gate, "bias", None) if isinstance(getattr(gate, "bias", None), torch.Tensor) else None
            if self.fp32_logits:
                logits = F.linear(x.float(), gate.weight.float())
            else:
                logits = F.linear(x, gate.weight, bias)
            weights, ids = self.route(gate, logits.float(), alpha, beta)
            out_dtype = x.dtype if self.weights_in_logits_dtype else weights.dtype
            chosen.append(ids)
            return logits.to(x.dtype), weights.to(out_dtype), ids

        return forward


def _softmax(renormalize):
    def route(gate, logits, alpha, beta):
        return select_experts(logits, gate.top_k, alpha=alpha, beta=beta, renormalize=renormalize)
    return route


def _deepseek_v2(gate, logits, alpha, beta):
    return select_experts(logits, gate.top_k, alpha=alpha, beta=beta, renormalize=False, num_groups=gate.num_group,
                          topk_groups=gate.topk_group, group_score="max", scaling_factor=gate.routed_scaling_factor)


def _deepseek_v3(gate, logits, alpha, beta):
    return select_experts(logits, gate.top_k, alpha=alpha, beta=beta, scoring="sigmoid",
                          score_bias=gate.e_score_correction_bias, num_groups=gate.num_group,
                          topk_groups=gate.topk_group, group_score="top2_sum",
                          scaling_factor=gate.routed_scaling_factor, renormalize=gate.norm_topk_prob)


def _gpt_oss(gate, logits, alpha, beta):
    return select_experts(logits, gate.top_k, alpha=alpha, beta=beta, softmax_after_topk=True)


FAMILIES = {
    "mixtral": Family(
        lambda: MixtralConfig(**_COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2),
        2, 8, "softmax, renormalised", "gate_up_concat", "gate", _softmax(True)),
    "qwen2_moe": Family(
        lambda: Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=16,
                               num_experts_per_tok=4, shared_expert_intermediate_size=40, norm_topk_prob=False),
        4, 16, "softmax, not renormalised", "gate_up_concat", "gate", _softmax(False), True),
    "qwen3_moe": Family(
        lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=16,
                               num_experts_per_tok=4, norm_topk_prob=True, head_dim=12),
        4, 16, "softmax, renormalised", "gate_up_concat", "gate", _softmax(True), True),
    "olmoe": Family(
        lambda: OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        4, 16, "softmax, not renormalised", "gate_up_concat", "gate", _softmax(False), True),
    "deepseek_v2": Family(
        lambda: DeepseekV2Config(**_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=2.0),
        4, 16, "softmax, 4 groups top 2 (max), not renormalised, x2", "gate_up_concat", "gate", _deepseek_v2,
        fp32_logits=True),
    "deepseek_v3": Family(
        lambda: DeepseekV3Config(**_DEEPSEEK, routed_scaling_factor=2.5, norm_topk_prob=True),
        4, 16, "sigmoid+bias, 4 groups top 2 (top2_sum), renormalised, x2.5", "gate_up_concat", "gate", _deepseek_v3,
        fp32_logits=True),
    "gpt_oss": Family(
        lambda: GptOssConfig(**{**_COMMON, "num_key_value_heads": 2}, intermediate_size=24, num_local_experts=8,
                             num_experts_per_tok=2, head_dim=12, layer_types=["sliding_attention", "full_attention"]),
        2, 8, "softmax, softmax over top-k", "gate_up_interleaved_t", "router", _gpt_oss, True),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, router_scale: float = 40.0,
               experts_implementation: str | None = None):
    """A random tiny model of ``family``. Router weights are scaled up so routing is skewed
    (random init gives near-uniform routers, where no selector has anything to do)."""
    torch.manual_seed(seed)
    config = FAMILIES[family].config()
    if experts_implementation:
        config._experts_implementation = experts_implementation
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, gate in router_modules(model, family):
            gate.weight.mul_(router_scale)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn_like(gate.e_score_correction_bias) * 0.05)
    return model.to(dtype)


def router_modules(model, family: str) -> list[tuple[str, torch.nn.Module]]:
    suffix = "mlp." + FAMILIES[family].router
    return [(n, m) for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "top_k")]


def moe_blocks(model, family: str) -> list[str]:
    return [name.rsplit(".", 1)[0] for name, _ in router_modules(model, family)]

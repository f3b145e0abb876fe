"""Tiny transformers MoE models for tests, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
    bos_token_id=None,
)

# family -> (config, top_k, num_experts, renormalize)
FAMILIES = {
    "mixtral": (lambda: MixtralConfig(**_COMMON, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2), 2, 8, True),
    "qwen2_moe": (lambda: Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=16,
                                         num_experts_per_tok=4, shared_expert_intermediate_size=40, norm_topk_prob=False), 4, 16, False),
    "qwen3_moe": (lambda: Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=16,
                                         num_experts_per_tok=4, norm_topk_prob=True, head_dim=12), 4, 16, True),
    "olmoe": (lambda: OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                                  norm_topk_prob=False), 4, 16, False),
}


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, router_scale: float = 40.0):
    """A random tiny model of ``family``. Router weights are scaled up so routing is skewed
    (random init gives near-uniform routers, where no selector has anything to do)."""
    torch.manual_seed(seed)
    config = FAMILIES[family][0]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_scale)
    return model.to(dtype)


def router_modules(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]

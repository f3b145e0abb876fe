"""Tiny MoE checkpoints for the vLLM tests: random transformers models saved to a directory.

Random weights from transformers' own init (std 0.02), not vLLM's dummy loader (+-1e-3,
which makes every router logit ~0 and every expert tie). The Qwen3-MoE case is the shipped,
trained ``models/lynx-tiny-moe``.
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "lynx-tiny-moe"


def build_mixtral(directory: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=16,
                           num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
    return _save(MixtralForCausalLM, config, directory)


def build_deepseek_v3(directory: Path) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                              num_hidden_layers=2, first_k_dense_replace=0, num_attention_heads=2,
                              num_key_value_heads=2, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                              kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32,
                              v_head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
                              rope_scaling=None)
    # MLA on vLLM needs kv_lora_rank + qk_rope_head_dim in (320, 512, 576).
    # DeepSeek-V3's own config.json says these; transformers does not, vLLM reads them.
    config.scoring_func, config.topk_method = "sigmoid", "noaux_tc"
    return _save(DeepseekV3ForCausalLM, config, directory, bias_std=0.05)


def _save(model_class, config, directory: Path, bias_std: float = 0.0) -> Path:
    torch.manual_seed(0)
    model = model_class(config).float()
    if bias_std:  # the selection bias starts at zero; give it values so that it matters
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * bias_std)
        for name, tensor in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                tensor.data.copy_(torch.randn_like(tensor) * bias_std)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory

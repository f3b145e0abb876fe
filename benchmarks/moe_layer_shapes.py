"""The MoE layers the GPU benchmark times: expert shapes, layouts, router rules, and the
selector settings (ALGORITHM.md's release table, or the nearest model in it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    layout: str
    activation: str
    activation_args: tuple
    bias: bool
    renormalize: bool
    alpha: float
    beta: int | None
    settings: str  # where (alpha, beta) come from
    hf_class: str


MODELS = [
    ModelShape("Mixtral-8x7B", 4096, 14336, 8, 2, "gate_up_concat", "silu", (), False, True, 0.7, 1,
               "release", "transformers.models.mixtral.modeling_mixtral.MixtralExperts"),
    ModelShape("Qwen3-30B-A3B", 2048, 768, 128, 8, "gate_up_concat", "silu", (), False, True, 3.0, 2,
               "release", "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts"),
    ModelShape("OLMoE-1B-7B", 2048, 1024, 64, 8, "gate_up_concat", "silu", (), False, False, 3.0, 4,
               "Qwen2-57B-A14B's (same k/E = 8/64; OLMoE has none)",
               "transformers.models.olmoe.modeling_olmoe.OlmoeExperts"),
    # GPT-OSS routes top-k logits -> softmax over k, which equals softmax -> top-k -> renormalise.
    ModelShape("gpt-oss-20b", 2880, 2880, 32, 4, "gate_up_interleaved_t", "swiglu_oai", (1.702, 7.0), True, True,
               3.0, 2, "gpt-oss-120b's (k = 4; 32 vs 128 experts)",
               "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts"),
]
BATCHES = (1, 2, 4, 8, 16, 32, 64)

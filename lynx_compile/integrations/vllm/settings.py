"""(alpha, beta) for a vLLM MoE layer, through the compile backend's own resolution.

``lynx_compile.settings`` knows the authors' released settings by transformers MoE block
class; vLLM names models by architecture, so this maps one to the other and nothing more.
``layer_settings`` keys may be the vLLM layer name (``model.layers.3.mlp.experts``, the
``layer`` field of the stats) or its parent module (``model.layers.3.mlp``).
"""

from __future__ import annotations

from ...options import LynxOptions
from ...settings import SelectorSettings, resolve_settings

# vLLM architecture -> the transformers MoE block the released table is keyed by.
RELEASED_BLOCKS = {
    "MixtralForCausalLM": "MixtralSparseMoeBlock",
    "Qwen2MoeForCausalLM": "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeForCausalLM": "Qwen3MoeSparseMoeBlock",
    "DeepseekV2ForCausalLM": "DeepseekV2Moe",
    "GptOssForCausalLM": "GptOssMLP",
    "Llama4ForConditionalGeneration": "Llama4TextMoe",
    "Llama4ForCausalLM": "Llama4TextMoe",
}


def layer_settings_key(options: LynxOptions, layer_name: str) -> str:
    """The key ``resolve_settings`` looks up: the layer name, or its parent if only that is given."""
    settings = options.layer_settings or {}
    if layer_name in settings:
        return layer_name
    parent = layer_name.rsplit(".", 1)[0]
    return parent if parent in settings else layer_name


def selector_settings(options: LynxOptions, layer_name: str, architecture: str | None, top_k: int,
                      num_experts: int, hidden_size: int | None) -> SelectorSettings:
    block = RELEASED_BLOCKS.get(architecture or "", architecture or "")
    return resolve_settings(options, layer_settings_key(options, layer_name), block, top_k, num_experts,
                            hidden_size)

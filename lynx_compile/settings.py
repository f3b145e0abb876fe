"""Default (alpha, beta) for a matched MoE layer when the user gives none.

Order: per-layer settings (``layer_settings``, e.g. from ``lynx_compile.calibrate``), then the
``alpha``/``beta`` options, then the authors' released setting when the layer is one of the
released models, then a default derived from (k, E).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectorSettings:
    alpha: float
    beta: int | None  # None: no clamp
    source: str  # where the numbers came from, for the report


@dataclass(frozen=True)
class ReleasedSetting:
    model: str
    block: str  # the transformers MoE block class
    top_k: int
    num_experts: int
    alpha: float
    beta: int | None
    hidden_size: int | None = None  # tells models of one family and shape apart


# The Lynx authors' released per-model settings (ALGORITHM.md). Llama-4 is listed for
# completeness: transformers' Llama-4 routes densely and is not rewritten.
RELEASED = (
    ReleasedSetting("Mixtral-8x7B", "MixtralSparseMoeBlock", 2, 8, 0.7, 1, hidden_size=4096),
    ReleasedSetting("Mixtral-8x22B", "MixtralSparseMoeBlock", 2, 8, 1.0, 1, hidden_size=6144),
    ReleasedSetting("Qwen2-57B-A14B", "Qwen2MoeSparseMoeBlock", 8, 64, 3.0, 4),
    ReleasedSetting("Qwen3-30B-A3B / Qwen3-235B-A22B", "Qwen3MoeSparseMoeBlock", 8, 128, 3.0, 2),
    ReleasedSetting("DeepSeek-Coder-V2", "DeepseekV2Moe", 6, 160, 1.0, 2),
    ReleasedSetting("gpt-oss-120b", "GptOssMLP", 4, 128, 3.0, 2),
    ReleasedSetting("Llama-4 Scout", "Llama4TextMoe", 1, 16, 1.0, None),
    ReleasedSetting("Llama-4 Maverick", "Llama4TextMoe", 1, 128, 1.0, None),
)


def released_setting(block: str, top_k: int, num_experts: int, hidden_size: int | None) -> ReleasedSetting | None:
    for entry in RELEASED:
        if (entry.block, entry.top_k, entry.num_experts) == (block, top_k, num_experts) and (
            entry.hidden_size is None or entry.hidden_size == hidden_size
        ):
            return entry
    return None


def derived_settings(top_k: int, num_experts: int) -> SelectorSettings:
    """A default from (k, E) alone, following the pattern of the released table.

    Top-1 routers keep every bin (Llama-4: alpha 1, no clamp); coarse routers (k/E >= 1/5,
    Mixtral's 2/8) use one wide bin below the best (alpha 1, beta 1); fine-grained routers
    (Qwen, DeepSeek, gpt-oss: k/E <= 1/8) use narrow bins (alpha 3, beta 2), the setting
    of four of the six released fine-grained models.
    """
    source = f"derived from k={top_k}, E={num_experts}"
    if top_k == 1:
        return SelectorSettings(1.0, None, source)
    if top_k / num_experts >= 0.2:
        return SelectorSettings(1.0, 1, source)
    return SelectorSettings(3.0, 2, source)


def default_settings(block: str, top_k: int, num_experts: int, hidden_size: int | None) -> SelectorSettings:
    entry = released_setting(block, top_k, num_experts, hidden_size)
    if entry is not None:
        return SelectorSettings(entry.alpha, entry.beta, f"released for {entry.model}")
    return derived_settings(top_k, num_experts)


def resolve_settings(options, module: str, block: str, top_k: int, num_experts: int,
                     hidden_size: int | None) -> SelectorSettings:
    """Per-layer settings win, then alpha/beta options; what they leave as None is the default."""
    if options.layer_settings and module in options.layer_settings:
        alpha, beta = options.layer_settings[module]
        return SelectorSettings(float(alpha), None if beta in (None, "none") else beta, "layer_settings")
    default = default_settings(block, top_k, num_experts, hidden_size)
    if options.alpha is None and options.beta is None:
        return default
    beta = default.beta if options.beta is None else (None if options.beta == "none" else options.beta)
    alpha = default.alpha if options.alpha is None else float(options.alpha)
    return SelectorSettings(alpha, beta, "options")

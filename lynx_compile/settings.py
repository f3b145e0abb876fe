"""Default (alpha, beta) for a matched MoE layer when the user gives none."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectorSettings:
    alpha: float
    beta: int | None  # None: no clamp
    source: str  # where the numbers came from, for the report


def derived_settings(top_k: int, num_experts: int) -> SelectorSettings:
    """A default from (k, E) alone, following the pattern of the released table.

    Top-1 routers keep every bin (Llama-4: alpha 1, no clamp); coarse routers (k/E >= 1/5,
    Mixtral's 2/8) use one wide bin below the best (alpha 1, beta 1); fine-grained routers
    (Qwen, DeepSeek, gpt-oss: k/E <= 1/8) use narrow bins (alpha 3, beta 2).
    """
    if top_k == 1:
        return SelectorSettings(1.0, None, f"derived from k={top_k}, E={num_experts}")
    if top_k / num_experts >= 0.2:
        return SelectorSettings(1.0, 1, f"derived from k={top_k}, E={num_experts}")
    return SelectorSettings(3.0, 2, f"derived from k={top_k}, E={num_experts}")


def resolve_settings(options, module: str, top_k: int, num_experts: int) -> SelectorSettings:
    """Per-layer settings win, then alpha/beta options; what they leave as None is the default."""
    if options.layer_settings and module in options.layer_settings:
        alpha, beta = options.layer_settings[module]
        return SelectorSettings(float(alpha), None if beta in (None, "none") else beta, "layer_settings")
    default = derived_settings(top_k, num_experts)
    if options.alpha is None and options.beta is None:
        return default
    beta = default.beta if options.beta is None else (None if options.beta == "none" else options.beta)
    alpha = default.alpha if options.alpha is None else float(options.alpha)
    return SelectorSettings(alpha, beta, "options")

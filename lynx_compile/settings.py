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


def resolve_settings(alpha, beta, top_k: int, num_experts: int) -> SelectorSettings:
    """User options win; what they leave as None comes from the default."""
    default = derived_settings(top_k, num_experts)
    if alpha is None and beta is None:
        return default
    resolved_beta = default.beta if beta is None else (None if beta == "none" else beta)
    return SelectorSettings(
        default.alpha if alpha is None else float(alpha), resolved_beta, "options"
    )

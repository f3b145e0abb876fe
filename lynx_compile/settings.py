"""Default (alpha, beta) for a matched MoE layer when the user gives none.

Order: per-layer settings (``layer_settings``, e.g. from ``lynx_compile.calibrate``), then the
``alpha``/``beta`` options, then the authors' released setting when the layer is one of the
released models, then a default derived from (k, E).
"""

from __future__ import annotations

from dataclasses import dataclass

from .options import NO_CLAMP, POLICY_KNOBS, layer_knobs
from .policies import get_policy


@dataclass(frozen=True)
class SelectorSettings:
    knobs: dict  # the policy's knobs, e.g. {"alpha": 3.0, "beta": 2} (beta None: no clamp)
    source: str  # where the numbers came from, for the report

    @property
    def alpha(self) -> float | None:
        return self.knobs.get("alpha")

    @property
    def beta(self) -> int | None:
        return self.knobs.get("beta")


@dataclass(frozen=True)
class ReleasedSetting:
    model: str
    block: str  # the transformers MoE block class
    top_k: int
    num_experts: int
    alpha: float
    beta: int | None
    hidden_size: int | None = None  # tells models of one family and shape apart


# The Lynx authors' released per-model settings (ALGORITHM.md). Llama-4's block is matched in
# its dense form (passes/router_dense.py, passes/dispatch_dense.py).
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
        return _lynx(1.0, None, source)
    if top_k / num_experts >= 0.2:
        return _lynx(1.0, 1, source)
    return _lynx(3.0, 2, source)


def _lynx(alpha: float, beta: int | None, source: str) -> SelectorSettings:
    return SelectorSettings({"alpha": alpha, "beta": beta}, source)


def default_settings(block: str, top_k: int, num_experts: int, hidden_size: int | None) -> SelectorSettings:
    entry = released_setting(block, top_k, num_experts, hidden_size)
    if entry is not None:
        return _lynx(entry.alpha, entry.beta, f"released for {entry.model}")
    return derived_settings(top_k, num_experts)


def layer_settings_key(layer_settings, module: str) -> str | None:
    """The ``layer_settings`` key for the block at ``module``.

    Paths depend on what was compiled: ``model.forward`` names a block ``model.layers.0.mlp``,
    ``model.model.forward`` names it ``layers.0.mlp``, a function over a global ``m`` names it
    ``m.model.layers.0.mlp``. A key matches when one path ends with the other at a dot, so the
    paths of the model the user holds (what ``calibrate`` returns) match whatever was compiled;
    the longest match wins.
    """
    if module in layer_settings:
        return module
    matches = [key for key in layer_settings
               if module and (key.endswith("." + module) or module.endswith("." + key))]
    return max(matches, key=len) if matches else None


def resolve_settings(options, module: str, block: str, top_k: int, num_experts: int,
                     hidden_size: int | None) -> SelectorSettings:
    """The policy's knobs for one layer: per-layer settings win, then the options; for lynx what
    they leave as None is the model's default. Knobs that do not fit the layer's router (OEA's
    k0 above its k, say) raise ``ValueError`` naming the layer."""
    if options.policy == "off":
        return SelectorSettings({}, "-")
    key = layer_settings_key(options.layer_settings or {}, module)
    given = layer_knobs(options.policy, options.layer_settings[key]) if key is not None else None
    source = "options" if given is None else "layer_settings" if key == module else f"layer_settings[{key!r}]"
    if given is None:
        given = {knob: getattr(options, knob) for knob in POLICY_KNOBS[options.policy]}
    if options.policy == "lynx":
        default = default_settings(block, top_k, num_experts, hidden_size)
        if all(value is None for value in given.values()):
            return default
        alpha = default.alpha if given.get("alpha") is None else float(given["alpha"])
        beta = given.get("beta")
        beta = default.beta if beta is None else None if beta == NO_CLAMP else beta
        settings = _lynx(alpha, beta, source)
    else:
        missing = [knob for knob, value in given.items() if value is None]
        if missing:
            raise ValueError(f"policy {options.policy!r} needs {', '.join(missing)} for {module or 'the MoE layer'} "
                             "(set the option, or give this layer its layer_settings)")
        settings = SelectorSettings(dict(given), source)
    if options.policy == "off":  # no selector: no knobs to check (get_policy knows no "off")
        return settings
    try:
        get_policy(options.policy).check_against(settings.knobs, top_k, num_experts)
    except ValueError as error:
        raise ValueError(f"{module or 'MoE layer'}: {error}") from None
    return settings

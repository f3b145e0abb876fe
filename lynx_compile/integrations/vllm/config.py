"""The plugin's settings, read from the environment: policy, selector options, stats file.

``LYNX_VLLM_POLICY``  unset: the plugin does nothing; ``off``: vLLM's routing is untouched;
                      ``lynx`` (and the peers' policies once they exist): re-route decode steps.
``LYNX_VLLM_OPTIONS`` a JSON object of the compile backend's selector options that apply to
                      vLLM (the policy's knobs alpha, beta, k0, budget; decode_only, layer_settings), validated like
                      ``torch.compile(..., options=)``.
``LYNX_VLLM_STATS``   a path: one JSON line per MoE layer call is appended there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ...options import POLICIES, LynxOptions

POLICY_ENV = "LYNX_VLLM_POLICY"
OPTIONS_ENV = "LYNX_VLLM_OPTIONS"
STATS_ENV = "LYNX_VLLM_STATS"

# The compile backend's options that mean something inside vLLM. ``policy`` comes from
# LYNX_VLLM_POLICY; ``dump_dir`` and ``compiler`` are about FX graphs, which vLLM's MoE never shows.
VLLM_OPTIONS = ("alpha", "beta", "k0", "budget", "decode_only", "layer_settings")


@dataclass(frozen=True)
class PluginConfig:
    policy: str | None  # None: LYNX_VLLM_POLICY unset
    options: LynxOptions
    stats_path: str | None

    @property
    def active(self) -> bool:
        """True when MoE routers are to be wrapped (a policy other than ``off``)."""
        return self.policy is not None and self.policy != "off"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PluginConfig:
        """Parse and validate the environment; a bad value raises ``ValueError`` naming it."""
        environ = os.environ if environ is None else environ
        policy = environ.get(POLICY_ENV, "").strip() or None
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"{POLICY_ENV}={policy!r}: expected one of {', '.join(POLICIES)}")
        options = parse_options(environ.get(OPTIONS_ENV, "").strip(), policy)
        stats_path = environ.get(STATS_ENV, "").strip() or None
        return cls(policy, options, stats_path)


def parse_options(text: str, policy: str | None) -> LynxOptions:
    if not text:
        values: dict = {}
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{OPTIONS_ENV} is not valid JSON ({error}): {text!r}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{OPTIONS_ENV} must be a JSON object, got {type(values).__name__}: {text!r}")
    for key in values:
        if key not in VLLM_OPTIONS:
            raise ValueError(
                f"{OPTIONS_ENV}: option {key!r} does not apply to vLLM; valid options: {', '.join(VLLM_OPTIONS)}"
                + (f" (the policy comes from {POLICY_ENV})" if key == "policy" else "")
            )
    try:
        return LynxOptions.from_user({**values, "policy": policy or "off"})
    except ValueError as error:
        raise ValueError(f"{OPTIONS_ENV}: {error}") from None

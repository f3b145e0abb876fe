"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts."""

from __future__ import annotations

from .config import POLICY_ENV, PluginConfig


def register() -> None:
    """Validate the environment and, unless the policy is unset or ``off``, register lynx's MoE runner."""
    config = PluginConfig.from_env()  # a bad setting stops vLLM here, with the reason
    if config.policy is None:
        return
    from vllm.logger import init_logger

    if not config.active:
        # Shown where vLLM has configured its logging before loading plugins (its worker processes).
        init_logger("vllm.lynx_compile").info_once("lynx: %s=off: vLLM's MoE routing is left untouched", POLICY_ENV)
        return
    from .runner import register_runner

    register_runner()

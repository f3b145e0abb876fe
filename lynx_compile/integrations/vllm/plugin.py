"""The ``vllm.general_plugins`` entry point: vLLM calls ``register()`` in every process it starts."""

from __future__ import annotations

import inspect

from .config import POLICY_ENV, PluginConfig


def register() -> None:
    """Validate the environment and, unless the policy is unset or ``off``, register lynx's MoE runner."""
    config = PluginConfig.from_env()  # a bad setting stops vLLM here, with the reason
    if config.policy is None:
        return
    from vllm.logger import init_logger

    logger = init_logger("vllm.lynx_compile")
    if not config.active:
        logger.info_once("lynx: %s=off: vLLM's MoE routing is left untouched", POLICY_ENV)
        return
    from ...selector import select_experts

    if config.policy != "lynx" and "policy" not in inspect.signature(select_experts).parameters:
        raise ValueError(f"{POLICY_ENV}={config.policy!r}: this lynx-compile's select_experts has no policy=")
    from .runner import register_runner

    register_runner()

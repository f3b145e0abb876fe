"""``LynxMoERunner``: vLLM's ``MoERunner`` registered out of tree, wrapping each layer's router.

vLLM instantiates ``MoERunner`` through ``PluggableLayer.__new__``, which returns the class
registered under that name with ``MoERunner.register_oot``: this is vLLM's extension point
for replacing a layer class, so no vLLM function is patched. ``LynxMoERunner`` only changes
the router handed to ``MoERunner.__init__``; a layer whose router lynx cannot reproduce gets
its own router back and runs exactly as in vLLM. Models that build their own ``MoERunner``
subclass (``runner_cls=``, e.g. the Transformers backend) are not reached.
"""

from __future__ import annotations

import vllm.envs as envs
from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.custom_op import op_registry_oot
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

from ... import __version__
from .config import PluginConfig
from .router import LayerPlan, LynxRouter
from .rules import router_spec
from .settings import selector_settings
from .stats import Stats

logger = init_logger("vllm.lynx_compile")

_stats: Stats | None = None


def process_stats(path: str | None) -> Stats:
    """The process's stats (one file, one summary line), created with the first wrapped layer."""
    global _stats
    if _stats is None or _stats.path != path:
        _stats = Stats(path, logger)
    return _stats


class LynxMoERunner(MoERunner):
    def __init__(self, layer_name, moe_config, router, routed_experts, *args, **kwargs):
        super().__init__(layer_name, moe_config, wrap_router(layer_name, moe_config, router), routed_experts,
                         *args, **kwargs)


def wrap_router(layer_name: str, moe_config, router):
    """A ``LynxRouter`` around ``router``, or ``router`` itself when lynx leaves the layer alone."""
    config = PluginConfig.from_env()
    if not config.active:
        return router
    top_k, num_experts = moe_config.experts_per_token, moe_config.num_logical_experts
    spec = router_spec(router, num_experts) if isinstance(router, BaseRouter) else \
        f"{type(router).__name__}: not a BaseRouter"
    if isinstance(spec, str):
        logger.info_once("lynx leaves MoE layers routed by %s untouched", spec)
        logger.debug("lynx: %s left untouched: %s", layer_name, spec)
        return router
    vllm_config = get_current_vllm_config_or_none()
    model_config = vllm_config.model_config if vllm_config is not None else None
    architecture = model_config.architectures[0] if model_config is not None and model_config.architectures else None
    hidden = moe_config.hidden_dim_unpadded or moe_config.hidden_dim
    settings = selector_settings(config.options, layer_name, architecture, top_k, num_experts, hidden)
    plan = LayerPlan(layer_name, config.policy, spec, top_k, dict(settings.knobs), config.options.decode_only,
                     trust_padding=envs.VLLM_MOE_SKIP_PADDING)
    if vllm_config is not None:
        mark_compile_cache(vllm_config)
    knobs = ", ".join(f"{name}={'none' if value is None else format(value, 'g')}"
                      for name, value in settings.knobs.items())
    logger.info_once("lynx (%s) re-routes %s steps of MoE layers with %s: %s (%s)", config.policy,
                     "decode" if plan.decode_only else "all", spec.describe(top_k, num_experts), knobs, settings.source)
    return LynxRouter(router, plan, process_stats(config.stats_path))


def mark_compile_cache(vllm_config) -> None:
    """Put lynx into the config hash, so a compiled model cached without lynx is not reused with it.

    vLLM keys its torch.compile cache by the config and vLLM's own environment, not by
    out-of-tree layers; ``additional_config`` is the config field meant for plugins.
    """
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra.setdefault("lynx_compile", {"router": "LynxRouter", "version": __version__})
    else:
        logger.warning_once("lynx: additional_config is not a dict; a compile cache made without lynx "
                            "could be reused: set VLLM_DISABLE_COMPILE_CACHE=1")


def register_runner() -> None:
    """Register ``LynxMoERunner`` as vLLM's ``MoERunner`` (idempotent; refuses to displace another plugin's)."""
    registered = op_registry_oot.get("MoERunner")
    if registered is LynxMoERunner:
        return
    if registered is not None:
        raise RuntimeError(f"lynx: another plugin already replaces vLLM's MoERunner ({registered.__module__}."
                           f"{registered.__qualname__}); unset LYNX_VLLM_POLICY or remove that plugin")
    MoERunner.register_oot(LynxMoERunner)

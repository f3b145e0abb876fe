"""The lynx graph pass: find MoE layers in a dynamo FX graph and rewrite them.

For every ``topk`` in the graph: match a router pattern (``routers.py``), then the experts
dispatch it feeds (``dispatch.py``). A layer is rewritten only when both match; everything
else is left exactly as it was and reported with the reason.
"""

from __future__ import annotations

import logging

from torch.fx import GraphModule

from ..options import LynxOptions
from ..policies import get_policy
from ..report import LynxReport, MatchedLayer, UnmatchedCandidate, describe_rule
from ..settings import resolve_settings
from . import dispatch_dense, dispatch_einsum, router_dense  # noqa: F401  (register Llama-4's and gpt-fast's patterns)
from . import router_ids  # noqa: F401  (the ids-only router pattern: registered after every other)
from .dispatch import EAGER_EXPERTS_HINT, match_dispatch
from .graph_utils import common_module, example_value, module_classes, module_path, op_kind, shape
from .rewrite import replace_dispatch, replace_router
from .routers import Refusal, RouterMatch, match_router, router_candidates


log = logging.getLogger("lynx_compile")
GRADIENTS_REASON = ("the router's values require gradients: lynx rewrites inference only (run under "
                    "torch.no_grad() or torch.inference_mode(), outside or inside the compiled function)")


def rewrite_moe_layers(gm: GraphModule, options: LynxOptions, graph_name: str = "") -> LynxReport:
    """Rewrite every recognised MoE layer of ``gm`` in place; return what was done."""
    report = LynxReport(graph=graph_name)
    graph = gm.graph
    routers, unrecognised = [], []
    for topk in router_candidates(graph.nodes):
        found = match_router(topk)
        if isinstance(found, RouterMatch):
            routers.append((topk, found))
        elif op_kind(topk) == "topk" or isinstance(found, Refusal):  # other starting points (a max, a
            unrecognised.append((topk, found))  # lookup) are routers only when a pattern recognises them
    inside_routers = set().union(*(r.nodes for _, r in routers)) if routers else set()
    for topk, reason in unrecognised:
        if topk not in inside_routers:  # e.g. DeepSeek's top-k over expert groups
            report.unmatched.append(UnmatchedCandidate(module_path(topk), topk.name, f"router not recognised ({reason})"))

    needs_gradients = False
    for topk, router in routers:
        if getattr(example_value(router.logits), "requires_grad", False):
            report.unmatched.append(UnmatchedCandidate(router.module, topk.name, GRADIENTS_REASON))
            needs_gradients = True
            continue
        dispatch = match_dispatch(graph, router)
        if isinstance(dispatch, str):
            report.unmatched.append(UnmatchedCandidate(
                router.module, topk.name, f"router {router.pattern} matched, experts dispatch not recognised ({dispatch})"
            ))
            continue
        block = common_module([router.module, dispatch.module])
        hidden_size = shape(dispatch.hidden)[1]
        settings = resolve_settings(options, block, router.modules.get(block, ""), router.top_k,
                                    router.classes, hidden_size if isinstance(hidden_size, int) else None)
        if options.layer_settings and options.policy != "off" and not settings.source.startswith("layer_settings"):
            log.warning("lynx: %s has no layer_settings entry (keys: %s); it uses %s", block or "<top>",
                        ", ".join(sorted(options.layer_settings)), settings.source)
        sequence_dim, step = sequence_rule(router, options)
        replace_dispatch(graph, dispatch)
        if options.policy != "off":
            if options.ep_ranks is not None and router.classes % options.ep_ranks:
                skip = " (its experts and a skip class)" if router.skip_class else ""
                raise ValueError(f"{block or 'MoE layer'}: ep_ranks={options.ep_ranks} does not divide the "
                                 f"{router.classes} classes its selector ranks{skip}")
            replace_router(gm, router, get_policy(options.policy), settings.knobs, options.decode_only, sequence_dim,
                           options.ep_ranks)
        report.matched.append(_matched_layer(block, router, dispatch, options, settings, step))

    for node in graph.nodes:
        if op_kind(node) == "grouped_mm" and not needs_gradients:  # (their routers are reported already)
            report.unmatched.append(UnmatchedCandidate(
                module_path(node), node.name, "grouped GEMM not fed by a recognised router"
            ))
        elif op_kind(node) == "fn:one_hot" and getattr(node.args[0], "op", "") == "placeholder":  # eager experts loop
            report.unmatched.append(UnmatchedCandidate(module_path(node), node.name, EAGER_EXPERTS_HINT))
    if report.matched:
        graph.lint()
        gm.recompile()
    return report


def sequence_rule(router: RouterMatch, options: LynxOptions) -> tuple[int | None, str]:
    """Which dimension of the layer input is the sequence (a decode step has length 1 there),
    and how the report says the step kind is decided. Without a step context lynx can tell a
    decode step from a prefill only by the layout, so it reads a dimension only where it knows
    the layout: transformers' MoE blocks take [batch, seq, hidden]; elsewhere the user says so
    (``sequence_dim``) or only an engine's step context (``lynx_compile.step``) re-routes."""
    if len(shape(router.layer_input)) != 3:
        return None, "step context only (the layer input is [tokens, hidden])"
    if options.sequence_dim is not None:
        return options.sequence_dim, f"step context, else decode when dim {options.sequence_dim} is 1 (option)"
    # the block's or the router's class (compiling a block alone, the block is the graph's root)
    if any(getattr(cls, "__module__", "").startswith("transformers.") for cls in module_classes(router.topk).values()):
        return 1, "step context, else decode when seq is 1 ([batch, seq, hidden])"
    return None, ("step context only (layout of the layer input unknown: set options sequence_dim=1 for "
                  "[batch, seq, hidden] or 0 for [seq, batch, hidden])")


def _matched_layer(block: str, router: RouterMatch, dispatch, options: LynxOptions, settings,
                   step: str) -> MatchedLayer:
    on = options.policy != "off"
    return MatchedLayer(
        module=block,
        block=router.modules.get(block, ""),
        num_experts=router.num_experts,
        top_k=router.top_k,
        router=router.pattern,
        rule=describe_rule(router.rule, router.score_bias is not None, router.ids_only, router.skip_class),
        renormalize=router.rule.renormalize,
        dispatch=dispatch.pattern,
        layout=dispatch.layout,
        activation=dispatch.activation,
        policy=options.policy,
        alpha=settings.alpha if on else None,
        beta=settings.beta if on else None,
        settings=settings.source if on else "-",
        step=step if on else "-",
        replaced="ids" if router.ids_only else "ids, weights",
        knobs=(get_policy(options.policy).describe(settings.knobs)
               + (f", ep_ranks={options.ep_ranks}" if options.ep_ranks and options.ep_ranks > 1 else "")) if on else "-",
    )


__all__ = ["rewrite_moe_layers"]

"""The ``lynx`` torch.compile backend: rewrite MoE layers, then hand the graph to Inductor.

Registered as an entry point (``torch_dynamo_backends``), so after ``pip install``
``torch.compile(model, backend="lynx", options={...})`` works without importing lynx_compile.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch.fx import GraphModule

from . import dump, ops
from .options import MODES, LynxOptions
from .passes import rewrite_moe_layers
from .report import set_last_report

log = logging.getLogger("lynx_compile")
_graph_ids = itertools.count()


def lynx_backend(gm: GraphModule, example_inputs, *, mode: str | None = None, options=None):
    """torch.compile backend. ``options``: see ``LynxOptions``; ``mode``: Inductor's modes (also
    ``options={"mode": ...}``, since torch.compile takes only one of ``mode=`` and ``options=``)."""
    opts = LynxOptions.from_user(options)
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} for the lynx backend; valid: {', '.join(MODES)}")
    if mode is not None and opts.mode is not None and mode != opts.mode:
        raise ValueError(f"mode={mode!r} and options['mode']={opts.mode!r} disagree")
    mode = mode or opts.mode
    name = f"graph_{next(_graph_ids):03d}"
    dump.emit("before", name, gm)
    before = dump.readable(gm) if opts.dump_dir else ""
    report = rewrite_moe_layers(gm, opts, graph_name=name)  # layers that need gradients stay as they are
    set_last_report(report)
    dump.emit("after", name, gm)
    if opts.dump_dir:
        dump.write_files(opts.dump_dir, name, before, dump.readable(gm), report)
    for candidate in report.unmatched:
        log.warning("lynx left %s (%s) unchanged: %s", candidate.module or "<top>", candidate.node, candidate.reason)
    log.info("lynx %s: rewrote %d MoE layer(s)", name, len(report.matched))

    if opts.compiler == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else {}
    return compile_fx(gm, example_inputs, config_patches=patches, decompositions=_decompositions(gm, opts))


def _decompositions(gm: GraphModule, opts: LynxOptions) -> dict | None:
    """Inductor's decompositions, plus the selector's own torch code unless the user observes
    routing calls: Inductor then traces the selector into the graph and fuses it (one table for
    the whole graph, so the choice is per graph)."""
    select = torch.ops.lynx.select_experts.default
    if opts.observe or not any(n.target is select for n in gm.graph.nodes):
        return None
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), select: ops.select_experts_decomposition}


__all__ = ["lynx_backend"]

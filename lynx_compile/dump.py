"""Graph dumps: what lynx saw and what it handed to Inductor.

Files (with ``dump_dir``), in a folder of this process (``<dump_dir>/<date>-<time>-<pid>/``):
``<graph>.before.py``, ``<graph>.after.py`` (readable dynamo graphs), ``<graph>.report.md``
and ``<graph>.report.json``. The same graphs go to torch's
``graph_code`` log (``TORCH_LOGS=graph_code``, depyf) and to tlparse's structured trace
(``TORCH_TRACE``), as artifacts named ``lynx_before_<graph>`` / ``lynx_after_<graph>``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch._dynamo.utils import lazy_format_graph_code
from torch.fx import GraphModule

from .report import LynxReport

graph_code_log = torch._logging.getArtifactLogger(__name__, "graph_code")
log = logging.getLogger("lynx_compile")


def readable(gm: GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, colored=False)


def emit(stage: str, graph_name: str, gm: GraphModule) -> None:
    """Log ``gm`` now (before the rewrite changes it) to TORCH_LOGS=graph_code and tlparse."""
    graph_code_log.debug("%s", lazy_format_graph_code(f"lynx {stage} rewrite: {graph_name}", gm, colored=False))
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"lynx_{stage}_{graph_name}", "encoding": "string"},
        payload_fn=lambda: readable(gm),
    )


def run_dir(dump_dir: str) -> Path:
    """This process's folder inside ``dump_dir`` (``<date>-<time>-<pid>``): a second process, or
    a second run, neither overwrites nor mixes with the files of the first."""
    global _run_name
    if _run_name is None:
        _run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    return Path(dump_dir) / _run_name


_run_name: str | None = None


def write_files(dump_dir: str, graph_name: str, before: str, after: str, report: LynxReport) -> Path | None:
    """Write the four files; a folder that cannot be written is warned about and skipped (a
    dump never fails a compile). Returns the folder, or None if nothing was written."""
    out = run_dir(dump_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{graph_name}.before.py").write_text(before)
        (out / f"{graph_name}.after.py").write_text(after)
        (out / f"{graph_name}.report.md").write_text(report.to_markdown())
        (out / f"{graph_name}.report.json").write_text(report.to_json())
    except OSError as error:
        log.warning("lynx: cannot write graph dumps to %s (%s); skipping them", out, error)
        return None
    return out

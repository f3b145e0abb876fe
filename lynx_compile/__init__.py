"""lynx-compile: batch-aware MoE expert selection as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="lynx")

Public API: ``select_experts``, ``LynxOptions``, ``last_report``, ``collect_reports``,
``capture_routing``, ``calibrate``, ``lynx_backend``.
"""

from . import ops  # noqa: F401  (registers torch.ops.lynx.*)
from .backend import lynx_backend
from .calibrate import calibrate
from .capture import capture_routing
from .options import LynxOptions
from .report import LynxReport, collect_reports, last_report
from .selector import select_experts

__all__ = [
    "LynxOptions",
    "LynxReport",
    "calibrate",
    "capture_routing",
    "collect_reports",
    "last_report",
    "lynx_backend",
    "select_experts",
]
__version__ = "0.1.0"

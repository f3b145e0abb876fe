"""lynx-compile: batch-aware MoE expert selection as a torch.compile backend.

    model.forward = torch.compile(model.forward, backend="lynx")

Public API: ``select_experts``, ``LynxOptions``, ``last_report``, ``collect_reports``,
``capture_routing``, ``calibrate``, ``lynx_backend``, and the step context an engine uses to
say what a step is (``set_step``, ``clear_step``, ``step``, ``reserve_step``).
"""

from . import ops  # noqa: F401  (registers torch.ops.lynx.*)
from .backend import lynx_backend
from .calibrate import calibrate
from .capture import capture_routing
from .options import LynxOptions
from .report import LynxReport, collect_reports, last_report
from .selector import select_experts
from .step import clear_step, reserve_step, set_step, step

__all__ = [
    "LynxOptions",
    "LynxReport",
    "calibrate",
    "capture_routing",
    "collect_reports",
    "last_report",
    "lynx_backend",
    "clear_step",
    "reserve_step",
    "select_experts",
    "set_step",
    "step",
]
__version__ = "0.1.0"

"""Per-call routing statistics (``LYNX_VLLM_STATS``) and the summary line logged at shutdown.

Counting distinct experts reads tensors back to the host, so it happens only when a stats
file is set, and never while a CUDA graph is being captured. Calls replayed from a CUDA graph
run no Python at all: they are neither written nor counted.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from dataclasses import dataclass

import torch


def distinct_experts(ids: torch.Tensor) -> int:
    """Experts the experts kernel reads for these ids (negative ids are skipped rows)."""
    return int(torch.unique(ids[ids >= 0]).numel())


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class Totals:
    calls: int = 0
    decode: int = 0
    rerouted: int = 0
    captured: int = 0  # calls seen while capturing a CUDA graph
    distinct_plain: int = 0  # summed over re-routed calls (stats file only)
    distinct: int = 0


class Stats:
    """One per process: the open stats file (if any) and running totals."""

    def __init__(self, path: str | None, logger):
        self.path = path
        self.logger = logger
        self.totals = Totals()
        self._lock = threading.Lock()
        self._file = None
        self._rank = None
        atexit.register(self.log_summary)

    @property
    def counting(self) -> bool:
        return self.path is not None

    def record(self, layer: str, ids_plain: torch.Tensor, ids: torch.Tensor, live: torch.Tensor | None,
               decode: bool, rerouted: bool) -> None:
        totals = self.totals
        if capturing():
            totals.captured += 1
            return
        totals.calls += 1
        totals.decode += decode
        totals.rerouted += rerouted
        if self.path is None:
            return
        line = {
            "layer": layer,
            "rank": self.rank,
            "tokens": int(ids.shape[0]),
            "live": int(ids.shape[0] if live is None else live.sum()),
            "decode": decode,
            "rerouted": rerouted,
            "distinct_plain": distinct_experts(ids_plain),
            "distinct": distinct_experts(ids),
        }
        if rerouted:
            totals.distinct_plain += line["distinct_plain"]
            totals.distinct += line["distinct"]
        self.write(line)

    @property
    def rank(self) -> int:
        if self._rank is None:
            dist = torch.distributed
            self._rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return self._rank

    def write(self, line: dict) -> None:
        with self._lock:
            if self._file is None:
                directory = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(directory, exist_ok=True)
                # O_APPEND: lines of several processes (tensor-parallel ranks) do not interleave.
                self._file = open(self.path, "a", buffering=1)
            self._file.write(json.dumps(line) + "\n")

    def summary(self) -> str | None:
        t = self.totals
        if not (t.calls or t.captured):
            return None
        text = f"lynx: {t.calls} MoE layer calls, {t.decode} in decode steps, {t.rerouted} re-routed"
        if self.path is not None and t.rerouted:
            saved = 100.0 * (1.0 - t.distinct / t.distinct_plain) if t.distinct_plain else 0.0
            text += (f"; re-routed calls read {t.distinct / t.rerouted:.1f} distinct experts on average "
                     f"instead of {t.distinct_plain / t.rerouted:.1f} ({saved:.0f}% fewer); stats in {self.path}")
        elif self.path is None:
            text += " (set LYNX_VLLM_STATS=path.jsonl for expert counts)"
        if t.captured:
            text += f"; {t.captured} calls captured in CUDA graphs (their replays are not counted)"
        return text

    def log_summary(self) -> None:
        text = self.summary()
        if text is not None:
            self.logger.info(text)
        if self._file is not None:
            self._file.close()
            self._file = None

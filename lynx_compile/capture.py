"""Look inside the lynx ops while a model runs: routing decisions and experts touched.

    with lynx_compile.capture_routing() as cap:
        compiled(**batch)
    cap.distinct_experts()   # one entry per MoE layer call

Recording happens in the ops' Python implementations. The experts op is opaque in every
compiled graph, so its calls are always recorded; the selector is fused into Inductor's code by
default, so routing calls are recorded where the op runs as Python: eagerly, under
``compiler="eager"``, or with ``options={"observe": True}``. CUDA-graph replays run no Python and
record nothing. Captures are per thread (a capture sees the calls its own thread makes) unless
opened with ``all_threads=True``. When no capture is active recording costs two list checks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class RoutingEvent:
    """One call of ``lynx::select_experts``."""

    logits: torch.Tensor  # fp32 [T, E], as the op saw them
    seq_len: int  # the layer's sequence length from the graph (-1: the layout gives none)
    ids: torch.Tensor
    weights: torch.Tensor
    voters: torch.Tensor  # bool [T]: the rows that shaped the kept set
    live: torch.Tensor | None  # bool [T] from the step context, None if there is none
    rule: object  # policies.rules.RouterRule
    policy: str
    knobs: dict  # the policy's settings, e.g. {"alpha": 3.0, "beta": 2}
    score_bias: torch.Tensor | None

    @property
    def rerouted(self) -> bool:
        """Whether the batch-aware choice ran with at least two voters (else: plain top-k)."""
        return int(self.voters.sum()) >= 2

    @property
    def alpha(self):
        return self.knobs.get("alpha")

    @property
    def beta(self):
        return self.knobs.get("beta")


@dataclass
class DispatchEvent:
    """One call of ``lynx::grouped_experts``."""

    ids: torch.Tensor
    distinct_experts: int


@dataclass
class RoutingCapture:
    routing: list[RoutingEvent] = field(default_factory=list)
    dispatch: list[DispatchEvent] = field(default_factory=list)

    def distinct_experts(self) -> list[int]:
        """Distinct experts read by each experts call, in call order (under expert parallelism: this
        rank's experts)."""
        return [event.distinct_experts for event in self.dispatch]


class _ThreadCaptures(threading.local):
    def __init__(self):
        self.active: list[RoutingCapture] = []


_captures = _ThreadCaptures()
_all_threads: list[RoutingCapture] = []
_lock = threading.Lock()


@contextlib.contextmanager
def capture_routing(all_threads: bool = False) -> Iterator[RoutingCapture]:
    """Record every lynx routing and experts call this thread makes inside the block; with
    ``all_threads``, the calls of every thread (an engine that runs the model in a worker
    thread, such as transformers' continuous batching)."""
    cap = RoutingCapture()
    registry = _all_threads if all_threads else _captures.active
    with _lock:
        registry.append(cap)
    try:
        yield cap
    finally:
        with _lock:
            registry.remove(cap)


def _listeners() -> list[RoutingCapture]:
    return _captures.active + _all_threads if _all_threads else _captures.active


def record_routing(logits, seq_len, ids, weights, voters, live, rule, policy, knobs, score_bias) -> None:
    active = _listeners()
    if active:
        def copy(t):
            return None if t is None else t.detach().clone()

        event = RoutingEvent(copy(logits.float()), int(seq_len), ids.clone(), weights.clone(), voters.clone(),
                             copy(live), rule, policy, dict(knobs), copy(score_bias))
        for cap in active:
            with _lock:
                cap.routing.append(event)


def record_dispatch(topk_ids: torch.Tensor, num_experts: int | None = None) -> None:
    """``num_experts``: the experts the op holds; ids past them (expert-parallel sentinels) are not experts read."""
    active = _listeners()
    if active:
        in_use = topk_ids.unique()
        if num_experts is not None:
            in_use = in_use[in_use < num_experts]
        event = DispatchEvent(topk_ids.clone(), int(in_use.numel()))
        for cap in active:
            with _lock:
                cap.dispatch.append(event)

"""Look inside the lynx ops while a model runs: routing decisions and experts touched.

    with lynx_compile.capture_routing() as cap:
        compiled(**batch)
    cap.distinct_experts()   # one entry per MoE layer call

Recording happens in the ops' Python implementations, so it sees eager and compiled runs
alike (not CUDA-graph replays). When no capture is active it costs one list check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class RoutingEvent:
    """One call of ``lynx::select_experts``."""

    logits: torch.Tensor  # fp32 [T, E], as the op saw them
    seq_len: int
    ids: torch.Tensor
    weights: torch.Tensor
    rerouted: bool  # False: plain top-k (prefill, or a single token)
    rule: object  # selector.RouterRule
    alpha: float
    beta: int | None
    score_bias: torch.Tensor | None


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


_active: list[RoutingCapture] = []


@contextlib.contextmanager
def capture_routing() -> Iterator[RoutingCapture]:
    """Record every lynx routing and experts call made inside the block."""
    cap = RoutingCapture()
    _active.append(cap)
    try:
        yield cap
    finally:
        _active.remove(cap)


def record_routing(logits, seq_len, ids, weights, rerouted, rule, alpha, beta, score_bias) -> None:
    if _active:
        bias = None if score_bias is None else score_bias.detach().clone()
        event = RoutingEvent(logits.detach().clone(), int(seq_len), ids.clone(), weights.clone(), rerouted,
                             rule, alpha, beta, bias)
        for cap in _active:
            cap.routing.append(event)


def record_dispatch(topk_ids: torch.Tensor, num_experts: int | None = None) -> None:
    """``num_experts``: the experts the op holds; ids past them (expert-parallel sentinels) are not experts read."""
    if _active:
        in_use = topk_ids.unique()
        if num_experts is not None:
            in_use = in_use[in_use < num_experts]
        event = DispatchEvent(topk_ids.clone(), int(in_use.numel()))
        for cap in _active:
            cap.dispatch.append(event)

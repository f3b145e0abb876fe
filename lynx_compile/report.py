"""What a lynx compilation did: the MoE layers it rewrote and the candidates it left alone."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class MatchedLayer:
    module: str  # the MoE block, e.g. model.layers.3.mlp
    block: str  # its class name
    num_experts: int
    top_k: int
    router: str  # router pattern name
    rule: str  # the router's rule in words
    renormalize: bool
    dispatch: str  # experts dispatch pattern name
    layout: str
    activation: str
    policy: str
    alpha: float | None
    beta: int | None
    settings: str  # where alpha/beta came from
    step: str = "-"  # how the step kind (decode or not) is decided
    knobs: str = "-"  # the policy's settings in words, e.g. "alpha=3, beta=2" or "k0=2"
    replaced: str = "ids, weights"  # what the selector replaces: "ids" alone where the router weighs them itself


@dataclass
class UnmatchedCandidate:
    module: str
    node: str  # the graph node the candidate was found at
    reason: str


@dataclass
class LynxReport:
    graph: str = ""
    matched: list[MatchedLayer] = field(default_factory=list)
    unmatched: list[UnmatchedCandidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [f"# lynx report: {self.graph}", "", f"## Rewritten MoE layers ({len(self.matched)})", ""]
        if self.matched:
            cols = ["module", "block", "num_experts", "top_k", "router", "rule", "replaced", "dispatch",
                    "layout", "activation", "policy", "knobs", "settings", "step"]
            lines += _table(cols, [[getattr(m, c) for c in cols] for m in self.matched])
        lines += ["", f"## Left unchanged ({len(self.unmatched)})", ""]
        if self.unmatched:
            lines += _table(["module", "node", "reason"],
                            [[u.module, u.node, u.reason] for u in self.unmatched])
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def _table(cols: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        return "none" if v is None else str(v).replace("|", "\\|")

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def describe_rule(rule, biased: bool, ids_only: bool = False, skip_class: bool = False) -> str:
    """A RouterRule in a few words, e.g. ``sigmoid+bias, 8 groups top 4 (top2_sum), renormalised, x2.5``.
    ``ids_only``: the selector chooses the ids alone and the router's own formula weighs them;
    ``skip_class``: the router's last class is a free skip choice (Zaya)."""
    if rule.bias_on_logits:  # ranked by the logits (+ bias), weighed by the scores
        parts = [rule.scoring + ("+logit bias" if biased else " of the logits' top-k")]
    else:
        parts = [rule.scoring + ("+bias" if biased else "")]
    if skip_class:
        parts.append("a skip class")
    if rule.grouped:
        parts.append(f"{rule.num_groups} groups top {rule.topk_groups} ({rule.group_score})")
    if ids_only:
        parts.append("weights by the router's own formula")
    elif rule.scoring == "sparsemixer":
        parts.append(f"windows of {2 * rule.jitter_eps:g}")
    elif rule.softmax_after_topk:
        parts.append("softmax over top-k")
    elif rule.renormalize:
        parts.append("renormalised")
    else:
        parts.append("not renormalised")
    if rule.scaling_factor != 1.0:
        parts.append(f"x{rule.scaling_factor:g}")
    return ", ".join(parts)


_last: LynxReport | None = None


class _ThreadCollectors(threading.local):
    def __init__(self):
        self.active: list[list[LynxReport]] = []


_collectors = _ThreadCollectors()


def set_last_report(report: LynxReport) -> None:
    global _last
    _last = report
    for reports in _collectors.active:
        reports.append(report)


@contextlib.contextmanager
def collect_reports() -> Iterator[list[LynxReport]]:
    """The reports of every lynx compilation this thread runs inside the block, in order (a
    forward with graph breaks compiles to several graphs; ``last_report()`` holds only the last)."""
    reports: list[LynxReport] = []
    _collectors.active.append(reports)
    try:
        yield reports
    finally:
        _collectors.active.remove(reports)


def last_report() -> LynxReport | None:
    """The report of the most recent lynx compilation in this process (None before any)."""
    return _last

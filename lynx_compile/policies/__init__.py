"""Selection policies: which experts a decode batch keeps.

A policy turns the router's scores of one step into a kept set of experts (``kept(...) ->
[E] bool``); every token then takes its best experts inside that set, weighed by the router's
own rule (``rules.finish``). Only the voters (live, healthy rows of a step that re-routes)
shape the set. Policies share everything else: router rules, decode gating, live-row masks,
per-layer settings, the kernels.

Each policy has one file here and a ``Policy`` entry in ``POLICIES``: its knobs, how they are
validated, and how they travel through the graph op (a list of floats).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import affinity_binning


def _positive_finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf


def _clamp_depth(value) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= 64)


@dataclass(frozen=True)
class Knob:
    name: str
    valid: Callable[[object], bool]
    expected: str  # what a valid value is, for error messages
    required: bool = True


@dataclass(frozen=True)
class Policy:
    name: str
    knobs: tuple[Knob, ...]
    kept: Callable  # (logits, rank, affinity, voters, top_k, **knobs) -> [E] bool

    def check(self, values: Mapping[str, object]) -> dict:
        """The knobs as given, validated: unknown, missing or bad ones raise ``ValueError``."""
        names = [k.name for k in self.knobs]
        unknown = [key for key in values if key not in names]
        if unknown:
            raise ValueError(f"policy {self.name!r} takes {', '.join(names)}; unknown: {', '.join(unknown)}")
        out = {}
        for knob in self.knobs:
            if knob.name not in values:
                if knob.required:
                    raise ValueError(f"policy {self.name!r} needs {knob.name} ({knob.expected})")
                out[knob.name] = None
                continue
            value = values[knob.name]
            if not knob.valid(value):
                raise ValueError(f"invalid {knob.name}={value!r} for policy {self.name!r}: expected {knob.expected}")
            out[knob.name] = value
        return out

    def encode(self, values: Mapping[str, object]) -> list[float]:
        """Knobs as the op's float list (None, e.g. "no clamp", travels as 0)."""
        return [0.0 if values[k.name] is None else float(values[k.name]) for k in self.knobs]

    def decode(self, args) -> dict:
        out = {}
        for knob, value in zip(self.knobs, args):
            if knob.name == "beta":
                out[knob.name] = None if value == 0 else int(value)
            else:
                out[knob.name] = value
        return out


def _lynx_kept(logits, rank, affinity, voters, top_k, *, alpha, beta):
    return affinity_binning.kept_experts(rank, affinity, voters, top_k, alpha, beta)


POLICIES: dict[str, Policy] = {
    "lynx": Policy("lynx", (
        Knob("alpha", _positive_finite, "a finite number > 0 (bins are 1/alpha logits wide)"),
        Knob("beta", _clamp_depth, "an int in [1, 64] (deepest bin) or None for no clamp", required=False),
    ), _lynx_kept),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name]


__all__ = ["POLICIES", "Knob", "Policy", "get_policy"]

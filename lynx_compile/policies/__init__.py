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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import affinity_binning, oea, xshare
from .rules import score_values

_FP32_MAX = float(torch.finfo(torch.float32).max)


def _positive_finite(value) -> bool:
    # finite in fp32, where the selector computes (1e39 would be inf there, and 0 * inf = NaN)
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= _FP32_MAX


def _clamp_depth(value) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= 64)


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class Knob:
    name: str
    valid: Callable[[object], bool]
    expected: str  # what a valid value is, for error messages
    required: bool = True
    integer: bool = False
    # the largest valid value given the router's (top_k, num_experts), if it depends on them
    upper: Callable[[int, int], int] | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    knobs: tuple[Knob, ...]
    kept: Callable  # (logits, rank, affinity, voters, top_k, rule, **knobs) -> [E] bool
    lower: Callable[[int], dict] = lambda top_k: {}  # knob -> smallest valid value given top_k
    note: Callable[[dict], str] = lambda knobs: ""  # what the report should add about the knobs
    # The kept set and each row's choice in it in one call where the policy has a faster form:
    # (rank, affinity, voters, confined, healthy, top_k, with_plain, **knobs) -> the choice
    # ``rules.finish`` makes, or None (then ``kept`` and ``finish``)
    kept_and_choice: Callable = lambda *args, **knobs: None

    def check_against(self, knobs: Mapping[str, object], top_k: int, num_experts: int) -> None:
        """Knob errors that depend on the router's size (e.g. OEA's k0 <= k)."""
        for knob in self.knobs:
            value = knobs.get(knob.name)
            if value is None or knob.upper is None:
                continue
            low = self.lower(top_k).get(knob.name, 1)
            high = knob.upper(top_k, num_experts)
            if not low <= value <= high:
                raise ValueError(f"invalid {knob.name}={value!r} for policy {self.name!r} on a router with k={top_k}, "
                                 f"E={num_experts}: expected {low} <= {knob.name} <= {high}")

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

    def encode(self, values: Mapping[str, object], ep_ranks: int | None = None) -> list[float]:
        """Knobs as the op's float list (None, e.g. "no clamp", travels as 0: never a valid value),
        then the expert-parallel cap's rank count where there is one (``ep_cap``)."""
        args = [0.0 if values.get(k.name) is None else float(values[k.name]) for k in self.knobs]
        return args + [float(ep_ranks)] if ep_ranks is not None and ep_ranks > 1 else args

    def decode(self, args) -> dict:
        return {knob.name: None if value == 0 else int(value) if knob.integer else value
                for knob, value in zip(self.knobs, args)}

    def ep_ranks(self, args) -> int | None:
        """The rank count ``encode`` appended, or None."""
        return int(args[len(self.knobs)]) if len(args) > len(self.knobs) else None

    def describe(self, values: Mapping[str, object]) -> str:
        """``alpha=3, beta=2`` (for reports)."""
        text = ", ".join(f"{k.name}={'none' if values.get(k.name) is None else format(values[k.name], 'g')}"
                         for k in self.knobs)
        note = self.note(values)
        return f"{text} ({note})" if note else text


def _lynx_kept(logits, rank, affinity, voters, top_k, rule, *, alpha, beta):
    return affinity_binning.kept_experts(rank, affinity, voters, top_k, alpha, beta)


def _oea_kept(logits, rank, affinity, voters, top_k, rule, *, k0):
    return oea.kept_experts(rank, voters, k0)


def _xshare_kept(logits, rank, affinity, voters, top_k, rule, *, budget):
    gates = score_values(logits, rule.scoring)
    return xshare.kept_experts(rank, torch.where(rank > float("-inf"), gates, 0.0), voters, budget)


POLICIES: dict[str, Policy] = {
    "lynx": Policy("lynx", (
        Knob("alpha", _positive_finite, "a number > 0, finite in fp32 (bins are 1/alpha logits wide)"),
        Knob("beta", _clamp_depth, "an int in [1, 64] (deepest bin) or None for no clamp", required=False,
             integer=True),
    ), _lynx_kept, note=lambda knobs: affinity_binning.depth_note(knobs.get("beta")),
        kept_and_choice=affinity_binning.kept_and_choice),
    "oea": Policy("oea", (
        Knob("k0", _positive_int, "an int in [1, k]: the experts every token keeps", integer=True,
             upper=lambda top_k, num_experts: top_k),
    ), _oea_kept),
    "xshare": Policy("xshare", (
        Knob("budget", _positive_int, "an int in [k, E]: the experts the batch may use", integer=True,
             upper=lambda top_k, num_experts: num_experts),
    ), _xshare_kept, lower=lambda top_k: {"budget": top_k}),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name]


__all__ = ["POLICIES", "Knob", "Policy", "get_policy"]

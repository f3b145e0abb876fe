"""Pick a selection policy's knob per MoE layer from router logits alone: no labels, no task data.

    cal = lynx_compile.calibrate(model, prompt_batches)                 # lynx: (alpha, beta) per layer
    cal = lynx_compile.calibrate(model, prompt_batches, policy="oea")   # OEA: k0 per layer
    cal = lynx_compile.calibrate({"model.layers.0.mlp": [step0_logits, ...]}, top_k=8, policy="xshare")
    print(cal)                                                          # a markdown table
    torch.compile(model.forward, backend="lynx", options=cal.options)   # {"policy": ..., "layer_settings": ...}

The goal: the fewest distinct experts per decode step (what memory-bound decode time follows)
subject to a bound on how much routing changes. Each policy has a grid of its knob:

- ``lynx`` (AffinityBinning): ``alpha`` x ``beta``, default {0.5, 0.7, 1, 1.5, 2, 3, 4, 6} x
  {1, 2, 3, 4, none} (bins 2 to 1/6 logits wide; it covers every released setting, ALGORITHM.md);
- ``oea``: ``k0`` in 1..k (k0 = k is plain top-k);
- ``xshare``: ``budget`` from k to E: every value when there are at most 64 of them, else 48
  about geometrically spaced ones, k and E included (budget = E is plain top-k).

For every candidate and every captured decode step ``[B, E]`` of a layer we run ``select_experts``
with the layer's own router rule and selection bias (what the compiled model runs, so the
prediction is exact for those logits; every row of a step is a live token) and measure, against
the plain routing of the same logits (``select_experts(..., decode=False)``: the selector's plain
top-k, ties and group limits included):

- ``distinct``:  distinct experts the step reads, mean over steps (plain top-k: ``plain_distinct``);
- ``mass_kept``: per token, ``g(C) / g(T)``: the gate mass of its final experts ``C`` over that of
  its plain top-k ``T`` (below), mean over tokens;
- ``top1_kept``: the share of tokens that still use their top-1 expert (the router's own top-1:
  by the biased score and inside the allowed groups where the rule has them);
- ``weight_shift``: per token, the share of its routing weight (under the model's own weight
  rule) that moved to other experts, ``||w_C - w_T||_1 / (2 ||w_T||_1)``, mean over tokens;
- ``experts_per_token``: the distinct experts a token uses, mean (OEA and XShare may leave a
  token fewer than k; lynx never does).

Feasible: ``mass_kept >= 1 - max_mass_loss`` and ``top1_kept >= min_top1_kept`` (and, only if
asked, ``weight_shift <= max_weight_shift``). We keep the feasible candidate with the fewest
distinct experts (ties: more mass kept, more top-1 kept, grid order). A tighter bound shrinks
the feasible set, so it never gives fewer distinct experts. If nothing is feasible we keep the
candidate closest to plain routing (mass kept nearest 1, then the most top-1 kept) and flag
the layer (``Calibration.infeasible``); ``LayerCalibration.held`` says which parts of the bound
held. OEA's k0 = k and XShare's budget = E are plain routing, so under the default grids those
policies always have a feasible candidate; no (alpha, beta) reproduces plain top-k for certain,
so for an infeasible lynx layer ``policy="off"`` is the honest alternative.

What "mass" is, for every rule lynx matches. Each rule weighs expert ``j``'s output by a gate
score ``g_j >= 0`` of the router; a selection bias (on the scores or on the logits) only ranks,
it weighs nothing, and a scaling factor multiplies every weight alike (it cancels in every metric here).

- softmax routers, renormalised (Mixtral, Qwen3-MoE) or not (Qwen2-MoE, OLMoE): ``g`` is the
  softmax over all E experts; weights ``g_j / g(C)``, or ``g_j g(T) / g(C)`` (the plain top-k's
  mass kept, as the selector does);
- top-k then softmax (GPT-OSS): ``g`` is again the softmax over all E: the softmax over the
  chosen logits is exactly ``g_j / g(C)``, the renormalised rule;
- grouped softmax (DeepSeek-V2): ``g`` is the softmax over all E; ``C`` and ``T`` both lie inside
  the token's allowed groups (the selector keeps the group limit), so the ratio compares sets
  under the same limit;
- sigmoid routers (DeepSeek-V3, grouped or not, with a selection bias or not): ``g`` is the
  unbiased sigmoid score (DeepSeek-V4's sqrt-softplus routers: the unbiased sqrt-softplus
  score). These do not sum to 1 over the experts, but only the ratio
  ``g(C) / g(T)`` is used, so no normalisation is needed. With a selection bias, ``T`` is the
  top-k of the *biased* score, not the set of most gate mass, so ``C`` can carry more mass than
  ``T`` and mass kept can exceed 1 (the bias trades gate mass for load balance; a re-routing may
  undo part of that trade). The bound is then still "lose at most this share of the plain mass".
- sparsemixer (Phi-3.5-MoE): ``g`` is the softmax over all E, a proxy: its weights are softmaxes
  over windows around each chosen expert, which the mass bound below does not model.

Why mass kept is a label-free proxy for the change of the layer output. The block computes
``y = sum_j w_j f_j(x)`` over its chosen experts. Take the router's dense mixture as the
reference, ``y* = sum_j q_j f_j(x)`` over all experts with ``q = g / g(all)`` (for softmax
routers ``q = g``), of which top-k is a truncation the model was trained with. ASSUME every
expert's output has norm at most ``M`` for this token (experts of similar output norm; nothing
here checks it). Then for the chosen set ``C``, ``||y* - y_C|| <= 2 (1 - q(C)) M`` with weights
that sum to 1 (renormalised, top-k-then-softmax), ``(1 - 2 q(C) + q(T)) M`` with weights rescaled
to the top-k mass, and ``s (g(all) - g(C)) M`` with raw sigmoid weights ``s g_j`` (not
renormalised; ``y* = s sum_j g_j f_j``). Under every rule, choosing ``C`` instead of ``T`` raises
the bound by exactly ``c (g(T) - g(C)) M = c g(T) (1 - mass_kept) M`` with a per-token constant
``c`` (2 / g(all), or the scale ``s``). So ``1 - mass_kept`` is the extra error the selector may
add on top of the truncation error top-k already has. What it does NOT bound is the distance
between the two outputs: ``||y_C - y_T|| <= ||w_C - w_T||_1 M`` (``weight_shift``) counts a swap
between two experts the router scores almost equally as a full change. Such swaps are exactly
what these policies do (the router's near-indifference is their premise), so mass kept rates
them as nearly free and weight shift as costly. On flat routers the two disagree a lot (mass
kept 0.95 with a fifth of the weight moved); ``weight_shift`` is reported, and
``max_weight_shift`` bounds it for those who distrust the premise. (With raw sigmoid weights
the two weight sums differ, so weight shift can exceed 1 there.)

Why no KL bound here. The label-free KL that matters is that of the model's next-token
distribution, which needs the whole model re-run with each candidate of each layer on decode
steps with a KV cache; that is what ``examples/evaluate.py`` measures for whole-model settings.
Per layer, from router logits alone, mass kept and top-1 kept are what is cheap and exact.

Defaults.
- ``max_mass_loss = 0.05``: the chosen experts keep >= 95% of the mass plain top-k had. For a
  renormalised softmax router the extra error bound is then ``0.1 q(T) M`` at most, while
  top-k's own bound is ``2 (1 - q(T)) M``: for a router whose top-k carries 40-70% of the mass,
  the selector adds 3-12% of what the model already tolerates. Calibrating on a model's own
  decode steps shows the whole trade-off (``grid_rows``, ``with_bound``) for choosing another value.
- ``min_top1_kept = 0.99``: the top-1 expert matters most (the Lynx paper's premise; XShare
  keeps it by construction, OEA whenever k0 >= 1). Lynx keeps it whenever a token's bin 0
  holds at most k experts, so this rejects bins so wide that votes override a token's clear
  favourite, allowing 1% for ties and near-ties.

Grids. ``alphas``, ``betas``, ``k0s``, ``budgets`` replace a policy's default grid (None: the
default; a grid for another policy's knob is an error). In ``betas`` both ``None`` and
``"none"`` mean no clamp (a grid has no "model default"); ``k0s`` and ``budgets`` must fit every
layer's router (``1 <= k0 <= k``, ``k <= budget <= E``).

Decode logits from a model. A prompt batch ``[B, S]`` runs once through lynx with plain routing
(``decode_only``: a prefill keeps plain top-k), and each position ``s >= start_position`` gives
one decode-shaped step: the router logits of the B tokens at ``s``, which a teacher-forced decode
step at ``s`` with a KV cache also computes. A ``[B, 1]`` batch runs row by row (one token is
never re-routed) so that re-routing in earlier layers cannot leak into later layers' logits.
The router rule, selection bias and k of each layer come from the routing calls lynx recorded.
Every layer is thus calibrated on plain-routed hidden states; deployed, later layers see the
states of re-routed earlier layers: a second-order difference this does not model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .backend import lynx_backend
from .capture import capture_routing
from .options import NO_CLAMP
from .policies import get_policy
from .policies.rules import RouterRule, check_rule, score_values
from .report import describe_rule, last_report
from .selector import select_experts
from .settings import derived_settings

POLICIES = ("lynx", "oea", "xshare")
ALPHAS = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BETAS = (1, 2, 3, 4, None)
MAX_MASS_LOSS = 0.05
MIN_TOP1_KEPT = 0.99
FULL_BUDGET_GRID = 64  # up to this many budgets from k to E, every one; past it a geometric grid
GEOMETRIC_BUDGETS = 48
_EPS = 1e-9  # float slack so that an unchanged routing meets a zero-loss bound
_GRID_KNOBS = {"alphas": "lynx", "betas": "lynx", "k0s": "oea", "budgets": "xshare"}


def budget_grid(top_k: int, num_experts: int) -> tuple[int, ...]:
    """XShare's default budgets for a router: every int in [k, E], or about geometric steps."""
    if num_experts - top_k + 1 <= FULL_BUDGET_GRID:
        return tuple(range(top_k, num_experts + 1))
    ratio = (num_experts / top_k) ** (1 / (GEOMETRIC_BUDGETS - 1))
    return tuple(sorted({top_k, num_experts, *(min(num_experts, round(top_k * ratio ** i))
                                               for i in range(GEOMETRIC_BUDGETS))}))


# --- the bound ---------------------------------------------------------------------------

def _number_in(name: str, value, low: float, high: float, high_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and low <= value and (value < high if high_open else value <= high))
    if not ok:
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


@dataclass(frozen=True)
class Bound:
    """How much routing may change: what makes a candidate feasible."""

    max_mass_loss: float = MAX_MASS_LOSS  # mean mass kept >= 1 - max_mass_loss
    min_top1_kept: float = MIN_TOP1_KEPT  # share of tokens keeping their top-1 expert
    max_weight_shift: float | None = None  # optional: mean weight shift <= this

    def __post_init__(self):
        _number_in("max_mass_loss", self.max_mass_loss, 0, 1, high_open=True)
        _number_in("min_top1_kept", self.min_top1_kept, 0, 1)
        if self.max_weight_shift is not None:
            try:
                _number_in("max_weight_shift", self.max_weight_shift, 0, 1)
            except ValueError as error:
                raise ValueError(f"{error} (or None: no bound)") from None

    def held(self, c: Candidate) -> dict[str, bool]:
        """Each part of the bound: whether ``c`` meets it."""
        held = {"mass kept": c.mass_kept >= 1 - self.max_mass_loss - _EPS,
                "top-1 kept": c.top1_kept >= self.min_top1_kept - _EPS}
        if self.max_weight_shift is not None:
            held["weight shift"] = c.weight_shift <= self.max_weight_shift + _EPS
        return held

    def admits(self, c: Candidate) -> bool:
        return all(self.held(c).values())

    def __str__(self) -> str:
        text = f"mass kept >= {1 - self.max_mass_loss:.3g}, top-1 kept >= {self.min_top1_kept:.3g}"
        return text if self.max_weight_shift is None else f"{text}, weight shift <= {self.max_weight_shift:.3g}"


# --- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One policy setting evaluated on one layer's captured decode steps."""

    policy: str
    knobs: dict  # e.g. {"alpha": 3.0, "beta": 2} (beta None: no clamp), {"k0": 2}, {"budget": 24}
    distinct: float  # mean distinct experts per step
    mass_kept: float  # mean g(chosen) / g(plain top-k) per token
    top1_kept: float  # share of tokens still using their top-1 expert
    weight_shift: float  # mean share of routing weight moved to other experts
    experts_per_token: float  # mean distinct experts a token uses (OEA/XShare: may be < k)
    feasible: bool = False

    __hash__ = None  # knobs is a dict

    @property
    def alpha(self) -> float | None:
        return self.knobs.get("alpha")

    @property
    def beta(self) -> int | None:
        return self.knobs.get("beta")

    @property
    def label(self) -> str:
        """``(3, 2)`` for lynx, ``k0=2``, ``budget=24``."""
        return knob_label(self.policy, self.knobs)

    @property
    def setting(self):
        """This candidate as a ``layer_settings`` value: lynx ``(alpha, beta)`` (beta "none": no
        clamp), else the knob dict."""
        if self.policy == "lynx":
            return (self.alpha, NO_CLAMP if self.beta is None else self.beta)
        return dict(self.knobs)


def knob_label(policy: str, knobs: Mapping) -> str:
    if policy == "lynx":
        beta = knobs.get("beta")
        return f"({knobs['alpha']:g}, {'none' if beta is None or beta == NO_CLAMP else beta})"
    return ", ".join(f"{name}={value:g}" for name, value in knobs.items())


@dataclass
class LayerCalibration:
    module: str
    policy: str
    top_k: int
    num_experts: int
    rule: RouterRule
    biased: bool  # the router has a selection-only score bias
    steps: int
    tokens: int
    plain_distinct: float  # mean distinct experts of plain top-k
    topk_mass: float  # mean share of the gate mass g(all) its plain top-k carries (how peaked the router is)
    grid: list[Candidate]
    chosen: Candidate
    default: Candidate | None  # lynx: the (alpha, beta) lynx uses without calibration; other policies: None
    held: dict[str, bool] = dataclasses.field(default_factory=dict)  # the chosen candidate, per part of the bound

    @property
    def feasible(self) -> bool:
        return self.chosen.feasible

    @property
    def renormalize(self) -> bool:
        return self.rule.renormalize

    @property
    def rule_text(self) -> str:
        return describe_rule(self.rule, self.biased)


@dataclass
class Calibration:
    """Per layer: the chosen setting of one policy, its metrics against plain top-k (and lynx's
    default), which bound held, and the whole grid. ``options`` feeds ``torch.compile``."""

    policy: str
    layers: list[LayerCalibration]
    bound: Bound

    @property
    def layer_settings(self) -> dict:
        """``{block path: setting}`` for ``options={"policy": self.policy, "layer_settings": ...}``:
        lynx ``(alpha, beta)`` (beta "none": no clamp), OEA ``{"k0": k0}``, XShare ``{"budget": m}``."""
        return {layer.module: layer.chosen.setting for layer in self.layers}

    @property
    def options(self) -> dict:
        """The backend options that apply this calibration."""
        return {"policy": self.policy, "layer_settings": self.layer_settings}

    @property
    def infeasible(self) -> list[str]:
        """Layers where no candidate met the bound (they got the one closest to plain)."""
        return [layer.module for layer in self.layers if not layer.feasible]

    def with_bound(self, **bound) -> Calibration:
        """The same grid chosen under another bound, no re-evaluation (explore the trade-off).
        Keywords: ``max_mass_loss``, ``min_top1_kept``, ``max_weight_shift``; the rest stay."""
        new = dataclasses.replace(self.bound, **bound)
        return Calibration(self.policy, [_bounded(layer, new) for layer in self.layers], new)

    def __getitem__(self, module: str) -> LayerCalibration:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(module)

    def grid_rows(self) -> list[dict]:
        """Every evaluated candidate as a flat dict (for plotting / CSV)."""
        rows = []
        for layer in self.layers:
            for c in layer.grid:
                rows.append(dict(module=layer.module, rule=layer.rule_text, policy=c.policy, knobs=c.label,
                                 alpha=c.alpha, beta=c.beta, k0=c.knobs.get("k0"), budget=c.knobs.get("budget"),
                                 distinct=c.distinct, plain_distinct=layer.plain_distinct, topk_mass=layer.topk_mass,
                                 mass_kept=c.mass_kept, top1_kept=c.top1_kept, weight_shift=c.weight_shift,
                                 experts_per_token=c.experts_per_token, feasible=c.feasible,
                                 chosen=c is layer.chosen))
        return rows

    def to_markdown(self) -> str:
        head = f"{self.policy} calibration: {self.bound}"
        lynx = self.policy == "lynx"
        cols = ["layer", "rule", "k/E", "steps", "top-k mass", "plain distinct"]
        cols += ["default (a, b)", "default distinct", "default mass"] if lynx else []
        cols += ["chosen", "distinct", "mass kept", "top-1 kept", "weight shift", "experts / token", "bound held"]
        rows = []
        for layer in self.layers:
            c = layer.chosen
            row = [layer.module, layer.rule_text, f"{layer.top_k}/{layer.num_experts}", layer.steps,
                   f"{layer.topk_mass:.3f}", f"{layer.plain_distinct:.2f}"]
            if lynx:
                d = layer.default
                row += ["-", "-", "-"] if d is None else [d.label, f"{d.distinct:.2f}", f"{d.mass_kept:.3f}"]
            row += [c.label, f"{c.distinct:.2f}", f"{c.mass_kept:.3f}", f"{c.top1_kept:.3f}",
                    f"{c.weight_shift:.3f}", f"{c.experts_per_token:.2f}", _held_text(layer)]
            rows.append(row)
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
        if self.infeasible:
            alternative = " (consider policy='off' for them)" if lynx else ""
            lines += ["", f"No candidate met the bound on: {', '.join(self.infeasible)}; they keep the "
                          f"candidate closest to plain routing{alternative}."]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def _held_text(layer: LayerCalibration) -> str:
    if layer.feasible:
        return "yes"
    failed = [name for name, ok in layer.held.items() if not ok]
    return f"NO: {', '.join(failed)} (closest to plain)"


# --- metrics of one candidate ------------------------------------------------------------

@dataclass(frozen=True)
class _Router:
    """What calibration needs to know of a layer's router."""

    top_k: int
    rule: RouterRule
    score_bias: torch.Tensor | None

    def kwargs(self) -> dict:
        """``select_experts`` keywords for this router's rule."""
        return {**dataclasses.asdict(self.rule), "score_bias": self.score_bias}


@dataclass
class _Step:
    """What a decode step's plain routing is, computed once for all candidates."""

    logits: torch.Tensor  # fp32 [B, E]
    gates: torch.Tensor  # [B, E]: the gate scores g that weigh the outputs (module docs)
    plain_top1: torch.Tensor  # [B, 1] the router's own top-1
    plain_mass: torch.Tensor  # [B] g(T)
    plain_weights: torch.Tensor  # dense [B, E] under the model's weight rule
    plain_distinct: int


def _plain_step(logits: torch.Tensor, router: _Router) -> _Step:
    logits = logits.detach().float()
    # decode=False: the selector's plain top-k (its tie rule and group limit); the knob is unused
    weights, ids = select_experts(logits, router.top_k, policy="oea", k0=router.top_k, decode=False,
                                  **router.kwargs())
    gates = score_values(logits, router.rule.scoring)
    chosen = torch.zeros_like(gates, dtype=torch.bool).scatter(-1, ids, True)
    dense = torch.zeros_like(gates).scatter_add(-1, ids, weights)
    return _Step(logits, gates, ids[:, :1], (gates * chosen).sum(dim=-1), dense, int(chosen.any(0).sum()))


def _step_metrics(step: _Step, router: _Router, policy: str, knobs: dict):
    """(distinct experts, per-token mass kept, top-1 kept, weight shift, experts used) of one step."""
    weights, ids = select_experts(step.logits, router.top_k, policy=policy, **knobs, **router.kwargs())
    # a token left fewer than k experts repeats one at weight 0: count sets, add weights
    chosen = torch.zeros_like(step.gates, dtype=torch.bool).scatter(-1, ids, True)
    mass_kept = (step.gates * chosen).sum(dim=-1) / step.plain_mass
    top1_kept = chosen.gather(-1, step.plain_top1)[:, 0]
    dense = torch.zeros_like(step.gates).scatter_add(-1, ids, weights)
    moved = (dense - step.plain_weights).abs().sum(dim=-1) / (2 * step.plain_weights.sum(dim=-1))
    return int(chosen.any(0).sum()), mass_kept, top1_kept, moved, chosen.sum(dim=-1)


def evaluate(steps: Sequence[_Step], router: _Router, policy: str, knobs: dict) -> Candidate:
    """One candidate's metrics pooled over a layer's steps (means over steps / tokens)."""
    distinct, mass, top1, shift, used = zip(*(_step_metrics(s, router, policy, knobs) for s in steps))
    return Candidate(policy, dict(knobs), sum(distinct) / len(distinct), torch.cat(mass).mean().item(),
                     torch.cat(top1).float().mean().item(), torch.cat(shift).mean().item(),
                     torch.cat(used).float().mean().item())


# --- choice ------------------------------------------------------------------------------

def _bounded(layer: LayerCalibration, bound: Bound) -> LayerCalibration:
    """``layer`` with feasibility and the choice redone under ``bound``."""
    grid = [dataclasses.replace(c, feasible=bound.admits(c)) for c in layer.grid]
    default = None if layer.default is None else dataclasses.replace(layer.default,
                                                                     feasible=bound.admits(layer.default))
    chosen = choose(grid)
    return dataclasses.replace(layer, grid=grid, chosen=chosen, default=default, held=bound.held(chosen))


def choose(grid: Sequence[Candidate]) -> Candidate:
    """The feasible candidate with the fewest distinct experts; else the one closest to plain."""
    order = {id(c): i for i, c in enumerate(grid)}
    feasible = [c for c in grid if c.feasible]
    if feasible:
        return min(feasible, key=lambda c: (c.distinct, -c.mass_kept, -c.top1_kept, order[id(c)]))
    return min(grid, key=lambda c: (abs(1 - c.mass_kept), -c.top1_kept, c.distinct, order[id(c)]))


@contextlib.contextmanager
def _single_thread():
    """The per-step tensors are tiny ([B, E]): handing them to a thread pool costs far more
    than the work, and on a busy machine much more. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- checking the arguments --------------------------------------------------------------

def _per_layer(value, module: str, name: str):
    if isinstance(value, Mapping):
        if module not in value:
            raise ValueError(f"{name} has no entry for layer {module!r}")
        return value[module]
    return value


def _check_steps(module: str, steps, top_k) -> int:
    if isinstance(steps, torch.Tensor) or not isinstance(steps, Iterable):
        raise ValueError(f"layer {module!r}: expected a list of [B, E] step tensors, got {type(steps).__name__}")
    steps = list(steps)
    if not steps:
        raise ValueError(f"layer {module!r} has no decode steps")
    widths = {tuple(s.shape[1:]) if isinstance(s, torch.Tensor) and s.dim() == 2 else None for s in steps}
    if None in widths or len(widths) != 1:
        raise ValueError(f"layer {module!r}: every step must be a 2-D [B, E] tensor with one E, "
                         f"got shapes {sorted({tuple(getattr(s, 'shape', ())) for s in steps})}")
    if not all(s.dtype.is_floating_point for s in steps):
        raise ValueError(f"layer {module!r}: router logits must be floating point")
    num_experts = widths.pop()[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"layer {module!r}: top_k must be an int in [1, {num_experts}], got {top_k!r}")
    return num_experts


def _layer_router(module: str, top_k, renormalize, rule, score_bias, num_experts: int) -> _Router:
    if top_k is None:
        raise ValueError("top_k is required when calibrating from logits (one int, or one per layer)")
    if rule is None:
        rule = RouterRule(renormalize=True if renormalize is None else renormalize)
    elif not isinstance(rule, RouterRule):
        raise ValueError(f"layer {module!r}: rule must be a RouterRule, got {type(rule).__name__}")
    elif renormalize is not None and renormalize != rule.renormalize:
        raise ValueError(f"layer {module!r}: renormalize={renormalize!r} contradicts its rule's "
                         f"renormalize={rule.renormalize!r} (give one of them)")
    if score_bias is not None and not isinstance(score_bias, torch.Tensor):
        raise ValueError(f"layer {module!r}: score_bias must be a tensor [E] or None, got {type(score_bias).__name__}")
    try:
        check_rule(rule, num_experts, top_k, score_bias)
    except ValueError as error:
        raise ValueError(f"layer {module!r}: {error}") from None
    return _Router(top_k, rule, None if score_bias is None else score_bias.detach().float())


def _grid_values(name: str, values) -> list | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a list of values or None (the default grid), got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: give at least one value, or None for the default grid")
    return values


def _check_grids(policy: str, alphas, betas, k0s, budgets) -> dict:
    """The given grids, validated (None: the policy's default). Grids of another policy's knob raise."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    grids = {name: _grid_values(name, values)
             for name, values in (("alphas", alphas), ("betas", betas), ("k0s", k0s), ("budgets", budgets))}
    foreign = [name for name, values in grids.items() if values is not None and _GRID_KNOBS[name] != policy]
    if foreign:
        raise ValueError(f"{', '.join(foreign)} are grids of policy {_GRID_KNOBS[foreign[0]]!r}, "
                         f"not of {policy!r}")
    rules = get_policy(policy)
    if grids["alphas"] is not None:
        grids["alphas"] = [_checked(rules, "alpha", "alphas", a) for a in grids["alphas"]]
    if grids["betas"] is not None:  # "none" and None: no clamp
        grids["betas"] = [None if b is None or b == NO_CLAMP else _checked(rules, "beta", "betas", b)
                          for b in grids["betas"]]
    for name, key in (("k0s", "k0"), ("budgets", "budget")):
        if grids[name] is not None:
            grids[name] = [_checked(rules, key, name, v) for v in grids[name]]
    return grids


def _checked(rules, key: str, name: str, value):
    """One grid value, checked by the policy's own knob rules (``rules``: a ``policies.Policy``)."""
    try:
        rules.check({key: value} if key != "beta" else {"alpha": 1.0, "beta": value})
    except ValueError:
        spec = next(k.expected for k in rules.knobs if k.name == key)
        extra = " (or 'none': no clamp)" if key == "beta" else ""
        raise ValueError(f"{name} holds {value!r}: each value must be {spec}{extra}") from None
    return float(value) if key == "alpha" else value


def _candidates(policy: str, grids: dict, module: str, top_k: int, num_experts: int) -> list[dict]:
    """The knob settings to evaluate on one layer."""
    if policy == "lynx":
        alphas = grids["alphas"] or [float(a) for a in ALPHAS]
        betas = grids["betas"] if grids["betas"] is not None else list(BETAS)
        return [{"alpha": a, "beta": b} for a in alphas for b in betas]
    name, key, default, low, high = (("k0s", "k0", range(1, top_k + 1), 1, top_k) if policy == "oea" else
                                     ("budgets", "budget", budget_grid(top_k, num_experts), top_k, num_experts))
    values = grids[name] if grids[name] is not None else list(default)
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise ValueError(f"{name} {bad} do not fit layer {module!r} (k={top_k}, E={num_experts}): "
                         f"expected {low} <= {key} <= {high}")
    return [{key: v} for v in dict.fromkeys(values)]


# --- the core ----------------------------------------------------------------------------

def calibrate_logits(
    layer_logits: Mapping[str, Sequence[torch.Tensor]],
    top_k: int | Mapping[str, int],
    renormalize: bool | Mapping[str, bool] | None = None,
    *,
    policy: str = "lynx",
    rule: RouterRule | Mapping[str, RouterRule] | None = None,
    score_bias: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None,
    max_mass_loss: float = MAX_MASS_LOSS,
    min_top1_kept: float = MIN_TOP1_KEPT,
    max_weight_shift: float | None = None,
    alphas: Iterable[float] | None = None,
    betas: Iterable[int | str | None] | None = None,
    k0s: Iterable[int] | None = None,
    budgets: Iterable[int] | None = None,
    defaults: Mapping[str, dict] | None = None,
    progress: bool = False,
) -> Calibration:
    """The core: choose a policy's knob per layer from captured decode-step router logits.

    Args:
        layer_logits: ``{block path: [step logits [B, E], ...]}``, one tensor per decode step.
        top_k: the router's k, one value or one per layer.
        renormalize: the softmax router's weight rule (None: True, or the ``rule``'s).
        policy: "lynx", "oea" or "xshare".
        rule: the router's ``RouterRule`` (sigmoid, groups, top-k-then-softmax, ...), one or one
            per layer; None: a softmax router with ``renormalize``.
        score_bias: a sigmoid router's selection bias [E], one or one per layer (or None).
        max_mass_loss: feasible when mean mass kept >= 1 - max_mass_loss.
        min_top1_kept: feasible when this share of tokens keeps its top-1 expert.
        max_weight_shift: optional, feasible when mean weight shift <= this (None: no bound).
        alphas, betas, k0s, budgets: the policy's grid (None: the default; see module docs).
        defaults: lynx only: ``{block path: {"alpha": ..., "beta": ...}}``, what lynx uses
            without calibration (None: derived from (k, E)), shown beside the choice.
        progress: show a tqdm bar over the grid.
    """
    bound = Bound(max_mass_loss, min_top1_kept, max_weight_shift)
    grids = _check_grids(policy, alphas, betas, k0s, budgets)
    if not isinstance(layer_logits, Mapping):
        raise ValueError(f"layer_logits must be a dict {{block path: [logits [B, E], ...]}}, "
                         f"got {type(layer_logits).__name__}")
    if not layer_logits:
        raise ValueError("layer_logits is empty: no layer to calibrate")
    work = []
    for module, steps in layer_logits.items():
        k = _per_layer(top_k, module, "top_k")
        if k is None:
            raise ValueError("top_k is required when calibrating from logits (one int, or one per layer)")
        num_experts = _check_steps(module, steps, k)
        router = _layer_router(module, k, _per_layer(renormalize, module, "renormalize"),
                               _per_layer(rule, module, "rule"), _per_layer(score_bias, module, "score_bias"),
                               num_experts)
        candidates = _candidates(policy, grids, module, k, num_experts)
        default = None
        if policy == "lynx":
            given = (defaults or {}).get(module)
            default = dict(given) if given is not None else dict(derived_settings(k, num_experts).knobs)
        work.append((module, list(steps), router, candidates, default))
    bar = _progress(sum(len(c) + (d is not None) for _, _, _, c, d in work), progress)
    layers = []
    with _single_thread(), torch.no_grad():
        for module, steps, router, candidates, default in work:
            layers.append(_calibrate_layer(module, policy, steps, router, candidates, default, bound, bar))
    bar.close()
    return Calibration(policy, layers, bound)


def _calibrate_layer(module, policy, steps, router: _Router, candidates, default_knobs, bound, bar):
    plain = [_plain_step(s, router) for s in steps]
    grid = []
    for knobs in candidates:
        grid.append(evaluate(plain, router, policy, knobs))
        bar.update(1)
    default = None
    if default_knobs is not None:
        default = evaluate(plain, router, policy, default_knobs)
        bar.update(1)
    plain_distinct = sum(p.plain_distinct for p in plain) / len(plain)
    topk_mass = torch.cat([p.plain_mass / p.gates.sum(dim=-1) for p in plain]).mean().item()
    layer = LayerCalibration(module, policy, router.top_k, plain[0].logits.shape[1], router.rule,
                             router.score_bias is not None, len(plain), sum(p.logits.shape[0] for p in plain),
                             plain_distinct, topk_mass, grid, grid[0], default)
    return _bounded(layer, bound)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str = "calibrating"):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # optional dependency: only when asked for

    return tqdm(total=total, desc=desc)


# --- decode logits from a model ----------------------------------------------------------

@dataclass(frozen=True)
class LayerRouter:
    """A matched MoE block's router as lynx recorded it: what calibration runs it with."""

    module: str
    top_k: int
    num_experts: int
    rule: RouterRule
    score_bias: torch.Tensor | None
    matched: object  # report.MatchedLayer: the block lynx rewrote (its alpha/beta: lynx's default)


def capture_decode_logits(model, batches: Iterable[torch.Tensor], *, start_position: int = 0,
                          progress: bool = False):
    """Each MoE layer's decode-shaped router logits, with plain routing (see module docs).

    Args:
        model: an eager HF-style causal LM (``model(input_ids=..., use_cache=False)``).
        batches: input ids ``[B, S]`` (prompts: each position >= ``start_position`` is one
            decode step of B tokens) or ``[B, 1]`` (one decode step).
        start_position: skip earlier positions of prompts (the first tokens of a prompt have
            little context and look unlike decode).

    Returns:
        ``(logits, routers)``: ``{block path: [[B, E] per step]}`` and ``{block path: LayerRouter}``.
    """
    if isinstance(start_position, bool) or not isinstance(start_position, int) or start_position < 0:
        raise ValueError(f"start_position must be an int >= 0, got {start_position!r}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be a list of input ids [B, S] or [B, 1], got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: calibrating a model needs decode batches (input ids [B, S] or [B, 1])")
    for input_ids in batches:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"each batch must be input ids [B, S], got {getattr(input_ids, 'shape', input_ids)}")
    capture = _Capture(model)
    logits: dict[str, list[torch.Tensor]] = {}
    bar = _progress(len(batches), progress, "capturing router logits")
    for input_ids in batches:
        first = start_position if input_ids.shape[1] > 1 else 0
        for module, per_position in capture.router_logits(input_ids).items():  # [B, S, E]
            logits.setdefault(module, []).extend(per_position[:, s] for s in range(first, per_position.shape[1]))
        bar.update(1)
    bar.close()
    if not any(logits.values()):
        raise ValueError(f"no decode steps captured: start_position={start_position} skips every position "
                         "of every batch")
    return logits, dict(capture.routers)


class _Capture:
    """The model compiled by lynx (eager, plain routing kept), recording every graph's report.

    A forward may compile to several graphs (graph breaks), and ``last_report()`` only holds
    the last one, so the backend here collects them all. Blocks are listed in the order they
    were first matched, which is call order: graphs compile as the first forward reaches them.
    """

    def __init__(self, model):
        self.blocks: dict = {}  # block path -> MatchedLayer, in call order
        self.routers: dict[str, LayerRouter] = {}
        options = {"compiler": "eager", "policy": "lynx"}

        def backend(gm, example_inputs):
            compiled = lynx_backend(gm, example_inputs, options=options)
            for layer in last_report().matched:
                self.blocks.setdefault(layer.module, layer)
            return compiled

        self.forward = torch.compile(model.forward, backend=backend)
        # a router auxiliary loss is not routing; skip it (and its compile) when the model has one
        config = getattr(model, "config", None)
        self.kwargs = {"use_cache": False}
        if getattr(config, "output_router_logits", False):
            self.kwargs["output_router_logits"] = False

    def router_logits(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{block path: logits [B, S, E]}`` of one batch run with plain top-k routing."""
        rows = [input_ids] if input_ids.shape[1] > 1 else input_ids.split(1)  # B=1 is never re-routed
        events = []
        with torch.no_grad():
            for row in rows:
                with capture_routing() as cap:
                    self.forward(input_ids=row, **self.kwargs)
                if not self.blocks:
                    raise ValueError("lynx matched no MoE layer in this model, so there is nothing to calibrate "
                                     "(lynx_compile.last_report() says why)")
                if any(e.rerouted for e in cap.routing):
                    raise RuntimeError("calibration must capture plain routing, but lynx re-routed this batch")
                if len(cap.routing) != len(self.blocks):
                    raise RuntimeError(f"captured {len(cap.routing)} routing calls for {len(self.blocks)} matched "
                                       "MoE blocks; calibration needs each block called once per forward")
                events.append(cap.routing)
        for i, module in enumerate(self.blocks):
            if module not in self.routers:
                event = events[0][i]
                self.routers[module] = LayerRouter(module, event.ids.shape[1], event.logits.shape[1], event.rule,
                                                   event.score_bias, self.blocks[module])
        batch, seq = input_ids.shape
        return {module: torch.cat([row_events[i].logits for row_events in events]).view(batch, seq, -1)
                for i, module in enumerate(self.blocks)}  # rows are b-major: b * S + s


# --- entry point -------------------------------------------------------------------------

def calibrate(
    source,
    batches: Iterable[torch.Tensor] | None = None,
    *,
    policy: str = "lynx",
    top_k: int | Mapping[str, int] | None = None,
    renormalize: bool | Mapping[str, bool] | None = None,
    rule: RouterRule | Mapping[str, RouterRule] | None = None,
    score_bias: torch.Tensor | Mapping[str, torch.Tensor | None] | None = None,
    max_mass_loss: float = MAX_MASS_LOSS,
    min_top1_kept: float = MIN_TOP1_KEPT,
    max_weight_shift: float | None = None,
    alphas: Iterable[float] | None = None,
    betas: Iterable[int | str | None] | None = None,
    k0s: Iterable[int] | None = None,
    budgets: Iterable[int] | None = None,
    start_position: int = 0,
    progress: bool = False,
) -> Calibration:
    """Choose ``policy``'s knob per MoE layer: fewest distinct experts per decode step, subject
    to mean mass kept >= 1 - ``max_mass_loss`` and top-1 kept >= ``min_top1_kept``.

    ``source`` is either a model (then ``batches`` are its input ids, see
    ``capture_decode_logits``; k, the router rule and its selection bias come from the routing
    lynx records) or a dict ``{block path: [logits [B, E] per decode step]}`` (then give
    ``top_k`` and the rule: ``renormalize`` for a softmax router, or ``rule`` and ``score_bias``).
    Use ``result.options`` (``{"policy": ..., "layer_settings": ...}``) as the backend's options.
    """
    knobs = dict(policy=policy, max_mass_loss=max_mass_loss, min_top1_kept=min_top1_kept,
                 max_weight_shift=max_weight_shift, alphas=alphas, betas=betas, k0s=k0s, budgets=budgets,
                 progress=progress)
    if isinstance(source, Mapping):
        if batches is not None:
            raise ValueError("batches are for a model; a logits dict is already the decode steps")
        return calibrate_logits(source, top_k, renormalize, rule=rule, score_bias=score_bias, **knobs)
    given = [name for name, value in (("top_k", top_k), ("renormalize", renormalize), ("rule", rule),
                                      ("score_bias", score_bias)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} are for calibrating from logits; a model's routers are read from "
                         "what lynx matched")
    if batches is None:
        raise ValueError("calibrating a model needs decode batches (input ids [B, S] or [B, 1])")
    # check the bound and grids before the (slow) capture
    Bound(max_mass_loss, min_top1_kept, max_weight_shift)
    _check_grids(policy, alphas, betas, k0s, budgets)
    logits, routers = capture_decode_logits(source, batches, start_position=start_position, progress=progress)
    defaults = {m: {"alpha": r.matched.alpha, "beta": r.matched.beta} for m, r in routers.items()}
    return calibrate_logits(logits, {m: r.top_k for m, r in routers.items()},
                            rule={m: r.rule for m, r in routers.items()},
                            score_bias={m: r.score_bias for m, r in routers.items()},
                            defaults=defaults if policy == "lynx" else None, **knobs)

"""Pick (alpha, beta) per MoE layer from router logits alone: no labels, no task data.

    cal = lynx_compile.calibrate(model, prompt_batches)       # captures decode router logits
    cal = lynx_compile.calibrate({"model.layers.0.mlp": [step0_logits, ...]}, top_k=8)
    print(cal)                                                # a markdown table
    torch.compile(model.forward, backend="lynx", options={"layer_settings": cal.layer_settings})

The goal: the fewest distinct experts per decode step (what memory-bound decode time follows)
subject to a bound on how much routing changes. For every (alpha, beta) of a grid and every
captured decode step ``[B, E]`` of a layer we run the reference selector ``select_experts``
(what the compiled model runs, so the prediction is exact for those logits) and measure

- ``distinct``:  distinct experts the step reads, mean over steps (plain top-k: ``plain_distinct``);
- ``mass_kept``: per token, ``P(C) / P(T)``: the softmax mass of its final experts ``C`` over
  that of its plain top-k ``T`` (1 = unchanged mass; never above 1), mean over tokens;
- ``top1_kept``: the share of tokens that still use their top-1 expert;
- ``weight_shift``: per token, the share of its routing weight (under the model's own weight
  rule) that moved to other experts, ``||w_C - w_T||_1 / (2 ||w_T||_1)``, mean over tokens.

Feasible: ``mass_kept >= 1 - max_mass_loss`` and ``top1_kept >= min_top1_kept`` (and, only if
asked, ``weight_shift <= max_weight_shift``). We keep the feasible candidate with the fewest
distinct experts (ties: more mass kept, more top-1 kept, grid order). A tighter bound shrinks
the feasible set, so it never gives fewer distinct experts. If nothing is feasible we keep the
candidate closest to plain routing (the most mass kept, then the most top-1 kept) and flag
the layer (``Calibration.infeasible``). No (alpha, beta) reproduces plain top-k for certain,
so for such a layer ``policy="off"`` is the honest alternative.

Why mass kept is a label-free proxy for the change of the layer output. The block computes
``y = sum_j w_j f_j(x)`` over its chosen experts. Take the router's view as the reference: the
dense mixture ``y* = sum_j p_j f_j(x)`` over all experts, of which top-k is a truncation the
model was trained with. ASSUME every expert's output has norm at most ``M`` for this token
(experts of similar output norm; nothing here checks it). Then for the chosen set ``C``,
``||y* - y_C|| <= 2 (1 - P(C)) M`` with renormalised weights (Mixtral, Qwen3-MoE) and
``(1 - 2 P(C) + P(T)) M`` with weights rescaled to the top-k mass (Qwen2-MoE, OLMoE): under both
rules, choosing ``C`` instead of ``T`` raises the bound by exactly ``2 (P(T) - P(C)) M
= 2 P(T) (1 - mass_kept) M``. So ``1 - mass_kept`` is the extra error the selector may add on
top of the truncation error top-k already has, in units of the expert norm. What it does NOT
bound is the distance between the two outputs: ``||y_C - y_T|| <= ||w_C - w_T||_1 M``
(``weight_shift``) counts a swap between two experts the router scores almost equally as a
full change. Such swaps are exactly what Lynx does (the router's near-indifference is its
premise), so mass kept rates them as nearly free and weight shift as costly. On flat routers
the two disagree a lot (mass kept 0.95 with a fifth of the weight moved); ``weight_shift`` is
reported, and ``max_weight_shift`` bounds it for those who distrust the premise.

Defaults.
- ``max_mass_loss = 0.05``: the chosen experts keep >= 95% of the mass plain top-k had. The
  extra error bound is then ``0.1 P(T) M`` at most, while top-k's own bound is ``2 (1 - P(T)) M``
  (renormalised): for a router whose top-k carries 40-70% of the mass, the selector adds 3-12%
  of what the model already tolerates. Calibrating on a model's own decode steps shows the whole
  trade-off (``grid_rows``, ``with_bound``) for choosing another value.
- ``min_top1_kept = 0.99``: the top-1 expert matters most (the paper's premise). The selector
  keeps it whenever a token's bin 0 holds at most k experts, so this rejects bins so wide that
  votes override a token's clear favourite, allowing 1% for ties and near-ties.
- grid: ``alpha`` in {0.5, 0.7, 1, 1.5, 2, 3, 4, 6} (bins 2 to 1/6 logits wide) and ``beta`` in
  {1, 2, 3, 4, None}: it covers every released setting (ALGORITHM.md's table).

Decode logits from a model. A prompt batch ``[B, S]`` runs once through lynx with plain routing
(``decode_only``: a prefill keeps plain top-k), and each position ``s >= start_position`` gives
one decode-shaped step: the router logits of the B tokens at ``s``, which a teacher-forced decode
step at ``s`` with a KV cache also computes. A ``[B, 1]`` batch runs row by row (one token is
never re-routed) so that re-routing in earlier layers cannot leak into later layers' logits.
Every layer is thus calibrated on plain-routed hidden states; deployed, later layers see the
states of re-routed earlier layers: a second-order difference this does not model. Only softmax
top-k routers are calibrated (mass kept is defined on softmax probabilities); others are listed
in ``Calibration.skipped``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .backend import lynx_backend
from .capture import capture_routing
from .report import describe_rule, last_report
from .policies.rules import RouterRule, order_key, topk_by_key
from .selector import select_experts
from .settings import derived_settings

ALPHAS = (0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BETAS = (1, 2, 3, 4, None)
MAX_MASS_LOSS = 0.05
MIN_TOP1_KEPT = 0.99
_EPS = 1e-9  # float slack so that an unchanged routing meets a zero-loss bound


@dataclass(frozen=True)
class Bound:
    """How much routing may change: what makes a candidate feasible."""

    max_mass_loss: float = MAX_MASS_LOSS  # mean mass kept >= 1 - max_mass_loss
    min_top1_kept: float = MIN_TOP1_KEPT  # share of tokens keeping their top-1 expert
    max_weight_shift: float | None = None  # optional: mean weight shift <= this

    def __post_init__(self):
        if not 0 <= self.max_mass_loss < 1:
            raise ValueError(f"max_mass_loss must be in [0, 1), got {self.max_mass_loss!r}")
        if not 0 <= self.min_top1_kept <= 1:
            raise ValueError(f"min_top1_kept must be in [0, 1], got {self.min_top1_kept!r}")
        if self.max_weight_shift is not None and not 0 <= self.max_weight_shift <= 1:
            raise ValueError(f"max_weight_shift must be None or in [0, 1], got {self.max_weight_shift!r}")

    def admits(self, c: Candidate) -> bool:
        return (c.mass_kept >= 1 - self.max_mass_loss - _EPS and c.top1_kept >= self.min_top1_kept - _EPS
                and (self.max_weight_shift is None or c.weight_shift <= self.max_weight_shift + _EPS))

    def __str__(self) -> str:
        text = f"mass kept >= {1 - self.max_mass_loss:.3g}, top-1 kept >= {self.min_top1_kept:.3g}"
        return text if self.max_weight_shift is None else f"{text}, weight shift <= {self.max_weight_shift:.3g}"


@dataclass(frozen=True)
class Candidate:
    """One (alpha, beta) evaluated on one layer's captured decode steps."""

    alpha: float
    beta: int | None  # None: no clamp
    distinct: float  # mean distinct experts per step
    mass_kept: float  # mean P(chosen) / P(plain top-k) per token
    top1_kept: float  # share of tokens still using their top-1 expert
    weight_shift: float  # mean share of routing weight moved to other experts
    feasible: bool = False


@dataclass
class LayerCalibration:
    module: str
    top_k: int
    num_experts: int
    renormalize: bool
    steps: int
    tokens: int
    plain_distinct: float  # mean distinct experts of plain top-k
    topk_mass: float  # mean softmax mass of plain top-k, P(T) (how peaked the router is)
    grid: list[Candidate]
    chosen: Candidate
    default: Candidate  # the (k, E) default lynx would use without calibration

    @property
    def feasible(self) -> bool:
        return self.chosen.feasible


@dataclass
class Calibration:
    """Per layer: the chosen (alpha, beta), its metrics against plain top-k and lynx's default,
    and the whole grid. ``layer_settings`` feeds ``options={"layer_settings": ...}``."""

    layers: list[LayerCalibration]
    bound: Bound
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why not calibrated

    @property
    def layer_settings(self) -> dict[str, tuple[float, int | str]]:
        """``{block path: (alpha, beta)}`` for ``options={"layer_settings": ...}`` (beta "none": no clamp)."""
        return {layer.module: (layer.chosen.alpha, "none" if layer.chosen.beta is None else layer.chosen.beta)
                for layer in self.layers}

    @property
    def infeasible(self) -> list[str]:
        """Layers where no candidate met the bound (they got the one closest to plain)."""
        return [layer.module for layer in self.layers if not layer.feasible]

    def with_bound(self, **bound) -> Calibration:
        """The same grid chosen under another bound, no re-evaluation (explore the trade-off).
        Keywords: ``max_mass_loss``, ``min_top1_kept``, ``max_weight_shift``; the rest stay."""
        new = dataclasses.replace(self.bound, **bound)
        return Calibration([_bounded(layer, new) for layer in self.layers], new, dict(self.skipped))

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
                rows.append(dict(module=layer.module, alpha=c.alpha, beta=c.beta, distinct=c.distinct,
                                 plain_distinct=layer.plain_distinct, topk_mass=layer.topk_mass,
                                 mass_kept=c.mass_kept,
                                 top1_kept=c.top1_kept, weight_shift=c.weight_shift,
                                 feasible=c.feasible, chosen=c is layer.chosen))
        return rows

    def to_markdown(self) -> str:
        head = f"lynx calibration: {self.bound}"
        cols = ["layer", "k/E", "steps", "top-k mass", "plain distinct", "default (a, b)", "default distinct",
                "default mass", "chosen (a, b)", "distinct", "mass kept", "top-1 kept",
                "weight shift", "meets bound"]
        rows = [[layer.module, f"{layer.top_k}/{layer.num_experts}", layer.steps, f"{layer.topk_mass:.3f}",
                 f"{layer.plain_distinct:.2f}", _pair(layer.default), f"{layer.default.distinct:.2f}",
                 f"{layer.default.mass_kept:.3f}", _pair(layer.chosen), f"{layer.chosen.distinct:.2f}",
                 f"{layer.chosen.mass_kept:.3f}", f"{layer.chosen.top1_kept:.3f}",
                 f"{layer.chosen.weight_shift:.3f}", "yes" if layer.feasible else "NO (closest to plain)"]
                for layer in self.layers]
        lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        if self.infeasible:
            lines += ["", f"No candidate met the bound on: {', '.join(self.infeasible)}; they keep the "
                          "candidate with the most mass kept (consider policy='off' for them)."]
        for module, why in self.skipped.items():
            lines.append(f"Not calibrated: {module} ({why})")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


def _pair(c: Candidate) -> str:
    return f"({c.alpha:g}, {'none' if c.beta is None else c.beta})"


# --- metrics of one candidate ------------------------------------------------------------

@dataclass
class _Step:
    """What a decode step's plain routing is, computed once for all candidates."""

    logits: torch.Tensor  # fp32 [B, E]
    probs: torch.Tensor  # softmax [B, E]
    plain_ids: torch.Tensor  # [B, k]
    plain_mass: torch.Tensor  # [B]
    plain_weights: torch.Tensor  # dense [B, E] under the model's weight rule


def _plain_step(logits: torch.Tensor, top_k: int, renormalize: bool) -> _Step:
    logits = logits.detach().float()
    probs = torch.softmax(logits, dim=-1)
    plain_ids = topk_by_key(order_key(logits), top_k)  # the selector's own tie rule
    plain_mass = probs.gather(-1, plain_ids).sum(dim=-1)
    weights = probs.gather(-1, plain_ids)
    if renormalize:
        weights = weights / plain_mass[:, None]
    dense = torch.zeros_like(probs).scatter_(-1, plain_ids, weights)
    return _Step(logits, probs, plain_ids, plain_mass, dense)


def _step_metrics(step: _Step, top_k: int, alpha: float, beta: int | None, renormalize: bool):
    """(distinct experts, per-token mass kept, top-1 kept, weight shift) of one step."""
    weights, ids = select_experts(step.logits, top_k, alpha=alpha, beta=beta, renormalize=renormalize)
    mass_kept = step.probs.gather(-1, ids).sum(dim=-1) / step.plain_mass
    top1_kept = (ids == step.plain_ids[:, :1]).any(dim=-1)
    dense = torch.zeros_like(step.probs).scatter_(-1, ids, weights)
    moved = (dense - step.plain_weights).abs().sum(dim=-1) / (2 * step.plain_weights.sum(dim=-1))
    return ids.unique().numel(), mass_kept, top1_kept, moved


def evaluate(steps: Sequence[_Step], top_k: int, alpha: float, beta: int | None,
             renormalize: bool) -> Candidate:
    """One candidate's metrics pooled over a layer's steps (means over steps / tokens)."""
    distinct, mass, top1, shift = zip(*(_step_metrics(s, top_k, alpha, beta, renormalize) for s in steps))
    return Candidate(float(alpha), beta, sum(distinct) / len(distinct), torch.cat(mass).mean().item(),
                     torch.cat(top1).float().mean().item(), torch.cat(shift).mean().item())


# --- choice ------------------------------------------------------------------------------

def _bounded(layer: LayerCalibration, bound: Bound) -> LayerCalibration:
    """``layer`` with feasibility and the choice redone under ``bound``."""
    grid = [dataclasses.replace(c, feasible=bound.admits(c)) for c in layer.grid]
    default = dataclasses.replace(layer.default, feasible=bound.admits(layer.default))
    return dataclasses.replace(layer, grid=grid, chosen=choose(grid), default=default)


def choose(grid: Sequence[Candidate]) -> Candidate:
    """The feasible candidate with the fewest distinct experts; else the one closest to plain."""
    order = {id(c): i for i, c in enumerate(grid)}
    feasible = [c for c in grid if c.feasible]
    if feasible:
        return min(feasible, key=lambda c: (c.distinct, -c.mass_kept, -c.top1_kept, order[id(c)]))
    return min(grid, key=lambda c: (-c.mass_kept, -c.top1_kept, c.distinct, order[id(c)]))


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


def _per_layer(value, module: str, name: str):
    if isinstance(value, Mapping):
        if module not in value:
            raise ValueError(f"{name} has no entry for layer {module!r}")
        return value[module]
    if value is None:
        raise ValueError(f"{name} is required when calibrating from logits")
    return value


def _check_steps(module: str, steps: Sequence[torch.Tensor], top_k) -> None:
    if not steps:
        raise ValueError(f"layer {module!r} has no decode steps")
    widths = {tuple(s.shape[1:]) if isinstance(s, torch.Tensor) and s.dim() == 2 else None for s in steps}
    if None in widths or len(widths) != 1:
        raise ValueError(f"layer {module!r}: every step must be a 2-D [B, E] tensor with one E, "
                         f"got shapes {sorted({tuple(getattr(s, 'shape', ())) for s in steps})}")
    num_experts = widths.pop()[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"layer {module!r}: top_k must be an int in [1, {num_experts}], got {top_k!r}")


def calibrate_logits(
    layer_logits: Mapping[str, Sequence[torch.Tensor]],
    top_k: int | Mapping[str, int],
    renormalize: bool | Mapping[str, bool] = True,
    *,
    max_mass_loss: float = MAX_MASS_LOSS,
    min_top1_kept: float = MIN_TOP1_KEPT,
    max_weight_shift: float | None = None,
    alphas: Iterable[float] = ALPHAS,
    betas: Iterable[int | None] = BETAS,
    progress: bool = False,
) -> Calibration:
    """The core: choose (alpha, beta) per layer from captured decode-step router logits.

    Args:
        layer_logits: ``{block path: [step logits [B, E], ...]}``, one tensor per decode step.
        top_k, renormalize: the router's k and weight rule, one value or one per layer.
        max_mass_loss: feasible when mean mass kept >= 1 - max_mass_loss.
        min_top1_kept: feasible when this share of tokens keeps its top-1 expert.
        max_weight_shift: optional, feasible when mean weight shift <= this (None: no bound).
        alphas, betas: the grid (beta None: no clamp).
        progress: show a tqdm bar over the grid.
    """
    bound = Bound(max_mass_loss, min_top1_kept, max_weight_shift)
    grid_points = [(float(a), b) for a in alphas for b in betas]
    work = []
    for module, steps in layer_logits.items():
        k, renorm = _per_layer(top_k, module, "top_k"), bool(_per_layer(renormalize, module, "renormalize"))
        _check_steps(module, steps, k)
        work.append((module, list(steps), k, renorm))
    bar = _progress(len(work) * (len(grid_points) + 1), progress)
    layers = []
    with _single_thread(), torch.no_grad():
        for module, steps, k, renorm in work:
            layers.append(_calibrate_layer(module, steps, k, renorm, grid_points, bound, bar))
    bar.close()
    return Calibration(layers, bound)


def _calibrate_layer(module, steps, top_k, renormalize, grid_points, bound, bar):
    plain = [_plain_step(s, top_k, renormalize) for s in steps]
    grid = []
    for alpha, beta in grid_points:
        grid.append(evaluate(plain, top_k, alpha, beta, renormalize))
        bar.update(1)
    num_experts = plain[0].logits.shape[1]
    d = derived_settings(top_k, num_experts)
    default = evaluate(plain, top_k, d.alpha, d.beta, renormalize)
    bar.update(1)
    plain_distinct = sum(p.plain_ids.unique().numel() for p in plain) / len(plain)
    topk_mass = torch.cat([p.plain_mass for p in plain]).mean().item()
    layer = LayerCalibration(module, top_k, num_experts, renormalize, len(plain),
                             sum(p.logits.shape[0] for p in plain), plain_distinct, topk_mass, grid, grid[0], default)
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
        ``(logits, layers)``: ``{block path: [[B, E] per step]}`` and ``{block path: MatchedLayer}``.
    """
    if isinstance(start_position, bool) or not isinstance(start_position, int) or start_position < 0:
        raise ValueError(f"start_position must be an int >= 0, got {start_position!r}")
    capture = _Capture(model)
    logits: dict[str, list[torch.Tensor]] = {}
    batches = list(batches)
    bar = _progress(len(batches), progress, "capturing router logits")
    for input_ids in batches:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"each batch must be input ids [B, S], got {getattr(input_ids, 'shape', input_ids)}")
        first = start_position if input_ids.shape[1] > 1 else 0
        for module, per_position in capture.router_logits(input_ids).items():  # [B, S, E]
            logits.setdefault(module, []).extend(per_position[:, s] for s in range(first, per_position.shape[1]))
        bar.update(1)
    bar.close()
    if not any(logits.values()):
        raise ValueError("no decode steps captured: start_position skips every position")
    return logits, dict(capture.blocks)


class _Capture:
    """The model compiled by lynx (eager, plain routing kept), recording every graph's report.

    A forward may compile to several graphs (graph breaks), and ``last_report()`` only holds
    the last one, so the backend here collects them all. Blocks are listed in the order they
    were first matched, which is call order: graphs compile as the first forward reaches them.
    """

    def __init__(self, model):
        self.blocks: dict = {}  # block path -> MatchedLayer, in call order
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
                if any(e.rerouted for e in cap.routing):
                    raise RuntimeError("calibration must capture plain routing, but lynx re-routed this batch")
                if len(cap.routing) != len(self.blocks) or not self.blocks:
                    raise RuntimeError(f"captured {len(cap.routing)} routing calls for {len(self.blocks)} matched "
                                       "MoE blocks; calibration needs each block called once per forward")
                events.append(cap.routing)
        batch, seq = input_ids.shape
        return {module: torch.cat([row_events[i].logits for row_events in events]).view(batch, seq, -1)
                for i, module in enumerate(self.blocks)}  # rows are b-major: b * S + s


def _plain_softmax(layer) -> bool:
    """softmax -> top-k -> [renormalise]: the rule calibration models (no groups, no bias)."""
    plain = {describe_rule(RouterRule(renormalize=r), False) for r in (True, False)}
    return layer.router == "softmax_topk" and getattr(layer, "rule", None) in plain


# --- entry point -------------------------------------------------------------------------

def calibrate(
    source,
    batches: Iterable[torch.Tensor] | None = None,
    *,
    top_k: int | Mapping[str, int] | None = None,
    renormalize: bool | Mapping[str, bool] = True,
    max_mass_loss: float = MAX_MASS_LOSS,
    min_top1_kept: float = MIN_TOP1_KEPT,
    max_weight_shift: float | None = None,
    alphas: Iterable[float] = ALPHAS,
    betas: Iterable[int | None] = BETAS,
    start_position: int = 0,
    progress: bool = False,
) -> Calibration:
    """Choose (alpha, beta) per MoE layer: fewest distinct experts per decode step, subject to
    mean mass kept >= 1 - ``max_mass_loss`` and top-1 kept >= ``min_top1_kept``.

    ``source`` is either a model (then ``batches`` are its input ids, see
    ``capture_decode_logits``; k and the weight rule come from lynx's match report) or a dict
    ``{block path: [logits [B, E] per decode step]}`` (then give ``top_k`` and ``renormalize``).
    Use ``result.layer_settings`` as ``options={"layer_settings": ...}``.
    """
    knobs = dict(max_mass_loss=max_mass_loss, min_top1_kept=min_top1_kept, max_weight_shift=max_weight_shift,
                 alphas=alphas, betas=betas, progress=progress)
    if isinstance(source, Mapping):
        if batches is not None:
            raise ValueError("batches are for a model; a logits dict is already the decode steps")
        return calibrate_logits(source, top_k, renormalize, **knobs)
    if batches is None:
        raise ValueError("calibrating a model needs decode batches (input ids [B, S] or [B, 1])")
    logits, layers = capture_decode_logits(source, batches, start_position=start_position, progress=progress)
    usable = {m: s for m, s in logits.items() if _plain_softmax(layers[m])}
    skipped = {m: f"router {layers[m].router!r} ({getattr(layers[m], 'rule', '?')}) is not a plain softmax "
                  "top-k router" for m in logits if m not in usable}
    result = calibrate_logits(usable, {m: layers[m].top_k for m in usable},
                              {m: layers[m].renormalize for m in usable}, **knobs)
    result.skipped = skipped
    return result

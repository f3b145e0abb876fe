"""One Pareto picture: distinct experts saved against quality lost, for lynx, OEA and XShare.

    python examples/pareto.py                  # the shipped model, B in {4, 8, 16, 32}
    python examples/pareto.py --quick          # smoke run (a few minutes on 2 busy cores)
    python examples/evaluate.py --pareto ...   # the same
    python examples/pareto.py --render         # redo tables, plots and verdict from --raw

Each policy's knob is swept on the same held-out windows as ``examples/evaluate.py`` (its data,
cache and decode helpers are reused), at every batch size B:

- ``lynx`` (AffinityBinning): ``--alphas`` x ``--betas``, by default {1, 2, 3, 6} x {1, 2, 4, none},
  a subset of ``lynx_compile.calibrate``'s grid ALPHAS x BETAS (it contains the released (3, 2));
- ``oea``: ``k0`` in 1..k-1;
- ``xshare``: ``budget`` about geometric from k to E (``--budget-points`` values, E left out), a
  subset of ``calibrate.budget_grid``.

OEA's k0 = k and XShare's budget = E are plain top-k routing by construction: they are the exact
run, drawn as every policy's (0 saved, 0 lost) point (``--endpoints`` runs them and checks that they
equal exact routing). Lynx has no setting that is plain routing for certain; ``policy="off"`` is.

Measurement (paired: every setting predicts the same tokens). Windows of ``--prefill + --steps + 1``
bytes; per B the windows go in batches of B. Each batch is prefilled ONCE with exact routing (lynx
``policy="off"``): every policy keeps plain top-k in prefill (``decode_only``), so the prefill is the
same for all settings; its StaticCache (keys, values and write position of every layer) is copied
and restored in place before each setting's decode steps. ``--steps`` teacher-forced decode steps
[B, 1] follow, each feeding the true next byte. A built-in check runs one setting per policy through
its own compiled prefill and reports the largest difference from the shared cache. Each setting is
compiled once, ``dynamic=True`` (one decode graph for every B; dynamo reset between settings).

Per (B, setting), over the decode predictions:
- experts: distinct experts per MoE layer per decode step (lynx's experts op), mean over layers and
  steps; ``saved`` = 1 - setting / exact, in %.
- accuracy lost: exact next-byte accuracy minus the setting's, in points (paired on the same tokens).
- KL: ``KL(p_exact || p_setting)`` of the next-byte distribution, nats, mean over predictions.
  Label-free: it needs no true bytes, so it runs on any model and any text.
Standard errors are cluster-robust with sequences as clusters (``evaluate.paired_delta``).

Frontier. For each B, policy and quality metric (KL or accuracy lost), a point is Pareto-optimal if
no point of the same policy (the exact point included) saves at least as much with at most as much
loss, one of them strictly.

Verdict (computed, per B and metric). At each matched saving level s in ``LEVELS`` (10%, 20%, ...)
that at least two policies reach, a policy's loss is its least loss among its settings that save at
least s (the best a user can pick from the sweep under that requirement: a staircase, nothing is
interpolated). The winner at s has the least loss; its margin over the runner-up is the paired
difference of the two settings on the same tokens, with its SE, and counts as resolved when it
exceeds 2 SE. Policies whose best settings lose exactly as much tie (XShare with a budget below the
batch's distinct top-1 experts selects exactly what OEA k0 = 1 does). A policy *dominates* at B on a
metric when it has the least loss (alone or tied) at every matched level; otherwise the levels are
listed per winner (a crossover), and a table counts the levels each policy wins. Also counted: the Pareto points of each policy that
a point of another policy dominates (saves at least as much with no more loss, one strictly).

Outputs (``--out``, default out/pareto): pareto.md (verdict, matched-level tables, every point),
pareto.csv (every point), pareto_matched.csv (the matched levels), pareto_B{B}.png (one per B: KL
and accuracy lost against experts saved; every point faint, each policy's frontier connected).
Per-token results go to ``--raw`` (default out/pareto/raw.pt) so that ``--render`` can redo outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no spinning OpenMP workers

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from demo_model import SHIPPED  # noqa: E402
from evaluate import _decode, _prefill, heldout_windows, make_cache, paired_delta  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import lynx_compile  # noqa: E402
from lynx_compile.calibrate import ALPHAS, BETAS, budget_grid  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "pareto"
POLICIES = ("lynx", "oea", "xshare")
COLORS = {"lynx": "tab:blue", "oea": "tab:orange", "xshare": "tab:green"}
NAMES = {"lynx": "lynx (AffinityBinning)", "oea": "OEA", "xshare": "XShare"}
LEVELS = tuple(range(10, 100, 10))  # matched experts-saved levels, %
METRICS = {"kl": "KL(exact || setting), nats", "acc": "next-byte accuracy lost, points"}
RESOLVED_SE = 2.0


# --- settings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    policy: str  # "exact" or one of POLICIES
    knobs: tuple[tuple[str, object], ...] = ()

    @property
    def options(self) -> dict:
        if self.policy == "exact":
            return {"policy": "off"}
        return {"policy": self.policy, **{k: "none" if v is None else v for k, v in self.knobs}}

    @property
    def knob(self) -> str:
        values = dict(self.knobs)
        if self.policy == "exact":
            return "plain top-k"
        if self.policy == "lynx":
            beta = values["beta"]
            return f"({values['alpha']:g}, {'none' if beta is None else beta})"
        return ", ".join(f"{k}={v}" for k, v in self.knobs)

    @property
    def key(self) -> str:
        return f"{self.policy} {self.knob}"


def geometric_budgets(top_k: int, num_experts: int, points: int) -> list[int]:
    """About ``points`` budgets from k up to (not including) E, geometric, inside calibrate's grid."""
    grid = budget_grid(top_k, num_experts)
    ratio = (num_experts / top_k) ** (1 / points)
    wanted = {round(top_k * ratio ** i) for i in range(points)}
    return sorted({min(grid, key=lambda g: abs(g - w)) for w in wanted} - {num_experts})


def parse_number_list(text: str, kind) -> list:
    return [None if item.strip() == "none" else kind(item) for item in text.split(",") if item.strip()]


def sweep_settings(args, top_k: int, num_experts: int) -> list[Setting]:
    alphas = parse_number_list(args.alphas, float)
    betas = parse_number_list(args.betas, int)
    off_grid = [a for a in alphas if a not in ALPHAS] + [b for b in betas if b not in BETAS]
    if off_grid:
        print(f"note: {off_grid} are not in calibrate's grid ALPHAS x BETAS", flush=True)
    k0s = parse_number_list(args.k0s, int) if args.k0s else list(range(1, top_k))
    budgets = (parse_number_list(args.budgets, int) if args.budgets
               else geometric_budgets(top_k, num_experts, args.budget_points))
    if args.endpoints:
        k0s, budgets = sorted(set(k0s) | {top_k}), sorted(set(budgets) | {num_experts})
    bad = [f"k0={k}" for k in k0s if not 1 <= k <= top_k] + [f"budget={b}" for b in budgets
                                                             if not top_k <= b <= num_experts]
    if bad:
        raise SystemExit(f"outside the router's range (k={top_k}, E={num_experts}): {', '.join(bad)}")
    return ([Setting("exact")]
            + [Setting("lynx", (("alpha", a), ("beta", b))) for a in alphas for b in betas]
            + [Setting("oea", (("k0", k),)) for k in k0s]
            + [Setting("xshare", (("budget", b),)) for b in budgets])


# --- running -----------------------------------------------------------------------------

def compile_dynamic(model, setting: Setting):
    """One graph per step kind for every B (dynamo reset: this setting's graphs only)."""
    torch._dynamo.reset()
    return torch.compile(model.forward, backend="lynx", dynamic=True,
                         options={"compiler": "eager", **setting.options})


def snapshot(cache) -> list[tuple[torch.Tensor, ...]]:
    return [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()) for layer in cache.layers]


def restore(cache, state) -> None:
    """In place: the compiled graphs read the cache's tensors at fixed addresses."""
    for layer, (keys, values, length) in zip(cache.layers, state):
        layer.keys.copy_(keys)
        layer.values.copy_(values)
        layer.cumulative_length.copy_(length)


def max_state_diff(a, b) -> float:
    return max(max((x.float() - y.float()).abs().max().item() for x, y in zip(la, lb)) for la, lb in zip(a, b))


@dataclass
class Tokens:
    """Per-token results of one (B, setting), [sequences, steps]."""

    correct: torch.Tensor
    nll: torch.Tensor  # nats
    kl: torch.Tensor  # nats, KL(exact || setting); zeros for exact
    distinct: float  # distinct experts per layer per decode step, mean


def decode_sweep(forward, cache, states, windows: torch.Tensor, batch: int, prefill: int, steps: int,
                 exact_logp: torch.Tensor | None, bar) -> tuple[Tokens, torch.Tensor]:
    """Teacher-forced decode of every window batch from its shared prefill state."""
    correct, nll, logps, distinct = [], [], [], []
    for state, x in zip(states, windows.split(batch)):
        restore(cache, state)
        rows = []
        for s in range(steps):
            pos = prefill + s
            with lynx_compile.capture_routing() as cap:
                out = _decode(forward, cache, x[:, pos:pos + 1], pos)
            rows.append(out.logits[:, -1].float().log_softmax(-1))
            counts = cap.distinct_experts()
            distinct.append(sum(counts) / len(counts))
            bar.update(1)
        logp = torch.stack(rows, 1)  # [B, steps, V]
        target = x[:, prefill + 1:prefill + steps + 1]
        nll.append(-logp.gather(-1, target[..., None])[..., 0])
        correct.append(logp.argmax(-1) == target)
        logps.append(logp)
    logp = torch.cat(logps)
    if exact_logp is None:
        kl = torch.zeros(logp.shape[:2])
    else:
        kl = (exact_logp.exp() * (exact_logp - logp)).sum(-1).clamp_min(0)  # clamp: fp round-off only
    return Tokens(torch.cat(correct), torch.cat(nll), kl, sum(distinct) / len(distinct)), logp


def run_sweep(model, settings: list[Setting], windows: torch.Tensor, batches: list[int], args) -> dict:
    """{(B, setting key): Tokens} and the prefill check."""
    length = args.prefill + args.steps
    caches = {b: make_cache(model, b, length) for b in batches}
    results: dict[tuple[int, str], Tokens] = {}
    total = len(settings) * sum(windows.shape[0] // b * args.steps for b in batches)
    bar = tqdm(total=total, desc="decode steps", unit="step", mininterval=2)
    states: dict[int, list] = {}
    exact_logp: dict[int, torch.Tensor] = {}
    prefill_check: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for setting in settings:
        start = time.perf_counter()
        forward = compile_dynamic(model, setting)
        if setting.policy == "exact":  # the shared prefills, with plain routing
            for b in batches:
                states[b] = []
                for x in windows.split(b):
                    _prefill(forward, caches[b], x[:, :args.prefill])
                    states[b].append(snapshot(caches[b]))
        elif setting.policy not in prefill_check:  # this policy's own prefill against the shared one
            b = batches[0]
            _prefill(forward, caches[b], windows[:b, :args.prefill])
            prefill_check[setting.policy] = max_state_diff(snapshot(caches[b]), states[b][0])
        for b in batches:
            bar.set_postfix_str(f"{setting.key} B={b}")
            tokens, logp = decode_sweep(forward, caches[b], states[b], windows, b, args.prefill, args.steps,
                                        exact_logp.get(b), bar)
            if setting.policy == "exact":
                exact_logp[b] = logp
            results[(b, setting.key)] = tokens
            exact = results[(b, "exact plain top-k")]
            tqdm.write(f"B={b:>2} {setting.key:<24} experts {tokens.distinct:5.2f} "
                       f"saved {100 * (1 - tokens.distinct / exact.distinct):5.1f}% "
                       f"acc {100 * tokens.correct.double().mean().item():6.2f} KL {tokens.kl.mean().item():.5f}")
        seconds[setting.key] = time.perf_counter() - start
    bar.close()
    torch._dynamo.reset()
    return {"tokens": results, "prefill_check": prefill_check, "seconds": seconds}


# --- rows, frontiers, verdict ------------------------------------------------------------

@dataclass
class Row:
    batch: int
    policy: str
    knob: str
    tokens: int
    distinct: float
    saved: float  # %
    acc: float  # %
    acc_lost: float = 0.0  # points, exact - setting
    acc_lost_se: float = 0.0
    kl: float = 0.0
    kl_se: float = 0.0
    d_bpb: float = 0.0
    front_kl: bool = False
    front_acc: bool = False

    @property
    def key(self) -> str:
        return f"{self.policy} {self.knob}"

    def loss(self, metric: str) -> float:
        return self.kl if metric == "kl" else self.acc_lost


def make_rows(settings: list[Setting], tokens: dict, batches: list[int], top_k: int, num_experts: int) -> list[Row]:
    rows = []
    for b in batches:
        exact = tokens[(b, "exact plain top-k")]
        for s in settings:
            t = tokens[(b, s.key)]
            lost, lost_se = paired_delta(exact.correct, t.correct)
            kl, kl_se = paired_delta(t.kl, torch.zeros_like(t.kl))
            d_nll, _ = paired_delta(t.nll, exact.nll)
            rows.append(Row(b, s.policy, s.knob, t.correct.numel(), t.distinct, 100 * (1 - t.distinct / exact.distinct),
                            100 * t.correct.double().mean().item(), 100 * lost, 100 * lost_se, kl, kl_se,
                            d_nll / math.log(2)))
    for b in batches:
        for policy in POLICIES:
            # the exact run is every policy's zero point (OEA k0 = k, XShare budget = E are plain routing)
            points = [r for r in rows if r.batch == b and (r.policy == policy or r.policy == "exact")]
            for metric in METRICS:
                mask = pareto_mask([r.saved for r in points], [r.loss(metric) for r in points])
                for r, on in zip(points, mask):
                    if r.policy == policy and on:
                        setattr(r, f"front_{metric}", True)
    return rows


def pareto_mask(saved: list[float], loss: list[float]) -> list[bool]:
    """True where no other point saves at least as much with at most as much loss, one strictly."""
    return [not any(s2 >= s and l2 <= loss_ and (s2 > s or l2 < loss_) for s2, l2 in zip(saved, loss))
            for s, loss_ in zip(saved, loss)]


def best_at(points: list[Row], level: float, metric: str) -> Row | None:
    """The least-loss point saving at least ``level`` % (ties: more saved), or None."""
    reach = [r for r in points if r.saved >= level]
    return min(reach, key=lambda r: (r.loss(metric), -r.saved)) if reach else None


@dataclass
class Level:
    batch: int
    metric: str
    level: int
    best: dict  # policy -> Row or None
    winners: tuple[str, ...]  # the policies with the least loss (several: a tie)
    runner_up: str | None  # the next policy by loss (None: all tied)
    margin: float  # runner-up loss - winners' loss
    margin_se: float

    @property
    def resolved(self) -> bool:
        return self.margin > RESOLVED_SE * self.margin_se


def winner_name(winners: tuple[str, ...]) -> str:
    return " = ".join(NAMES[p] for p in winners)


def matched_levels(rows: list[Row], tokens: dict | None, batch: int, metric: str) -> list[Level]:
    """Each matched level reached by >= 2 policies; margins paired on tokens when ``tokens`` is given.

    Policies whose best settings have exactly equal loss tie (e.g. XShare with a budget below the
    batch's distinct top-1 experts selects exactly what OEA k0 = 1 selects)."""
    out = []
    for level in LEVELS:
        best = {p: best_at([r for r in rows if r.batch == batch and r.policy == p], level, metric) for p in POLICIES}
        reached = [p for p in POLICIES if best[p] is not None]
        if len(reached) < 2:
            continue
        least = min(best[p].loss(metric) for p in reached)
        winners = tuple(p for p in reached if best[p].loss(metric) == least)
        rest = sorted((p for p in reached if p not in winners), key=lambda p: best[p].loss(metric))
        runner = rest[0] if rest else None
        if runner is None:
            margin, se = 0.0, 0.0
        elif tokens is None:
            margin, se = best[runner].loss(metric) - least, float("nan")
        else:
            tw, tr = tokens[(batch, best[winners[0]].key)], tokens[(batch, best[runner].key)]
            if metric == "kl":
                margin, se = paired_delta(tr.kl, tw.kl)
            else:  # accuracy lost by the runner-up minus the winner's = winner's accuracy - runner-up's
                margin, se = (100 * v for v in paired_delta(tw.correct, tr.correct))
        out.append(Level(batch, metric, level, best, winners, runner, margin, se))
    return out


def dominated_counts(rows: list[Row], batch: int, metric: str) -> dict[str, tuple[int, int]]:
    """policy -> (its Pareto points dominated by another policy's point, its Pareto points)."""
    out = {}
    for p in POLICIES:
        front = [r for r in rows if r.batch == batch and r.policy == p and getattr(r, f"front_{metric}")]
        others = [r for r in rows if r.batch == batch and r.policy not in (p, "exact")]
        hit = sum(any(o.saved >= r.saved and o.loss(metric) <= r.loss(metric)
                      and (o.saved > r.saved or o.loss(metric) < r.loss(metric)) for o in others) for r in front)
        out[p] = (hit, len(front))
    return out


def _ranges(levels: list[int]) -> str:
    """[10, 20, 30, 60] -> '10-30%, 60%'."""
    parts, run = [], []
    for v in levels:
        if run and v != run[-1] + 10:
            parts.append(run)
            run = []
        run.append(v)
    if run:
        parts.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}%" if len(r) > 1 else f"{r[0]}%" for r in parts)


def verdict_lines(rows: list[Row], levels: list[Level], batches: list[int]) -> list[str]:
    lines = []
    for b in batches:
        parts = []
        for metric, what in (("kl", "KL"), ("acc", "accuracy lost")):
            at = [lv for lv in levels if lv.batch == b and lv.metric == metric]
            if not at:
                parts.append(f"{what}: no level reached by two policies")
                continue
            resolved = f"margin > {RESOLVED_SE:g} SE at {sum(lv.resolved for lv in at)} of {len(at)} levels"
            always = [p for p in POLICIES if all(p in lv.winners for lv in at)]
            if always:
                ties = [lv.level for lv in at if len(lv.winners) > 1]
                tied = f", tied at {_ranges(ties)}" if ties else ""
                parts.append(f"{what}: **{winner_name(tuple(always))} dominates{'' if len(always) == 1 else ' (tied)'}**"
                             f" (least at every matched saving, {_ranges([lv.level for lv in at])}{tied}; {resolved})")
                continue
            groups = sorted({lv.winners for lv in at}, key=lambda w: min(lv.level for lv in at if lv.winners == w))
            per = "; ".join(f"{winner_name(w)} at {_ranges([lv.level for lv in at if lv.winners == w])}"
                            for w in groups)
            parts.append(f"{what}: crossover, least is {per} ({resolved})")
        counts = dominated_counts(rows, b, "kl")
        dom = ", ".join(f"{NAMES[p]} {h}/{n}" for p, (h, n) in counts.items())
        lines.append(f"- B = {b}: {parts[0]}. {parts[1]}. KL-frontier points dominated by another rule's point: "
                     f"{dom}.")
    return lines


def summary_table(levels: list[Level], batches: list[int]) -> str:
    """Per B: at how many matched levels each policy has the least loss (ties count for each), and of
    those how many with a margin over the runner-up > RESOLVED_SE standard errors."""
    head = ["B", "matched levels", *(f"least KL: {NAMES[p]}" for p in POLICIES),
            *(f"least acc lost: {NAMES[p]}" for p in POLICIES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in batches:
        cells = [b]
        for metric in METRICS:
            at = [lv for lv in levels if lv.batch == b and lv.metric == metric]
            if metric == "kl":
                cells.append(_ranges([lv.level for lv in at]) or "-")
            for p in POLICIES:
                won = [lv for lv in at if p in lv.winners]
                cells.append(f"{len(won)} ({sum(lv.resolved for lv in won)})")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --- outputs -----------------------------------------------------------------------------

ROW_FIELDS = list(Row.__dataclass_fields__)


def write_rows(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ROW_FIELDS)
        for r in rows:
            w.writerow([f"{v:.8g}" if isinstance(v, float) else v for v in (getattr(r, k) for k in ROW_FIELDS)])


def write_levels(levels: list[Level], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch", "metric", "saved_at_least", *(f"{p}_{c}" for p in POLICIES for c in ("loss", "knob", "saved")),
                    "least", "runner_up", "margin", "margin_se", "resolved"])
        for lv in levels:
            cells = []
            for p in POLICIES:
                r = lv.best[p]
                cells += ["", "", ""] if r is None else [f"{r.loss(lv.metric):.6g}", r.knob, f"{r.saved:.2f}"]
            w.writerow([lv.batch, lv.metric, lv.level, *cells, "=".join(lv.winners), lv.runner_up or "",
                        f"{lv.margin:.6g}",
                        f"{lv.margin_se:.6g}", lv.resolved])


def _fmt(metric: str, value: float) -> str:
    return f"{value:.4f}" if metric == "kl" else f"{value:+.2f}"


def levels_table(levels: list[Level], metric: str) -> str:
    head = ["B", "saved >=", *(NAMES[p] for p in POLICIES), "least", "margin (±SE)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in (lv for lv in levels if lv.metric == metric):
        cells = [lv.batch, f"{lv.level}%"]
        for p in POLICIES:
            r = lv.best[p]
            cells.append("-" if r is None else f"{_fmt(metric, r.loss(metric))} {r.knob} ({r.saved:.0f}%)")
        mark = "" if lv.resolved else " (not resolved)"
        se = f"{lv.margin_se:.4f}" if metric == "kl" else f"{lv.margin_se:.2f}"
        margin = "- (all equal)" if lv.runner_up is None else f"{_fmt(metric, lv.margin)} ± {se}{mark}"
        cells += [winner_name(lv.winners), margin]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def rows_table(rows: list[Row]) -> str:
    head = ["B", "policy", "knob", "distinct experts / layer / step", "saved %", "next-byte acc %",
            "acc lost pts (±SE)", "KL nats (±SE)", "Δbits/byte", "frontier (KL / acc)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        exact = r.policy == "exact"
        front = ", ".join(name for name, on in (("KL", r.front_kl), ("acc", r.front_acc)) if on) or "-"
        cells = [r.batch, r.policy, r.knob, f"{r.distinct:.2f}", "-" if exact else f"{r.saved:.1f}", f"{r.acc:.2f}",
                 "-" if exact else f"{r.acc_lost:+.2f} ± {r.acc_lost_se:.2f}",
                 "-" if exact else f"{r.kl:.4f} ± {r.kl_se:.4f}", "-" if exact else f"{r.d_bpb:+.4f}",
                 "-" if exact else front]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_batch(rows: list[Row], batch: int, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    points = [r for r in rows if r.batch == batch and r.policy != "exact"]
    for ax, metric in zip(axes, METRICS):
        for p in POLICIES:
            mine = [r for r in points if r.policy == p]
            shown = [r for r in mine if metric == "acc" or r.kl > 0]  # KL is drawn on a log axis
            ax.scatter([r.saved for r in shown], [r.loss(metric) for r in shown], s=14, c=COLORS[p], alpha=0.25,
                       linewidths=0)
            front = sorted((r for r in shown if getattr(r, f"front_{metric}")), key=lambda r: r.saved)
            if metric == "acc":
                front = [Row(batch, p, "exact", 0, 0, 0.0, 0.0)] + front
            ax.plot([r.saved for r in front], [r.loss(metric) for r in front], "-o", c=COLORS[p], ms=4, lw=1.4,
                    label=f"{NAMES[p]} frontier")
            if metric == "acc":
                real = front[1:]
                ax.errorbar([r.saved for r in real], [r.acc_lost for r in real], yerr=[r.acc_lost_se for r in real],
                            fmt="none", ecolor=COLORS[p], alpha=0.5, capsize=2)
            labels: dict[tuple[float, float], list[str]] = {}  # identical selections share one label
            for r in front:
                if r.saved > 0:
                    labels.setdefault((r.saved, r.loss(metric)), []).append(r.knob.replace("budget=", ""))
            for (x, y), knobs in labels.items():
                text = f"m={','.join(knobs)}" if p == "xshare" else ",".join(knobs)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=COLORS[p])
        ax.set_xlabel("distinct experts per layer per step saved (%)")
        ax.set_ylabel(METRICS[metric])
        if metric == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(0, ls=":", c="gray", lw=0.8)
            ax.axhline(1, ls="--", c="tab:red", lw=0.8, label="1 point")
        ax.set_xlim(-2, max([r.saved for r in points] + [10]) + 8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}, B = {batch} (faint: every setting; lines: each rule's Pareto frontier)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def render(raw: dict, out: Path) -> str:
    """All outputs from the raw results; returns the verdict text."""
    meta = raw["meta"]
    settings = [Setting(p, tuple(tuple(kv) for kv in knobs)) for p, knobs in meta["settings"]]
    batches = meta["batches"]
    tokens = {(int(key.split("|")[0]), key.split("|", 1)[1]): Tokens(**t) for key, t in raw["tokens"].items()}
    rows = make_rows(settings, tokens, batches, meta["top_k"], meta["num_experts"])
    levels = [lv for b in batches for m in METRICS for lv in matched_levels(rows, tokens, b, m)]
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "pareto.csv")
    write_levels(levels, out / "pareto_matched.csv")
    for b in batches:
        plot_batch(rows, b, out / f"pareto_B{b}.png", meta["description"])
    verdict = verdict_lines(rows, levels, batches)
    endpoints = [r for r in rows if r.knob in (f"k0={meta['top_k']}", f"budget={meta['num_experts']}")]
    checks = [f"Prefill shared across settings: each policy's own compiled prefill (B = {batches[0]}, first window "
              f"batch) differs from the shared cache by at most "
              + ", ".join(f"{v:.1e} ({k})" for k, v in meta["prefill_check"].items()) + "."]
    if endpoints:
        same = all(r.acc_lost == 0 and r.saved == 0 for r in endpoints)
        checks.append(f"Endpoints (OEA k0 = k, XShare budget = E) against exact routing at every B: same accuracy and "
                      f"experts: {'yes' if same else 'NO'}; largest KL {max(r.kl for r in endpoints):.1e} nats.")
    md = [f"# Pareto sweep: experts saved vs quality lost, {meta['description']}", "", meta["intro"], "",
          "## Verdict", "", *verdict, "", summary_table(levels, batches), "",
          f"Levels won per rule (in brackets: with a margin over the runner-up > {RESOLVED_SE:g} SE); a tie counts for "
          "each tied rule.", "", " ".join(checks), "",
          f"## At matched savings: KL(exact || setting), nats (least over each rule's settings saving at least "
          f"the level; knob and its saving in brackets)", "", levels_table(levels, "kl"), "",
          "## At matched savings: next-byte accuracy lost, points", "", levels_table(levels, "acc"), "",
          "Margin: the runner-up's loss minus the winner's, paired on the same tokens, ± cluster-robust SE "
          f"(clusters: sequences); 'not resolved' when it is under {RESOLVED_SE:g} SE.", "",
          "## Every setting", "", rows_table(rows), "",
          "Plots: " + ", ".join(f"[B = {b}](pareto_B{b}.png)" for b in batches) + ".", ""]
    (out / "pareto.md").write_text("\n".join(md))
    return "\n".join(verdict)


# --- main --------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED), help="model directory (default: the shipped model)")
    ap.add_argument("--batch-sizes", default="4,8,16,32")
    ap.add_argument("--alphas", default="1,2,3,6", help="lynx alphas (comma-separated)")
    ap.add_argument("--betas", default="1,2,4,none", help="lynx betas ('none': no clamp)")
    ap.add_argument("--k0s", default="", help="OEA k0 values (default 1..k-1)")
    ap.add_argument("--budgets", default="", help="XShare budgets (default: --budget-points geometric, k to E)")
    ap.add_argument("--budget-points", type=int, default=8)
    ap.add_argument("--endpoints", action="store_true", help="also run k0 = k and budget = E (plain routing: a check)")
    ap.add_argument("--prefill", type=int, default=128, help="prefill bytes")
    ap.add_argument("--steps", type=int, default=96, help="teacher-forced decode steps per sequence")
    ap.add_argument("--seqs", type=int, default=32, help="sequences (a multiple of every B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--raw", type=Path, default=OUT / "raw.pt", help="per-token results (for --render)")
    ap.add_argument("--quick", action="store_true", help="smoke run: B in {4, 16}, a small grid, short sequences")
    ap.add_argument("--render", action="store_true", help="only redo the outputs from --raw")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.alphas, args.betas, args.budget_points = "4,16", "2,6", "2,none", 4
        args.prefill, args.steps, args.seqs, args.endpoints = 32, 16, 16, True
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        print(render(torch.load(args.raw), args.out))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    top_k, num_experts = cfg.num_experts_per_tok, cfg.num_experts
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bad = [b for b in batches if b < 2 or args.seqs % b]
    if bad:
        raise SystemExit(f"every B must be >= 2 and divide --seqs ({args.seqs}); bad: {bad}")
    settings = sweep_settings(args, top_k, num_experts)
    windows = heldout_windows(model_dir, args.seqs, args.prefill + args.steps + 1, args.seed)
    description = (f"{model_dir.name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, E={num_experts}, "
                   f"k={top_k})")
    print(f"{description}: {len(settings)} settings x B in {batches}", flush=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    with torch.no_grad():
        result = run_sweep(model, settings, windows, batches, args)
    elapsed = time.perf_counter() - t0
    load_end = os.getloadavg()
    command = "python examples/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    intro = (f"`{command.strip()}`: held-out stdlib files of `{model_dir.name}`, {args.seqs} windows (seed {args.seed}), "
             f"a {args.prefill}-byte prefill (plain routing, shared by all settings), then {args.steps} teacher-forced "
             f"decode steps per sequence: {args.seqs * args.steps} predicted bytes per (B, setting), the same for "
             f"every setting and B. Settings: lynx (alpha, beta) in {{{args.alphas}}} x {{{args.betas}}}, OEA k0 in "
             f"{sorted({dict(s.knobs)['k0'] for s in settings if s.policy == 'oea'})}, XShare budget in "
             f"{sorted({dict(s.knobs)['budget'] for s in settings if s.policy == 'xshare'})}; exact = lynx "
             f"policy 'off', every rule's 0-saved point. lynx compiler 'eager', dynamic=True, fp32, "
             f"{args.threads} torch thread(s) on {os.cpu_count()} cores ({platform.machine()}); "
             f"run time {elapsed / 60:.1f} min, load average {load[0]:.2f} at the start, {load_end[0]:.2f} at the end.")
    raw = {"meta": {"description": description, "intro": intro, "batches": batches, "top_k": top_k,
                    "num_experts": num_experts, "settings": [(s.policy, [list(kv) for kv in s.knobs]) for s in settings],
                    "prefill_check": result["prefill_check"], "seconds": result["seconds"]},
           "tokens": {f"{b}|{key}": dataclasses.asdict(t) for (b, key), t in result["tokens"].items()}}
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, args.raw)
    text = render(raw, args.out)
    print(text)
    print(f"wrote {args.out / 'pareto.md'}, pareto.csv, pareto_matched.csv, "
          f"{', '.join(f'pareto_B{b}.png' for b in batches)} ({elapsed / 60:.1f} min); raw: {args.raw}")
    print(json.dumps({"prefill_check": result["prefill_check"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality of lynx's batch-aware routing against exact routing, on held-out Python source.

    python examples/evaluate.py                 # the shipped model (about 30 min on 2 busy cores)
    python examples/evaluate.py --quick         # smoke run (2-3 min)
    python examples/evaluate.py --model out/tiny-moe-quick
    python examples/evaluate.py --pareto [--quick]  # the policies' Pareto sweep: examples/pareto.py

Data: windows of ``--prefill + --steps + 1`` bytes from the model's held-out files
(``heldout_files.txt`` in the model directory, under ``sysconfig.get_paths()["stdlib"]``),
at random places chosen by ``--seed``; ids are bytes + 3 (ByT5, as the model was trained).
The same windows are used for every batch size B and every setting, so all comparisons are
paired: the same tokens are predicted with exact routing and with lynx.

For each B (``--batch-sizes``) and each setting (exact routing = lynx ``policy="off"``,
lynx with the model's default (alpha, beta), the released Qwen3 setting (3, 2), milder and
stronger ones, and the per-layer settings of ``lynx_compile.calibrate``), the model is
compiled with ``torch.compile(model.forward, backend="lynx", options={"compiler": "eager",
...})`` and run on a StaticCache:

- teacher forcing: prefill ``--prefill`` bytes (plain top-k, as lynx always does in
  prefill), then ``--steps`` decode steps, each feeding the true next byte of each of the B
  sequences (a real decode batch [B, 1] with a KV cache); the step's logits predict the byte
  after it. Reported: next-byte accuracy (argmax == true byte) and bits per byte (mean
  cross-entropy / ln 2), over decode predictions only.
- greedy agreement: from the first ``--prefill`` bytes of the first ``--greedy-seqs``
  windows, greedy-generate ``--greedy-tokens`` (G) tokens, B sequences at a time, with exact
  routing and with the setting. Per sequence, L = the length of the common prefix of the two
  generations (the number of leading positions before the first differing token; G if none
  differs). ``prefix`` = mean L / G; ``token agree`` = the share of all G positions whose
  tokens are equal (after a divergence the contexts differ, so this mixes in recovery);
  ``identical`` = share of sequences with L = G. The first token comes from the prefill
  (plain routing in both), so L >= 1 unless the two prefills round differently.
- experts: the distinct experts each MoE layer reads per decode step (lynx's experts op),
  mean over layers and steps; ``saved`` = 1 - lynx / exact, exact being the same decode
  steps with exact routing.
- top-1 kept: over every re-routed (layer, token) of the decode steps, the share whose top-1
  expert under exact routing of the same logits (argmax of the captured router logits) is
  among the experts lynx chose.

Statistics. Accuracies come with the binomial standard error sqrt(p (1 - p) / n). A delta
against exact routing is a paired difference on the same tokens; its standard error is
computed with sequences as clusters (tokens of one sequence are correlated), which is larger
than the naive paired SE. B = 1 decode steps are never re-routed (lynx needs >= 2 tokens), so
there every setting must equal exact routing: a built-in check.

Outputs (``--out``, default out/evaluate): quality.md (the table and the verdict on the
issue-5 target: at B = 16, >= 30% fewer distinct experts per layer per step with at most 1
point loss of next-byte accuracy), quality.csv, quality.png (accuracy delta vs experts saved,
per B, one point per setting, the paper's 1-point bound drawn), calibration.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: no spinning OpenMP workers

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from demo_model import SHIPPED, heldout_sources  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402

import lynx_compile  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out" / "evaluate"
BYTE_OFFSET = 3  # ByT5: id = byte + 3
TARGET_B, TARGET_SAVED, TARGET_LOSS = 16, 30.0, 1.0  # issue 5: at B=16, >= 30% saved, <= 1 point lost
# (alpha, beta) pairs besides the default: the released Qwen3 setting, milder and stronger ones
DEFAULT_SETTINGS = "default,3:2,6:4,3:4,6:2,2:2,3:1,1:2,1:1"


# --- settings ----------------------------------------------------------------------------

@dataclass
class Setting:
    name: str
    options: dict  # lynx options besides compiler="eager"
    pairs: str = ""  # the (alpha, beta) actually used, for the table

    @property
    def exact(self) -> bool:
        return self.options.get("policy") == "off"


def _beta_text(beta) -> str:
    return "none" if beta is None or beta == "none" else str(beta)


def parse_settings(spec: str) -> list[Setting]:
    settings = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "default":
            settings.append(Setting("default", {"policy": "lynx"}))
            continue
        alpha, _, beta = item.partition(":")
        beta = beta or "none"
        opts = {"policy": "lynx", "alpha": float(alpha), "beta": "none" if beta == "none" else int(beta)}
        settings.append(Setting(f"({float(alpha):g}, {_beta_text(beta)})", opts))
    return settings


def layer_pairs(report) -> dict[str, tuple]:
    return {m.module: (m.alpha, m.beta) for m in report.matched}


def describe_pairs(pairs: dict[str, tuple]) -> str:
    values = set(pairs.values())
    if len(values) == 1:
        a, b = values.pop()
        return f"({a:g}, {_beta_text(b)})"
    return " ".join(f"L{_layer_index(m)}({a:g},{_beta_text(b)})" for m, (a, b) in pairs.items())


def _layer_index(module: str) -> str:
    parts = [p for p in module.split(".") if p.isdigit()]
    return parts[0] if parts else module


# --- data --------------------------------------------------------------------------------

def heldout_windows(model_dir: Path, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` byte ids from random places in held-out files.

    Files are visited in a seeded random order, round robin, so windows spread over files;
    windows of one file do not overlap."""
    rng = random.Random(seed)
    sources = [p for p in heldout_sources(model_dir) if p.stat().st_size >= length]
    if not sources:
        raise RuntimeError(f"no held-out file of {model_dir} has {length} bytes")
    rng.shuffle(sources)
    taken: dict[Path, list[int]] = {}
    rows, tries = [], 0
    while len(rows) < count:
        tries += 1
        if tries > 100 * count:
            raise RuntimeError(f"only {len(rows)} non-overlapping held-out windows of {length} bytes")
        path = sources[tries % len(sources)]
        data = path.read_bytes()
        start = rng.randrange(len(data) - length + 1)
        if any(abs(start - s) < length for s in taken.get(path, [])):
            continue
        taken.setdefault(path, []).append(start)
        rows.append([b + BYTE_OFFSET for b in data[start:start + length]])
    return torch.tensor(rows)


# --- running one configuration -----------------------------------------------------------

@dataclass
class Run:
    """What one (B, setting) produced; per-token tensors are [sequences, steps]."""

    correct: torch.Tensor
    nll: torch.Tensor  # nats
    pred: torch.Tensor  # argmax ids
    greedy: torch.Tensor  # [greedy sequences, G]
    distinct: list[float] = field(default_factory=list)  # per decode step, mean over layers
    top1_kept: int = 0
    rerouted: int = 0  # re-routed (layer, token) pairs
    routed: int = 0  # all (layer, token) pairs of the decode steps
    mass_kept: float = 0.0  # sum over re-routed (layer, token) of P(chosen) / P(plain top-k)
    plain_distinct: list[float] = field(default_factory=list)  # exact top-k of the same logits
    graphs: int = 0
    seconds: float = 0.0


def compile_forward(model, setting: Setting):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts this configuration's graphs only
    return torch.compile(model.forward, backend="lynx", options={"compiler": "eager", **setting.options})


def make_cache(model, batch: int, length: int) -> StaticCache:
    """A StaticCache initialised up front: a lazily initialised one makes dynamo compile the
    first prefill (uninitialised cache) and later prefills (initialised) separately."""
    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=length)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads, head_dim, model.dtype, model.device)
    return cache


def _prefill(forward, cache, prompt):
    cache.reset()
    length = prompt.shape[1]
    prompt = prompt.clone()  # no storage offset: views of a window would each be guarded anew
    return forward(input_ids=prompt, cache=cache, cache_position=torch.arange(length), use_cache=True,
                   logits_to_keep=1)


def _decode(forward, cache, tokens, position):
    return forward(input_ids=tokens.clone(), cache=cache, cache_position=torch.tensor([position]), use_cache=True,
                   logits_to_keep=1)


def _tally_step(run: Run, cap, top_k: int):
    if cap.dispatch:
        run.distinct.append(sum(cap.distinct_experts()) / len(cap.dispatch))
    plain = []
    for event in cap.routing:
        logits = event.logits.float()
        plain_ids = torch.topk(logits, top_k, dim=-1).indices
        plain.append(plain_ids.unique().numel())
        run.routed += logits.shape[0]
        if not event.rerouted:
            continue
        best = logits.argmax(-1, keepdim=True)
        run.top1_kept += int((event.ids == best).any(-1).sum())
        run.rerouted += logits.shape[0]
        probs = logits.softmax(-1)
        run.mass_kept += float((probs.gather(-1, event.ids).sum(-1) / probs.gather(-1, plain_ids).sum(-1)).sum())
    if plain:
        run.plain_distinct.append(sum(plain) / len(plain))


def run_config(model, setting: Setting, windows: torch.Tensor, greedy_prompts: torch.Tensor, batch: int,
               prefill: int, steps: int, greedy_tokens: int, bar) -> Run:
    start = time.perf_counter()
    forward = compile_forward(model, setting)
    top_k = model.config.num_experts_per_tok
    cache = make_cache(model, batch, prefill + max(steps, greedy_tokens))
    correct, nll, pred = [], [], []
    run = Run(None, None, None, None)
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        _prefill(forward, cache, x[:, :prefill])
        c_rows, n_rows, p_rows = [], [], []
        for s in range(steps):
            pos = prefill + s
            with lynx_compile.capture_routing() as cap:
                out = _decode(forward, cache, x[:, pos:pos + 1], pos)
            logp = out.logits[:, -1].float().log_softmax(-1)
            target = x[:, pos + 1]
            n_rows.append(-logp.gather(-1, target[:, None])[:, 0])
            p_rows.append(logp.argmax(-1))
            c_rows.append(p_rows[-1] == target)
            _tally_step(run, cap, top_k)
            bar.update(1)
        correct.append(torch.stack(c_rows, 1))
        nll.append(torch.stack(n_rows, 1))
        pred.append(torch.stack(p_rows, 1))
    run.correct, run.nll, run.pred = torch.cat(correct), torch.cat(nll), torch.cat(pred)
    generated = []
    for i in range(0, greedy_prompts.shape[0], batch):
        prompt = greedy_prompts[i:i + batch]
        token = _prefill(forward, cache, prompt).logits[:, -1].argmax(-1)
        tokens = [token]
        for s in range(greedy_tokens - 1):
            token = _decode(forward, cache, token[:, None], prefill + s).logits[:, -1].argmax(-1)
            tokens.append(token)
            bar.update(1)
        generated.append(torch.stack(tokens, 1))
    run.greedy = torch.cat(generated)
    run.graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    run.seconds = time.perf_counter() - start
    return run


# --- statistics --------------------------------------------------------------------------

def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_delta(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over all tokens and its cluster-robust SE (clusters: sequences, rows)."""
    d = (a.double() - b.double())
    n = d.numel()
    mean = d.mean().item()
    per_seq = d.sum(1) - mean * d.shape[1]
    g = d.shape[0]
    se = math.sqrt(g / max(g - 1, 1) * float((per_seq ** 2).sum())) / n
    return mean, se


def greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(mean common-prefix length / G, share of equal positions, share of identical sequences)."""
    same = a == b
    prefix = same.long().cumprod(1).sum(1).double()
    length = a.shape[1]
    return (prefix.mean().item() / length, same.double().mean().item(), (prefix == length).double().mean().item())


@dataclass
class Row:
    batch: int
    setting: str
    pairs: str
    tokens: int
    acc: float
    acc_se: float
    bpb: float
    distinct: float
    d_acc: float = 0.0  # points
    d_acc_se: float = 0.0
    d_bpb: float = 0.0
    d_bpb_se: float = 0.0
    prefix: float = 1.0
    token_agree: float = 1.0
    identical: float = 1.0
    saved: float = 0.0  # %
    top1_kept: float = 1.0
    mass_kept: float = 1.0
    rerouted_share: float = 0.0  # re-routed (layer, token) / all decode (layer, token)
    saved_same_logits: float = 0.0  # % saved against plain top-k of the same router logits
    graphs: int = 0
    seconds: float = 0.0


def make_row(batch: int, setting: Setting, run: Run, exact: Run | None) -> Row:
    n = run.correct.numel()
    acc = run.correct.double().mean().item()
    bpb = run.nll.double().mean().item() / math.log(2)
    distinct = sum(run.distinct) / len(run.distinct)
    row = Row(batch, setting.name, setting.pairs, n, acc, binomial_se(acc, n), bpb, distinct,
              graphs=run.graphs, seconds=run.seconds)
    if exact is None:
        return row
    row.d_acc, row.d_acc_se = (100 * v for v in paired_delta(run.correct, exact.correct))
    row.d_bpb, row.d_bpb_se = (v / math.log(2) for v in paired_delta(run.nll, exact.nll))
    row.prefix, row.token_agree, row.identical = greedy_agreement(run.greedy, exact.greedy)
    exact_distinct = sum(exact.distinct) / len(exact.distinct)
    row.saved = 100 * (1 - distinct / exact_distinct)
    row.rerouted_share = run.rerouted / run.routed if run.routed else 0.0
    if run.plain_distinct:  # plain top-k of the very logits lynx re-routed, same steps
        row.saved_same_logits = 100 * (1 - distinct / (sum(run.plain_distinct) / len(run.plain_distinct)))
    row.top1_kept = run.top1_kept / run.rerouted if run.rerouted else 1.0
    row.mass_kept = run.mass_kept / run.rerouted if run.rerouted else 1.0
    return row


# --- outputs -----------------------------------------------------------------------------

def _pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    head = ["B", "setting", "(alpha, beta)", "tokens", "next-byte acc % (±SE)", "Δacc pts (±SE)", "bits/byte",
            "Δbpb (±SE)", "greedy prefix %", "greedy token agree %", "greedy identical %",
            "distinct experts / layer / step", "experts saved %", "top-1 kept %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        exact = r.setting == "exact"
        cells = [r.batch, r.setting, r.pairs, r.tokens, f"{_pct(r.acc, 2)} ± {_pct(r.acc_se, 2)}",
                 "-" if exact else f"{r.d_acc:+.2f} ± {r.d_acc_se:.2f}", f"{r.bpb:.4f}",
                 "-" if exact else f"{r.d_bpb:+.4f} ± {r.d_bpb_se:.4f}",
                 "-" if exact else _pct(r.prefix), "-" if exact else _pct(r.token_agree),
                 "-" if exact else _pct(r.identical), f"{r.distinct:.2f}",
                 "-" if exact else f"{r.saved:.1f}", "-" if exact else _pct(r.top1_kept, 2)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    names = list(Row.__dataclass_fields__)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for r in rows:
            writer.writerow([getattr(r, k) if not isinstance(getattr(r, k), float) else f"{getattr(r, k):.8g}"
                             for k in names])


def _label(row: Row) -> str:
    return row.setting if row.pairs in row.setting else f"{row.setting} {row.pairs}"


def _lower(row: Row) -> float:
    """Lower end of the 95% interval of the accuracy change (points)."""
    return row.d_acc - 1.96 * row.d_acc_se


def verdict(rows: list[Row]) -> tuple[bool | None, str]:
    """Met when some setting at B = 16 saves >= 30% with Δacc >= -1 point; 'clearly' when the
    lower end of its 95% interval is also above -1 point."""
    at_target = [r for r in rows if r.batch == TARGET_B and r.setting != "exact"]
    if not at_target:
        return None, f"B = {TARGET_B} was not run: no verdict on the target."

    def describe(r: Row) -> str:
        return (f"{_label(r)}: {r.saved:.1f}% saved, Δacc {r.d_acc:+.2f} ± {r.d_acc_se:.2f} points "
                f"(95% interval down to {_lower(r):+.2f})")

    ok = [r for r in at_target if r.saved >= TARGET_SAVED and r.d_acc >= -TARGET_LOSS]
    clear = [r for r in ok if _lower(r) >= -TARGET_LOSS]
    if ok:
        text = (f"**Target met** at B = {TARGET_B}: {len(ok)} of {len(at_target)} settings save >= "
                f"{TARGET_SAVED:g}% of the distinct experts per layer per step with at most {TARGET_LOSS:g} point "
                f"of next-byte accuracy lost (point estimate), {len(clear)} of them with the whole 95% interval "
                f"inside the bound.")
        if clear:
            text += f" Most saving clearly inside: {describe(max(clear, key=lambda r: r.saved))}."
        best = max(ok, key=lambda r: r.saved)
        if not clear or best is not max(clear, key=lambda r: r.saved):
            text += f" Most saving by point estimate: {describe(best)}."
        return True, text
    within = [r for r in at_target if r.d_acc >= -TARGET_LOSS]
    text = (f"**Target not met** at B = {TARGET_B}: no setting saves >= {TARGET_SAVED:g}% of the distinct experts "
            f"within {TARGET_LOSS:g} point of next-byte accuracy.")
    if within:
        text += f" Within the bound the most saving is {describe(max(within, key=lambda r: r.saved))}."
    text += f" The most saving overall is {describe(max(at_target, key=lambda r: r.saved))}."
    return False, text


def plot(rows: list[Row], path: Path, title: str) -> None:
    batches = sorted({r.batch for r in rows})
    cols = min(3, len(batches))
    nrows = -(-len(batches) // cols)
    fig, grid = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.9 * nrows), sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(batches):]:
        ax.axis("off")
    lynx_rows = [r for r in rows if r.setting != "exact"]
    low = min([r.d_acc - r.d_acc_se for r in lynx_rows] + [-1.5])
    high = max([r.d_acc + r.d_acc_se for r in lynx_rows] + [0.5])
    for ax, batch in zip(axes, batches):
        points = sorted((r for r in lynx_rows if r.batch == batch), key=lambda r: r.saved)
        ax.axhline(-TARGET_LOSS, ls="--", c="tab:red", lw=1, label="1-point bound (paper)")
        ax.axhline(0, ls=":", c="gray", lw=0.8)
        if batch == TARGET_B:
            ax.axvline(TARGET_SAVED, ls="--", c="tab:green", lw=1, label=f"target: {TARGET_SAVED:g}% saved")
        for r in points:
            marker = "*" if r.setting.startswith("calibrated") else ("s" if r.setting.startswith("default") else "o")
            ax.errorbar(r.saved, r.d_acc, yerr=r.d_acc_se, fmt=marker, ms=9 if marker == "*" else 5, capsize=2,
                        c="tab:orange" if marker == "*" else ("tab:purple" if marker == "s" else "tab:blue"))
            label = "calibrated" if r.setting.startswith("calibrated") else r.setting
            if batch > 1:
                ax.annotate(label, (r.saved, r.d_acc), textcoords="offset points", xytext=(3, 3), fontsize=6)
        if batch == 1 and points:
            ax.annotate("every setting: one token per step\nis never re-routed", (0, 0), textcoords="offset points",
                        xytext=(8, 8), fontsize=7)
        ax.set_title(f"B = {batch}", fontsize=10)
        ax.set_xlabel("distinct experts saved (%)")
        ax.set_ylim(low - 0.3, high + 0.3)
        ax.set_xlim(min([0] + [r.saved for r in points]) - 2, max([10] + [r.saved for r in points]) + 5)
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("next-byte accuracy change (points)")
    axes[0].legend(fontsize=7, loc="lower left")
    if TARGET_B in batches:
        axes[batches.index(TARGET_B)].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- calibration and checks --------------------------------------------------------------

def run_calibration(model, model_dir: Path, args):
    windows = heldout_windows(model_dir, args.calib_batches * TARGET_B, args.calib_length, args.seed + 1)
    cal = lynx_compile.calibrate(model, list(windows.split(TARGET_B)), start_position=args.calib_start,
                                 progress=True)
    torch._dynamo.reset()
    return cal


def default_pairs(model, windows: torch.Tensor) -> dict[str, tuple]:
    """The (alpha, beta) lynx uses by default, per layer, from its report."""
    torch._dynamo.reset()
    reports = []
    with lynx_compile.collect_reports() as collected:
        forward = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
        forward(input_ids=windows[:2, :8], use_cache=False)
        reports = list(collected)
    torch._dynamo.reset()
    pairs = {}
    for report in reports:
        pairs.update(layer_pairs(report))
    return pairs


def check_exact(model, windows: torch.Tensor, prefill: int, steps: int = 8) -> float:
    """Max |logit difference| between the uncompiled model and lynx policy='off' on a few decode steps."""
    x = windows[:4]
    out = []
    for forward in (model.forward, compile_forward(model, Setting("exact", {"policy": "off"}))):
        cache = make_cache(model, x.shape[0], prefill + steps)
        logits = [_prefill(forward, cache, x[:, :prefill]).logits[:, -1]]
        for s in range(steps - 1):
            pos = prefill + s
            logits.append(_decode(forward, cache, x[:, pos:pos + 1], pos).logits[:, -1])
        out.append(torch.stack(logits))
    torch._dynamo.reset()
    return (out[0] - out[1]).abs().max().item()


def check_cache(model, windows: torch.Tensor, prefill: int, steps: int, exact: Run) -> tuple[float, float]:
    """The KV-cache decode loop against one uncompiled full forward without a cache (plain routing):
    (share of decode positions with the same argmax, max |nll difference| in nats)."""
    same, diff = [], 0.0
    for x in windows.split(8):
        logits = model(input_ids=x[:, :prefill + steps], use_cache=False).logits[:, prefill:prefill + steps].float()
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, x[:, prefill + 1:prefill + steps + 1, None])[..., 0]
        same.append(logp.argmax(-1))
        rows = slice(len(same) * 8 - 8, len(same) * 8)
        diff = max(diff, (nll - exact.nll[rows]).abs().max().item())
    return (torch.cat(same) == exact.pred).double().mean().item(), diff


# --- main --------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHIPPED), help="model directory (default: the shipped model)")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="comma-separated 'default' and alpha:beta pairs (beta 'none' = no clamp)")
    ap.add_argument("--no-calibrate", action="store_true", help="skip the calibrated per-layer setting")
    ap.add_argument("--prefill", type=int, default=128, help="prefill bytes P")
    ap.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps per sequence")
    ap.add_argument("--seqs", type=int, default=64, help="sequences per B (a multiple of every B)")
    ap.add_argument("--seqs-b1", type=int, default=8, help="sequences at B = 1 (lynx never re-routes there)")
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--greedy-seqs", type=int, default=32)
    ap.add_argument("--calib-batches", type=int, default=8, help="calibration: B=16 windows x this many")
    ap.add_argument("--calib-length", type=int, default=96)
    ap.add_argument("--calib-start", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small decode batches: 1 is fastest)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="smoke run: B in {1, 4, 16}, two settings, short sequences")
    ap.add_argument("--render", action="store_true",
                    help="only rebuild quality.md and quality.png from --out's quality.csv and quality.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.settings = "1,4,16", "default,1:1"
        args.prefill, args.steps, args.seqs, args.seqs_b1 = 32, 24, 16, 2
        args.greedy_tokens, args.greedy_seqs = 16, 16
        args.calib_batches, args.calib_length, args.calib_start = 2, 48, 16
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--pareto" in argv:  # lynx, OEA and XShare swept on this script's data and decode loop
        import pareto

        return pareto.main([a for a in argv if a != "--pareto"])
    args = parse_args(argv)
    if args.render:
        print(render(args.out))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for b in batches:
        if b > 1 and (args.seqs % b or args.greedy_seqs % b):
            raise SystemExit(f"--seqs ({args.seqs}) and --greedy-seqs ({args.greedy_seqs}) must be multiples of B={b}")
    settings = parse_settings(args.settings)
    t0 = time.perf_counter()
    windows = heldout_windows(model_dir, args.seqs, args.prefill + args.steps + 1, args.seed)
    greedy_prompts = windows[:args.greedy_seqs, :args.prefill]
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    description = (f"{model_dir.name}: {cfg.model_type}, {cfg.num_hidden_layers} layers, E={cfg.num_experts}, "
                   f"k={cfg.num_experts_per_tok}")
    print(description, flush=True)

    with torch.no_grad():
        exact_diff = check_exact(model, windows, args.prefill)
        print(f"uncompiled vs lynx policy='off': max |logit diff| {exact_diff:.2e} over 8 steps", flush=True)
        defaults = default_pairs(model, windows)
        for s in settings:
            if s.name == "default":
                s.pairs = describe_pairs(defaults)
                s.name = "default"
            else:
                s.pairs = s.name
        # the default may coincide with a listed pair: run it once, say so in its name
        for s in list(settings):
            if s.name != "default" and s.pairs == next((d.pairs for d in settings if d.name == "default"), None):
                settings.remove(s)
                for d in settings:
                    if d.name == "default":
                        d.name = f"default = {s.name}"
        calibration = None
        if not args.no_calibrate:
            calibration = run_calibration(model, model_dir, args)
            (args.out / "calibration.md").write_text(str(calibration))
            cal_pairs = dict(calibration.layer_settings)  # beta None: no clamp
            settings.append(Setting("calibrated", {"policy": "lynx", "layer_settings": cal_pairs},
                                    describe_pairs(cal_pairs)))
            print("calibrated layer_settings =", calibration.layer_settings, flush=True)
        exact = Setting("exact", {"policy": "off"}, "plain top-k")
        configs = [exact] + settings

        def seqs_for(b):
            return min(args.seqs_b1, args.seqs) if b == 1 else args.seqs

        def greedy_for(b):
            return min(seqs_for(b), args.greedy_seqs)

        total = sum(len(configs) * (seqs_for(b) // b * args.steps + greedy_for(b) // b * (args.greedy_tokens - 1))
                    for b in batches)
        rows: list[Row] = []
        exact_runs = {}
        bar = tqdm(total=total, desc="decode steps", unit="step", mininterval=2)
        for b in batches:
            win = windows[:seqs_for(b)]
            prompts = greedy_prompts[:greedy_for(b)]
            runs = {}
            for setting in configs:
                bar.set_postfix_str(f"B={b} {setting.name}")
                runs[setting.name] = run_config(model, setting, win, prompts, b, args.prefill, args.steps,
                                                args.greedy_tokens, bar)
                row = make_row(b, setting, runs[setting.name], None if setting.exact else runs["exact"])
                if setting.exact:
                    exact_runs[b] = runs["exact"]
                rows.append(row)
                tqdm.write(f"B={b:>2} {setting.name:<22} acc {100 * row.acc:6.2f} Δ {row.d_acc:+.2f}±{row.d_acc_se:.2f} "
                           f"bpb {row.bpb:.4f} experts {row.distinct:5.2f} saved {row.saved:5.1f}% "
                           f"top1 kept {100 * row.top1_kept:.2f}% greedy prefix {100 * row.prefix:.1f}% "
                           f"graphs {row.graphs} ({row.seconds:.0f}s)")
        bar.close()
        b_max = max(batches)
        cache_same, cache_diff = check_cache(model, windows[:seqs_for(b_max)], args.prefill, args.steps,
                                             exact_runs[b_max])
        print(f"B={b_max} exact routing, cached decode vs one full uncompiled forward: same argmax on "
              f"{100 * cache_same:.3f}% of positions, max |nll diff| {cache_diff:.1e}", flush=True)
    elapsed = time.perf_counter() - t0

    tokens = {b: seqs_for(b) * args.steps for b in batches}
    graphs = sorted({r.graphs for r in rows})
    meta = {
        "description": description,
        "title": f"{description}; {args.steps} decode steps x {args.seqs} sequences per B",
        "intro": (
            f"Held-out stdlib files of `{model_dir}`; {args.seqs} windows (seed {args.seed}; B = 1: {seqs_for(1)}), "
            f"prefill {args.prefill} bytes, then {args.steps} teacher-forced decode steps per sequence "
            f"(tokens per B: {', '.join(f'{b}: {n}' for b, n in tokens.items())}); greedy agreement over "
            f"{args.greedy_tokens} tokens from {args.greedy_seqs} prompts (B = 1: {greedy_for(1)}). "
            f"lynx with compiler 'eager' on a StaticCache; exact = lynx policy 'off' "
            f"(max |logit diff| against the uncompiled model: {exact_diff:.1e})."),
        "greedy_tokens": args.greedy_tokens,
        "checks": (
            f"KV-cache check (B = {b_max}, exact routing): the cached decode steps and one uncompiled full forward "
            f"without a cache predict the same byte at {100 * cache_same:.3f}% of positions (max |nll diff| "
            f"{cache_diff:.1e} nats). Graphs compiled per configuration: {graphs} (prefill + decode; dynamo "
            f"reset between configurations). Run time {elapsed / 60:.1f} min."),
        "calibration": None if calibration is None else (
            f"## Calibration (lynx_compile.calibrate on {args.calib_batches} x {TARGET_B} held-out windows of "
            f"{args.calib_length} bytes drawn with seed {args.seed + 1}, positions >= {args.calib_start})\n\n"
            f"`layer_settings = {calibration.layer_settings}`\n\n{calibration}"),
    }
    write_csv(rows, args.out / "quality.csv")
    (args.out / "quality.json").write_text(json.dumps(meta, indent=1) + "\n")
    text = render(args.out)
    print()
    print(markdown_table(rows))
    print()
    print(text)
    print(f"wrote {args.out / 'quality.md'}, quality.csv, quality.png ({elapsed / 60:.1f} min)")
    return 0


def read_csv(path: Path) -> list[Row]:
    rows = []
    with path.open() as f:
        for record in csv.DictReader(f):
            values = {}
            for name, spec in Row.__dataclass_fields__.items():
                kind = spec.type if isinstance(spec.type, str) else spec.type.__name__
                values[name] = {"int": int, "float": float}.get(kind, str)(record[name])
            rows.append(Row(**values))
    return rows


def render(out: Path) -> str:
    """quality.md and quality.png from quality.csv and quality.json (``--render`` redoes just this)."""
    rows = read_csv(out / "quality.csv")
    meta = json.loads((out / "quality.json").read_text())
    _, text = verdict(rows)
    exact_accs = [f"B={r.batch}: {_pct(r.acc, 2)}" for r in rows if r.setting == "exact"]
    b1_same = all(r.d_acc == 0 and r.identical == 1 and r.saved == 0 for r in rows if r.batch == 1)
    g = meta["greedy_tokens"]
    md = [
        f"# Quality of lynx routing vs exact routing: {meta['description']}", "", meta["intro"], "", text, "",
        markdown_table(rows), "",
        "Columns. acc: next-byte accuracy of the decode steps, ± binomial SE. Δacc / Δbpb: paired "
        "difference against exact routing on the same tokens, ± cluster-robust SE (clusters: sequences). "
        f"greedy prefix: mean length of the common prefix of the exact and lynx greedy generations / {g}; "
        f"token agree: share of the {g} positions with the same token; identical: share of generations equal "
        "throughout. distinct experts: per MoE layer per decode step (lynx's experts op), mean over layers and "
        "steps; saved: 1 - lynx / exact. top-1 kept: share of re-routed (layer, token) whose top-1 expert under "
        "exact routing of the same router logits is among lynx's experts. quality.csv also has mass kept, the "
        "share of (layer, token) re-routed, and the saving against plain top-k of the same logits.",
        "",
        f"Checks: exact-routing accuracy per B (B >= 2: the same windows): {', '.join(exact_accs)}. "
        f"B = 1 rows equal exact routing (never re-routed): {'yes' if b1_same else 'NO'}. {meta['checks']}",
    ]
    if meta.get("calibration"):
        md += ["", meta["calibration"]]
    (out / "quality.md").write_text("\n".join(md) + "\n")
    plot(rows, out / "quality.png", meta["title"])
    return text


if __name__ == "__main__":
    sys.exit(main())

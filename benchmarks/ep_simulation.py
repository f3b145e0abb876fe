"""Expert parallelism, simulated: what each selection rule leaves the busiest rank to read.

Under expert parallelism (transformers' ``AllReduceEP``) rank r of R owns experts
``[r*E/R, (r+1)*E/R)`` and every rank sees the whole batch; a decode step's MoE layer waits for
the rank with the most distinct experts in use. This script measures, for batches of router
logits at real shapes, per selection rule:

  distinct   distinct experts the batch uses (all ranks together);
  rank max   distinct experts on the busiest rank (what sets the step time under EP);
  mass kept  per token, the router-score mass of the chosen experts over that of its plain top-k
             (softmax probabilities; for sigmoid routers the unbiased sigmoid scores), averaged;
  top-1 kept tokens that still use their plain top-1 expert.

Shapes: Qwen3-30B-A3B (E=128, k=8, softmax, renormalised; the authors' alpha=3, beta=2) and
DeepSeek-V3 (E=256, k=8, sigmoid + selection bias, 8 groups of which 4 (top-2 sums),
renormalised, x2.5; lynx's derived alpha=3, beta=2), over 4, 8 and 16 ranks, batch 4..64.

Routers. Logits come from the shipped model (``models/lynx-tiny-moe``, E=64, k=4): its router
logits on held-out text (teacher-forced, every position after the 8th, per layer). A synthetic
token takes one real token's logits sorted best-first (its *spread*: std, gaps, top-1 probability),
resampled to E values by quantile (the profile as a function of rank / E, so the experts within
a given gap of the best scale with E: at Qwen3's k/E = 4/64 = 8/128 the same share of a token's
experts compete for its k slots), and gives them to experts in an order drawn as
``argsort(popularity + Gumbel noise)``: a per-layer expert popularity, scaled so that plain top-k
at E=64, k=4 has the shipped model's expert-load imbalance (coefficient of variation of top-k
counts: its *skew*). Tokens of one batch are independent apart from that shared popularity (a
decode batch of unrelated sequences). DeepSeek-V3's selection bias is modelled as a small
load-balancing correction, ``-0.02 x`` the expert's standardised popularity. These are
assumptions, stated so; the header of the output table prints the synthetic routers' statistics
next to the shipped model's.

Selection rules: a dict ``SELECTORS`` of name -> ``fn(logits, router, ranks, bias) -> ids [T, k]``;
a new rule drops in there. "lynx ep_ranks=R" is lynx with the expert-parallel cap
(``select_experts(..., ep_ranks=R)``, ``lynx_compile/policies/ep_cap.py``): the kept set holds at
most ceil(kept / R) experts per rank besides the tokens' top-1s, the least-demanded dropped first,
and tokens short of k take their best others back.

    python benchmarks/ep_simulation.py            # writes benchmarks/results/ep_simulation.{md,png}
    python benchmarks/ep_simulation.py --quick    # fewer batches (a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_model as dm  # noqa: E402

from lynx_compile import select_experts  # noqa: E402
from lynx_compile.policies.rules import RouterRule, route_plain  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SKIP_POSITIONS = 8  # the first bytes of a window have too little context to route like decode


@dataclass(frozen=True)
class Router:
    """A simulated model's router: its shape, rule (select_experts' keywords) and lynx settings."""

    name: str
    num_experts: int
    top_k: int
    alpha: float
    beta: int | None
    rule: dict = field(default_factory=dict)  # select_experts keywords except score_bias
    biased: bool = False  # a selection-only score bias (DeepSeek-V3's e_score_correction_bias)

    def router_rule(self) -> RouterRule:
        keys = ("scoring", "renormalize", "softmax_after_topk", "num_groups", "topk_groups", "group_score",
                "scaling_factor")
        defaults = dict(scoring="softmax", renormalize=True, softmax_after_topk=False, num_groups=1, topk_groups=1,
                        group_score="max", scaling_factor=1.0)
        return RouterRule(*(self.rule.get(k, defaults[k]) for k in keys))


ROUTERS = {
    "qwen3": Router("Qwen3-30B-A3B", 128, 8, 3.0, 2, dict(renormalize=True)),
    "deepseek_v3": Router("DeepSeek-V3", 256, 8, 3.0, 2, dict(
        scoring="sigmoid", renormalize=True, num_groups=8, topk_groups=4, group_score="top2_sum",
        scaling_factor=2.5), biased=True),
}
BIAS_SCALE = 0.02
TRADE_OFF_BATCHES, TRADE_OFF_RANKS = [16, 64], [8]


# --- routers with the shipped model's spread and skew -------------------------------------

def shipped_router_logits(windows: int = 16, length: int = 256) -> list[torch.Tensor]:
    """Per layer, the shipped model's router logits [tokens, 64] on held-out text."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dm.SHIPPED, dtype=torch.float32).eval()
    ids = dm._heldout_windows(dm.SHIPPED, windows, length)
    recorder = dm.RouterLogitRecorder(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        recorder.remove()
    return [x.view(ids.shape[0], ids.shape[1], -1)[:, SKIP_POSITIONS:].reshape(-1, x.shape[-1])
            for x in recorder.per_layer()]


def resample_profiles(sorted_logits: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, E0] best-first logits -> [N, num_experts], the same curve over rank / E: linear
    interpolation, and linear extrapolation past the first and last points (upsampling puts target
    ranks there; clamping would give the best few experts exactly equal logits)."""
    source = sorted_logits.shape[1]
    position = (torch.arange(num_experts, dtype=torch.float64) + 0.5) / num_experts * source - 0.5
    lo = position.floor().long().clamp(0, source - 2)
    w = (position - lo).float()
    return sorted_logits[:, lo] * (1 - w) + sorted_logits[:, lo + 1] * w


@dataclass
class SyntheticLayer:
    """One layer's router: real per-token logit profiles, a fixed expert popularity."""

    profiles: torch.Tensor  # [N, E] best-first
    popularity: torch.Tensor  # [E], standardised (mean 0, std 1)

    def sample(self, batch: int, skew: float, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, self.profiles.shape[0], (batch,), generator=generator)
        uniform = torch.rand(batch, self.profiles.shape[1], generator=generator).clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))
        order = torch.argsort(skew * self.popularity + gumbel, dim=-1, descending=True)
        logits = torch.empty(batch, self.profiles.shape[1])
        logits.scatter_(1, order, self.profiles[rows])
        return logits


def make_layers(shipped: list[torch.Tensor], num_experts: int, seed: int) -> list[SyntheticLayer]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for logits in shipped:
        profiles = resample_profiles(logits.sort(dim=-1, descending=True).values, num_experts)
        popularity = torch.randn(num_experts, generator=g)
        layers.append(SyntheticLayer(profiles, (popularity - popularity.mean()) / popularity.std()))
    return layers


def load_cv(logits: torch.Tensor, top_k: int) -> float:
    load = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=logits.shape[1]).float()
    return (load.std(correction=0) / load.mean()).item()


def calibrate_skew(shipped: list[torch.Tensor], top_k: int, tokens: int = 4096, seed: int = 0) -> tuple[float, float]:
    """The popularity scale at which plain top-k over the shipped model's E has its mean load CV."""
    target = sum(load_cv(x, top_k) for x in shipped) / len(shipped)
    layers = make_layers(shipped, shipped[0].shape[1], seed)

    def synthetic_cv(skew: float) -> float:
        g = torch.Generator().manual_seed(seed + 1)
        return sum(load_cv(layer.sample(tokens, skew, g), top_k) for layer in layers) / len(layers)

    lo, hi = 0.0, 4.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if synthetic_cv(mid) < target else (lo, mid)
    return (lo + hi) / 2, target


def sample_layers(layers: list[SyntheticLayer], skew: float, tokens: int = 4096) -> list[torch.Tensor]:
    """Many tokens of every layer at once, for the routers' statistics."""
    return [layer.sample(tokens, skew, torch.Generator().manual_seed(9)) for layer in layers]


def score_bias(router: Router, layer: SyntheticLayer) -> torch.Tensor | None:
    return -BIAS_SCALE * layer.popularity if router.biased else None


# --- selection rules ----------------------------------------------------------------------

Selector = Callable[[torch.Tensor, Router, int, "torch.Tensor | None"], torch.Tensor]


def plain(logits, router, ranks, bias):
    return route_plain(logits, router.top_k, router.router_rule(), bias)[1]


def lynx(logits, router, ranks, bias):
    return select_experts(logits, router.top_k, alpha=router.alpha, beta=router.beta, score_bias=bias, **router.rule)[1]


def lynx_ep(logits, router, ranks, bias):
    return select_experts(logits, router.top_k, alpha=router.alpha, beta=router.beta, score_bias=bias,
                          ep_ranks=ranks, **router.rule)[1]


SELECTORS: dict[str, Selector] = {"plain top-k": plain, "lynx": lynx, "lynx ep_ranks=R": lynx_ep}
# The trade-off section: is the cap better than plain lynx made more aggressive, at the same mass kept?
TRADE_OFF: dict[str, Selector] = {
    f"lynx alpha={a:g}": (lambda a: lambda logits, router, ranks, bias: lynx(
        logits, dataclasses.replace(router, alpha=a), ranks, bias))(a) for a in (4.0, 5.0, 6.0)}
RANK_INDEPENDENT = {"plain top-k", "lynx", "lynx alpha=4", "lynx alpha=5", "lynx alpha=6"}  # once per batch


# --- metrics ------------------------------------------------------------------------------

def metrics(ids: torch.Tensor, plain_ids: torch.Tensor, logits: torch.Tensor, router: Router, ranks: int) -> dict:
    experts = ids.unique()
    per_rank = torch.bincount(experts // (router.num_experts // ranks), minlength=ranks)
    scores = logits.softmax(-1) if router.router_rule().scoring == "softmax" else logits.sigmoid()
    mass = (scores.gather(1, ids).sum(-1) / scores.gather(1, plain_ids).sum(-1)).mean().item()
    top1 = (ids == plain_ids[:, :1]).any(-1).float().mean().item()
    return dict(distinct=experts.numel(), rank_max=int(per_rank.max()), mass=mass, top1=top1)


def simulate(router: Router, layers: list[SyntheticLayer], skew: float, batches: list[int], ranks: list[int],
             trials: int, seed: int, progress: tqdm, selectors: dict[str, Selector]) -> list[dict]:
    rows = []
    for batch in batches:
        totals: dict[tuple[str, int], list[dict]] = {}
        g = torch.Generator().manual_seed(seed + batch)
        for layer in layers:
            bias = score_bias(router, layer)
            for _ in range(trials):
                logits = layer.sample(batch, skew, g)
                plain_ids = plain(logits, router, 1, bias)
                cached = {name: selectors[name](logits, router, 1, bias) for name in RANK_INDEPENDENT if name in selectors}
                for r in ranks:
                    for name, select in selectors.items():
                        ids = cached[name] if name in cached else select(logits, router, r, bias)
                        totals.setdefault((name, r), []).append(metrics(ids, plain_ids, logits, router, r))
                progress.update(1)
        for (name, r), values in totals.items():
            mean = {key: sum(v[key] for v in values) / len(values) for key in values[0]}
            rows.append(dict(model=router.name, ranks=r, batch=batch, selector=name, **mean))
    return rows


# --- output -------------------------------------------------------------------------------

def router_summary(logits_per_layer: list[torch.Tensor], top_k: int) -> str:
    stats = dm.RouterStats.from_logits("", logits_per_layer, top_k)
    gaps = [sum(g[i] for g in stats.gaps) / len(stats.gaps) for i in range(len(stats.gaps[0]))]
    return (f"logit std {stats.mean('logit_std'):.3f}, top-1 prob {stats.mean('top1_prob'):.3f}, "
            f"top-{top_k} mass {stats.mean('topk_mass'):.3f}, load CV {stats.mean('load_cv'):.3f}, "
            f"best minus 2nd/4th/8th {', '.join(f'{x:.2f}' for x in gaps)}")


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | ranks | batch | selector | distinct experts | rank max | mass kept | top-1 kept |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['ranks']} | {row['batch']} | {row['selector']} | {row['distinct']:.1f} "
                     f"| {row['rank_max']:.2f} | {100 * row['mass']:.1f}% | {100 * row['top1']:.1f}% |")
    return lines


def write_markdown(path: Path, rows: list[dict], trade_off: list[dict], header: list[str]) -> None:
    lines = ["# Expert parallelism, simulated", "", *header, "", *table(rows)]
    if trade_off:
        lines += ["", "## At equal mass kept: a rank cap, or a more aggressive lynx?", "",
                  "The same batches; lynx at the model's alpha (3) with a per-rank cap of ceil(kept / R) + slack, "
                  "against lynx alone at larger alpha (beta stays 2: the last bin starts 2/alpha logits below a "
                  "token's best, so fewer experts stand apart from the pooled vote and more slots re-route).", "",
                  *table(trade_off)]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], models: list[str], ranks: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selectors = list(dict.fromkeys(r["selector"] for r in rows))
    fig, axes = plt.subplots(len(models), len(ranks), figsize=(4.2 * len(ranks), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, r in enumerate(ranks):
            ax = axes[i][j]
            for k, name in enumerate(selectors):
                pts = sorted((x["batch"], x["rank_max"], x["distinct"] / r) for x in rows
                             if x["model"] == model and x["ranks"] == r and x["selector"] == name)
                color = f"C{k}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{name}: busiest rank")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=color, label=f"{name}: distinct / R")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model}, {r} ranks", fontsize=10)
            ax.set_xlabel("batch (decode tokens)")
            ax.set_ylabel("experts per rank")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Distinct experts on the busiest EP rank (solid) vs an even spread (dotted)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    parser.add_argument("--trials", type=int, default=32, help="batches per layer (4 layers) and batch size")
    parser.add_argument("--quick", action="store_true", help="8 batches per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    trials = 8 if args.quick else args.trials
    start = time.perf_counter()

    shipped = shipped_router_logits()
    shipped_k = 4
    skew, target_cv = calibrate_skew(shipped, shipped_k, seed=args.seed)
    header = [
        f"Command: `python benchmarks/ep_simulation.py{' --quick' if args.quick else ''}"
        f"{'' if args.trials == 32 or args.quick else f' --trials {args.trials}'}` "
        f"({trials} batches per layer x 4 layers per point; seed {args.seed}; torch {torch.__version__}, "
        f"python {platform.python_version()}). A simulation of routing only: nothing is timed.",
        "",
        f"- shipped model's routers ({dm.SHIPPED.name}, E=64, k=4, {shipped[0].shape[0]} held-out tokens per layer): "
        f"{router_summary(shipped, shipped_k)}",
        f"- synthetic routers at E=64, k=4 (expert popularity scale {skew:.3f}, fitted to load CV {target_cv:.3f}): "
        f"{router_summary(sample_layers(make_layers(shipped, 64, args.seed), skew), shipped_k)}",
    ]
    total = len(args.models) * (len(args.batches) + len(TRADE_OFF_BATCHES)) * 4 * trials
    rows, trade_off = [], []
    with tqdm(total=total, desc="batches", unit="batch") as progress:
        for key in args.models:
            router = ROUTERS[key]
            layers = make_layers(shipped, router.num_experts, args.seed)
            sample = sample_layers(layers, skew)
            header.append(f"- synthetic routers at {router.name} (E={router.num_experts}, k={router.top_k}): "
                          f"{router_summary(sample, router.top_k)}")
            rows += simulate(router, layers, skew, args.batches, args.ranks, trials, args.seed, progress, SELECTORS)
            trade_off += simulate(router, layers, skew, TRADE_OFF_BATCHES, TRADE_OFF_RANKS, trials, args.seed,
                                  progress, {**SELECTORS, **TRADE_OFF})
    header += ["", "Rank max: distinct experts on the busiest of R ranks (rank r owns experts [r E/R, (r+1) E/R)), "
               "the quantity an all-reduce EP layer waits for. Mass kept: router-score mass of the chosen experts "
               "over the plain top-k's, per token, averaged. Selectors: " + ", ".join(SELECTORS) + ".",
               f"Wall time {time.perf_counter() - start:.0f} s."]
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "ep_simulation.md", rows, trade_off, header)
    plot(args.out / "ep_simulation.png", rows, [ROUTERS[k].name for k in args.models], args.ranks)
    print(f"wrote {args.out / 'ep_simulation.md'} and {args.out / 'ep_simulation.png'}")


if __name__ == "__main__":
    main()

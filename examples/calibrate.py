"""Calibrate lynx's (alpha, beta) per MoE layer from router logits alone, and plot the grid.

    python examples/calibrate.py                       # the shipped model, held-out Python text
    python examples/calibrate.py --model tiny-config   # a random model built from a config

Decode batches: B windows of held-out text (files the shipped model never trained on), each
position past --start one decode-shaped step of B tokens. Prints the calibration table and
saves out/calibration.png: per layer, distinct experts per decode step against routing mass
kept for every (alpha, beta) of the grid, with the bound, plain top-k, lynx's (k, E) default
and the chosen point marked. Use the result as

    torch.compile(model.forward, backend="lynx", options={"layer_settings": cal.layer_settings})
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from demo_model import heldout_sources, load_model, make_prompts  # noqa: E402

import lynx_compile  # noqa: E402
from lynx_compile.calibrate import MAX_MASS_LOSS, MIN_TOP1_KEPT, Calibration  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out"


def heldout_windows(model, tokenizer, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens from random places in held-out files."""
    rng = random.Random(seed)
    sources = heldout_sources(Path(model.name_or_path))
    rng.shuffle(sources)
    rows = []
    for path in sources * 4:  # several windows per file if there are few files
        text = path.read_bytes()
        if len(text) < 4 * length:
            continue
        start = rng.randrange(len(text) - 2 * length)
        snippet = text[start:start + 2 * length]
        if not snippet.isascii():
            continue
        ids = tokenizer(snippet.decode(), add_special_tokens=False).input_ids[:length]
        if len(ids) == length:
            rows.append(ids)
        if len(rows) == count:
            return torch.tensor(rows)
    raise RuntimeError(f"only {len(rows)} held-out windows of {length} tokens")


def decode_batches(model, tokenizer, batch: int, length: int, count: int, seed: int) -> list[torch.Tensor]:
    if tokenizer is None:  # a model from a config has no text: make_prompts' random tokens
        prompts, _ = make_prompts(model, None, batch * count, length)
    else:
        prompts = heldout_windows(model, tokenizer, batch * count, length, seed)
    return list(prompts.split(batch))


def plot(cal: Calibration, path: Path, title: str) -> None:
    cols = min(4, len(cal.layers))
    rows = -(-len(cal.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, cal.layers):
        for feasible, style in ((False, dict(c="lightgray", label="over the bound")),
                                (True, dict(c="tab:blue", label="within the bound"))):
            pts = [c for c in layer.grid if c.feasible == feasible]
            ax.scatter([c.distinct for c in pts], [c.mass_kept for c in pts], s=18, **style)
        ax.scatter([layer.default.distinct], [layer.default.mass_kept], marker="x", c="tab:orange", s=60,
                   label=f"default {_pair(layer.default)}")
        ax.scatter([layer.chosen.distinct], [layer.chosen.mass_kept], marker="*", c="tab:red", s=180,
                   label=f"chosen {_pair(layer.chosen)}", zorder=3)
        ax.axhline(1 - cal.bound.max_mass_loss, ls="--", c="gray", lw=0.8)
        ax.axvline(layer.plain_distinct, ls=":", c="black", lw=0.8, label="plain top-k")
        ax.set_title(f"{layer.module}  (k={layer.top_k}, E={layer.num_experts})", fontsize=9)
        ax.set_xlabel("distinct experts per decode step")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("routing mass kept")
    for ax in list(axes.flat)[len(cal.layers):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pair(c) -> str:
    return f"({c.alpha:g}, {'none' if c.beta is None else c.beta})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory or 'tiny-config' (default: shipped)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per decode step")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--length", type=int, default=48, help="tokens per window")
    ap.add_argument("--start", type=int, default=16, help="skip the first positions of each window")
    ap.add_argument("--max-mass-loss", type=float, default=MAX_MASS_LOSS)
    ap.add_argument("--min-top1-kept", type=float, default=MIN_TOP1_KEPT)
    ap.add_argument("--max-weight-shift", type=float, default=None, help="optional extra bound (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=OUT / "calibration.png")
    args = ap.parse_args()

    torch.manual_seed(args.seed)  # a model from a config is random: make it the same each run
    model, tokenizer, description = load_model(args.model)
    batches = decode_batches(model, tokenizer, args.batch, args.length, args.batches, args.seed)
    steps = len(batches) * (args.length - args.start)
    print(f"{description}: {steps} decode steps of B={args.batch} "
          f"({len(batches)} batches x positions {args.start}..{args.length - 1})")
    cal = lynx_compile.calibrate(model, batches, start_position=args.start, max_mass_loss=args.max_mass_loss,
                                 min_top1_kept=args.min_top1_kept, max_weight_shift=args.max_weight_shift,
                                 progress=True)
    print()
    print(cal)
    print("layer_settings =", cal.layer_settings)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(cal, args.plot, f"{description}; B={args.batch}, {steps} steps")
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()

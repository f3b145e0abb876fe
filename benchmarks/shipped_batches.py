"""Decode tokens/s of the shipped model at every batch size: Inductor vs lynx off vs lynx on.

    .venv/bin/python benchmarks/shipped_batches.py --out benchmarks/results/shipped_batches   # ~6 min
    .venv/bin/python benchmarks/shipped_batches.py --batches 1,16 --reps 2                     # smoke run

The shipped model (models/lynx-tiny-moe, fp32) decodes held-out Python source on a static cache,
one new token per sequence. Its experts fit in the CPU caches, so its decode step costs the ops'
overheads, not the bytes of experts read: this is the overheads table of the issue "never slower
than Inductor" (lynx off >= 0.97x Inductor at every batch, lynx on >= 1.0x at batch 1 and faster
from batch 4); ``decode.py`` is the memory-bound one.

Timing as in ``decode.py`` (its helpers): every backend gets its own cache, filled by the same
eager prefill; one decode step of each backend in turn, the order rotating every step; medians
over all timed steps of all repetitions; no recompiles in the timed loop. Distinct experts per
layer per step come from an untimed run under ``capture_routing``. Writes report.md and
tokens_per_s.png to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402
import decode_model as dm  # noqa: E402

import lynx_compile  # noqa: E402

NAMES = ("inductor", "lynx off", "lynx on")


def prompts(batch: int, length: int) -> torch.Tensor:
    """``batch`` windows of held-out source (cycled where the held-out files run out)."""
    windows = dm._heldout_windows(dm.SHIPPED, batch, length)
    return windows.repeat((batch + len(windows) - 1) // len(windows), 1)[:batch]


def sweep(model, batches, prompt_len: int, steps: int, reps: int) -> list[dict]:
    specs = decode.backend_specs(1e-6)
    forwards = decode.make_forwards(model, NAMES, specs, "auto")
    top_k = model.config.num_experts_per_tok
    max_len = prompt_len + steps + 2
    rows = []
    for batch in tqdm(batches, desc="batch sizes"):
        prompt = prompts(batch, prompt_len)
        caches, first = {}, None
        for name in NAMES:
            caches[name] = decode.new_cache(model, max_len)
            first = decode.prefill(model.forward, caches[name], prompt)
        distinct = {}
        for name in NAMES:  # warm-up (compiles), then the routing of an untimed run
            decode.decode(forwards[name], caches[name], first, prompt_len, 2)
            with lynx_compile.capture_routing() as cap:
                decode.decode(forwards[name], caches[name], first, prompt_len, steps)
            distinct[name] = decode.mean(decode.routing_summary(cap, top_k)["distinct"])
        seconds = {name: [] for name in NAMES}
        with torch.compiler.set_stance("fail_on_recompile"):
            for rep in tqdm(range(reps), desc=f"  batch {batch}", leave=False):
                for _, name, step_seconds in decode.interleaved_steps(forwards, caches, NAMES, first, prompt_len,
                                                                      steps, rep):
                    seconds[name].append(step_seconds)
        tok_s = {name: batch / decode.median(seconds[name]) for name in NAMES}
        rows.append(dict(batch=batch, tok_s=tok_s, distinct=distinct))
    return rows


def markdown(rows, meta) -> str:
    base = "inductor"
    lines = [f"Command: `{meta['command']}` ({meta['minutes']:.1f} min)", "",
             f"Machine: {meta['cpu']}, {meta['threads']} threads, ISA {meta['isa']}, streaming read "
             f"{meta['read_GBps']:.1f} GB/s, load average {meta['load_start']} at start, {meta['load_end']} at end", "",
             "| batch | Inductor tok/s | lynx off tok/s (x Inductor) | lynx on tok/s (x Inductor) | "
             "distinct experts / layer / step: plain -> lynx on |", "|---|---|---|---|---|"]
    for r in rows:
        t = r["tok_s"]
        lines.append(f"| {r['batch']} | {t[base]:.0f} | {t['lynx off']:.0f} ({t['lynx off'] / t[base]:.2f}) | "
                     f"{t['lynx on']:.0f} ({t['lynx on'] / t[base]:.2f}) | "
                     f"{r['distinct']['lynx off']:.1f} -> {r['distinct']['lynx on']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["batch"] for r in rows]
    for name in NAMES:
        ax.plot(batches, [r["tok_s"][name] / r["tok_s"]["inductor"] for r in rows], marker="o", label=name)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences per decode step)")
    ax.set_ylabel("decode tokens/s, x Inductor")
    ax.set_title("lynx-tiny-moe (shipped), fp32: decode speed against Inductor")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmarks/results/shipped_batches")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dm.SHIPPED, dtype=torch.float32).eval()
    machine = dm.machine_info(args.threads)
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), cpu=machine["cpu"], threads=args.threads,
                isa=torch.backends.cpu.get_cpu_capability(), load_start=machine["loadavg"],
                read_GBps=dm.streaming_read(torch.randn(64 * 2**20)))
    with torch.no_grad():
        rows = sweep(model, [int(b) for b in args.batches.split(",")], args.prompt_len, args.steps, args.reps)
    meta.update(minutes=(time.perf_counter() - start) / 60, load_end=dm._loadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, meta)
    (out / "report.md").write_text(text)
    plot(rows, out / "tokens_per_s.png")
    print(text)
    print(f"wrote {out}/report.md, tokens_per_s.png")


if __name__ == "__main__":
    main()

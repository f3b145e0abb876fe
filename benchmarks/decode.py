#!/usr/bin/env python
"""Decode-step benchmark: eager vs Inductor vs lynx (selector off / on) on a memory-bound MoE model.

    .venv/bin/python benchmarks/decode.py --quick        # smoke run, tiny shapes (2-3 min)
    .venv/bin/python benchmarks/decode.py                # OLMoE-1B-7B MoE shape, batch 1..64
    .venv/bin/python benchmarks/decode.py --shape qwen3  # Qwen3-30B-A3B MoE shape
    .venv/bin/python benchmarks/decode.py --shape llama4 --dtype fp32 --layers 1 --batches 1,4,16 \
        --prompt-len 4 --compile-batch 1 --reps 1 --steps 3 --warmup-steps 1 --warm-compile
                                                         # Llama-4 Scout MoE shape, 8 GB per layer
    (fp32 for Llama-4 on CPUs without native bf16 GEMM: there eager's bf16 x @ W with W stored
    [H, 2I], as transformers' Llama-4 experts are, measured 0.13 GB/s against 4.5 GB/s for the
    same bytes as x @ W.T, so an eager bf16 decode step took minutes)

The default run takes about 7 minutes on 2 cores (about 2 of them compiling: four cold
Inductor compiles); --quick about 1 minute with a warm Inductor cache, 2-3 minutes cold.

On a machine shared with other work, set OMP_WAIT_POLICY=PASSIVE (OpenMP threads that spin
while descheduled made every backend up to 5x slower here); on a quiet machine leave it unset.

The model is built from a config (``decode_model.py``): the MoE layers of a real model (hidden
size, expert size, E, k, router rule) with a few layers, small attention and vocabulary, in
bf16, its routers scaled to the logit spread of a trained router. Its expert weights are far
larger than the CPU caches, so a decode step streams the experts it uses from memory, as on a GPU.

What is timed: greedy decode steps on a static cache, one new token per sequence. For each
batch size every backend gets its own cache, filled by the same eager prefill; each repetition
rewinds the caches and decodes the same ``--steps`` positions from the same first token, so
repetitions are the same work. Backends are interleaved step by step (one decode step of each
backend in turn, the order rotating every step), so a burst of other load disturbs all
backends alike; the tables report medians over all timed steps.

Backends:
  eager          the model's forward (transformers' grouped_mm experts path)
  inductor       torch.compile(forward) with the default backend
  lynx off       backend="lynx", policy "off": plain routing, lynx's CPU experts op, Inductor
  lynx on        backend="lynx", policy "lynx" with the model's default (alpha, beta)
  lynx keep      backend="lynx", policy "lynx", alpha=--keep-alpha (1e-6): every expert falls in
                 bin 0, so the selector runs but keeps the plain top-k (verified per step);
                 lynx keep vs lynx off is the selector's own cost

Also measured: distinct experts per MoE layer per decode step (eager: forward pre-hooks on the
experts; lynx: ``capture_routing``), expert bytes read per step, each compiled backend's
compile time (first prefill + first decode call at --compile-batch, each backend in a fresh
Inductor cache), and the machine. Writes summary.csv, steps.csv, report.md, results.json and
two PNGs to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_model as dm  # noqa: E402
import decode_report  # noqa: E402

import lynx_compile  # noqa: E402

# transformers' _can_use_grouped_mm calls an lru_cache'd version check under dynamo (harmless)
warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function")

ALL_BACKENDS = ("eager", "inductor", "lynx off", "lynx on", "lynx keep")


def backend_specs(keep_alpha: float) -> dict:
    """name -> (torch.compile backend or None for eager, options)."""
    return {
        "eager": (None, None),
        "inductor": ("inductor", None),
        "lynx off": ("lynx", {"policy": "off"}),
        "lynx on": ("lynx", {"policy": "lynx"}),
        "lynx keep": ("lynx", {"policy": "lynx", "alpha": keep_alpha}),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(dm.SHAPES), default="olmoe",
                   help="MoE layer shape: olmoe (H 2048, I 1024, E 64, k 8, not renormalised), "
                   "qwen3 (H 2048, I 768, E 128, k 8, renormalised) or llama4 (Scout: H 5120, I 8192, "
                   "E 16, k 1, sigmoid, a shared expert; transformers runs every expert on every token)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (all MoE)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=5, help="repetitions per batch size (rotating backend order)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per backend per repetition")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps per backend per batch size")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--heads", type=int, default=4, help="attention heads (small attention)")
    p.add_argument("--head-dim", type=int, default=64, help="head size (Qwen3 shape; OLMoE uses hidden/heads)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument("--backends", default=",".join(ALL_BACKENDS), help="subset of: " + ", ".join(ALL_BACKENDS))
    p.add_argument("--dynamic", choices=("true", "auto", "false"), default="true",
                   help="torch.compile dynamic=: true (one decode graph for all batch sizes >= 2, the "
                   "default here), auto (torch's default: static first, dynamic after a change), false "
                   "(one graph per batch size)")
    p.add_argument("--compile-batch", type=int, default=16, help="batch size of the compile-time measurement")
    p.add_argument("--warm-compile", action="store_true",
                   help="measure compile time with the normal Inductor cache (default: a fresh empty "
                   "cache per backend, i.e. cold compiles)")
    p.add_argument("--keep-alpha", type=float, default=1e-6, help="alpha of 'lynx keep' (keeps plain top-k)")
    p.add_argument("--router-std", type=float, default=None,
                   help="target per-token router logit std (default: from the trained model, see decode_model.py)")
    p.add_argument("--router-model", default=str(dm.SHIPPED.relative_to(dm.REPO)),
                   help="trained model whose router spread to match (relative paths: to the repository)")
    p.add_argument("--router-match", choices=("std", "top1"), default="std",
                   help="std: match the trained router's per-token logit std (default); top1: match its mean "
                   "top-1 probability (through Gaussian logits over its E)")
    p.add_argument("--target-batch", type=int, default=16, help="batch size the verdicts are assessed at")
    p.add_argument("--out", default="out/decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: hidden {dm.QUICK_HIDDEN}, expert size {dm.QUICK_INTER} (same E, k), 2 layers, "
                   "batch 1 and 16, 1 repetition of 4 steps, warm Inductor cache")
    args = p.parse_args(argv)
    if args.quick:  # quick settings, where the command line leaves the default
        for name, value in dict(batches="1,16", reps=1, steps=4, layers=2, prompt_len=16).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        args.warm_compile = True
    args.batches = [int(b) for b in args.batches.split(",")]
    args.backends = [b.strip() for b in args.backends.split(",")]
    unknown = set(args.backends) - set(ALL_BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}; valid: {', '.join(ALL_BACKENDS)}")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return args


# --- decoding -------------------------------------------------------------------------------

def distinct_code_forward(model, name: str):
    """``model.forward`` behind a function with its own code object, so that each backend's
    compiled graphs live in their own dynamo cache (and recompile limit) and never mix."""
    def forward(**kwargs):
        return model.forward(**kwargs)

    slug = "".join(c if c.isalnum() else "_" for c in name)
    forward.__code__ = forward.__code__.replace(co_name=f"forward_{slug}")
    return forward


def make_forwards(model, names, specs, dynamic: str) -> dict:
    dyn = {"true": True, "auto": None, "false": False}[dynamic]
    forwards = {}
    for name in names:
        backend, options = specs[name]
        fn = distinct_code_forward(model, name)
        forwards[name] = fn if backend is None else torch.compile(fn, backend=backend, options=options, dynamic=dyn)
    return forwards


def new_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def prefill(forward, cache, prompt: torch.Tensor) -> torch.Tensor:
    out = forward(input_ids=prompt, cache=cache, cache_position=torch.arange(prompt.shape[1]), use_cache=True)
    return out.logits[:, -1].argmax(-1)


def rewind(cache, position: int) -> None:
    """Make the next write go to ``position``. transformers' StaticCache writes at its own
    in-place counter (``cumulative_length``), not at ``cache_position``; entries past the
    position are masked, so decoding again from ``position`` redoes the same work."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.fill_(position)


def decode(forward, cache, first: torch.Tensor, start: int, steps: int):
    """``steps`` greedy decode steps from position ``start``: (seconds per step, tokens [B, steps])."""
    rewind(cache, start)
    token, times, tokens = first, [], []
    positions = [torch.tensor([start + s]) for s in range(steps)]
    for s in range(steps):
        t0 = time.perf_counter()
        out = forward(input_ids=token[:, None], cache=cache, cache_position=positions[s], use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    return times, torch.stack(tokens, dim=1)


def interleaved_steps(forwards, caches, names, first: torch.Tensor, start: int, steps: int, rep: int):
    """One timed repetition: ``steps`` decode steps from ``start`` with one step of every backend
    in turn, the order rotating every step (so a burst of other load hits all backends alike).
    Yields ``(step, backend, seconds)``."""
    names = list(names)
    tokens = dict.fromkeys(names, first)
    for name in names:
        rewind(caches[name], start)
    for step in range(steps):
        position = torch.tensor([start + step])
        shift = (rep + step) % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            out = forwards[name](input_ids=tokens[name][:, None], cache=caches[name], cache_position=position,
                                 use_cache=True)
            tokens[name] = out.logits[:, -1].argmax(-1)
            yield step, name, time.perf_counter() - t0


class ExpertsInputCounter:
    """Distinct experts per experts-module call, from the experts' inputs (eager runs)."""

    def __init__(self, model):
        self.counts: list[int] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in dm.experts_modules(model)]

    def _hook(self, module, args):
        if len(args) < 2:  # dense experts (Llama-4): every expert runs on every token
            self.counts.append(int(module.num_experts))
        else:
            self.counts.append(int(args[1].unique().numel()))

    def remove(self):
        for h in self.handles:
            h.remove()


def routing_summary(cap, top_k: int) -> dict:
    """From a lynx capture of decode steps: distinct experts read, and for the selector's calls
    the plain top-k of the same logits (distinct, mass kept, top-1 kept, tokens that differ)."""
    out = dict(distinct=cap.distinct_experts(), plain_distinct=[], mass_kept=[], top1_kept=[],
               tokens_rerouted=0, tokens=0, selector_calls=0)
    for event in cap.routing:
        if not event.rerouted:
            continue
        out["selector_calls"] += 1
        logits = event.logits.float()
        probs = logits.softmax(-1)
        top = logits.topk(top_k, dim=-1)
        out["plain_distinct"].append(int(top.indices.unique().numel()))
        out["mass_kept"].append((probs.gather(1, event.ids).sum() / probs.gather(1, top.indices).sum()).item())
        # Tie-aware (bf16 router logits often tie): a token keeps its plain routing when its
        # experts' logits are its k largest values, and keeps its top-1 when one of its experts
        # has its largest logit.
        chosen = logits.gather(1, event.ids)
        same = (chosen.sort(-1, descending=True).values == top.values).all(-1)
        out["top1_kept"].append((chosen.max(-1).values == top.values[:, 0]).float().mean().item())
        out["tokens_rerouted"] += int((~same).sum())
        out["tokens"] += int(same.numel())
    return out


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# --- compile time -----------------------------------------------------------------------------

def one_time_setup(model, batch: int, prompt_len: int) -> float:
    """Pay the compile stack's one-time costs before any backend is timed: Inductor's set-up
    (a tiny compile) and dynamo + AOTAutograd's first trace of this model (backend
    "aot_eager": no Inductor), so they are charged to no backend."""
    start = time.perf_counter()
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    fn(torch.randn(8, 8))
    forward = torch.compile(distinct_code_forward(model, "setup"), backend="aot_eager", dynamic=True)
    prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_len))
    cache = new_cache(model, prompt_len + 2)
    decode(forward, cache, prefill(forward, cache, prompt), prompt_len, 1)
    return time.perf_counter() - start


def measure_compile(name, forward, model, batch, prompt_len, max_len, cold: bool) -> dict:
    """First prefill and first decode call (they compile) and the same calls again (steady)."""
    from torch._inductor.utils import fresh_cache

    g = torch.Generator().manual_seed(123)
    prompt = torch.randint(1, model.config.vocab_size, (batch, prompt_len), generator=g)
    context = fresh_cache() if cold else contextlib.nullcontext()
    with context, lynx_compile.collect_reports() as reports:
        cache = new_cache(model, max_len)
        t0 = time.perf_counter()
        token = prefill(forward, cache, prompt)
        t1 = time.perf_counter()
        decode(forward, cache, token, prompt_len, 1)
        t2 = time.perf_counter()
        with torch.compiler.set_stance("fail_on_recompile"):
            cache = new_cache(model, max_len)
            t3 = time.perf_counter()
            token = prefill(forward, cache, prompt)
            t4 = time.perf_counter()
            decode(forward, cache, token, prompt_len, 1)
            t5 = time.perf_counter()
    prefill_compile = max(0.0, (t1 - t0) - (t4 - t3))
    decode_compile = max(0.0, (t2 - t1) - (t5 - t4))
    return dict(backend=name, batch=batch, prefill_first_s=t1 - t0, decode_first_s=t2 - t1,
                prefill_steady_s=t4 - t3, decode_steady_s=t5 - t4, prefill_compile_s=prefill_compile,
                decode_compile_s=decode_compile, compile_s=prefill_compile + decode_compile,
                cold=cold, reports=[r.to_dict() for r in reports])


def time_selector(batch, logits_list, lynx_on_row, shape, dtype, repeats: int = 30) -> dict:
    """The selector op alone on the decode logits lynx on saw, against the router's own plain
    top-k (softmax in fp32, top-k, optional renormalise, as transformers' routers do): median
    microseconds per MoE layer call."""
    matched = [m for rep in lynx_on_row["reports"] for m in rep["matched"]]
    alpha, beta = matched[0]["alpha"], matched[0]["beta"]
    k, renorm = shape.top_k, shape.norm_topk_prob
    inputs = [x.to(dtype) for x in logits_list]
    sigmoid = shape.scoring == "sigmoid"  # Llama-4: ranked by the logits, sigmoid weights (router_dense.py)

    def selector(x):
        return torch.ops.lynx.select_experts.default(x, None, None, None, k, 1, "lynx", [alpha, beta or 0.0], True,
                                                     shape.scoring, renorm and not sigmoid, False, 1, 1, "max", 1.0,
                                                     sigmoid)

    def plain(x):
        if sigmoid:
            v, i = x.topk(k, dim=-1)
            return torch.sigmoid(v.float()), i
        w, i = torch.softmax(x, dim=-1, dtype=torch.float).topk(k, dim=-1)
        return (w / w.sum(-1, keepdim=True) if renorm else w), i

    out = dict(batch=batch, calls=len(inputs), alpha=alpha, beta=beta)
    for name, fn in (("selector", selector), ("plain", plain)):
        for x in inputs[:2]:
            fn(x)
        times = []
        for r in range(repeats):
            x = inputs[r % len(inputs)]
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        out[f"{name}_us"] = 1e6 * median(times)
    return out


def stream_table(results, names, read_gbps: float) -> str:
    """Experts per layer per step and % of the streaming read bandwidth (expert bytes read per
    step / step time / the measured read bandwidth), per backend and batch size."""
    get = {(r["backend"], r["batch"]): r for r in results["rows"]}
    lines = ["batch | " + " | ".join(f"{n} experts, % stream" for n in names)]
    for b in sorted({r["batch"] for r in results["rows"]}):
        cells = [f"{get[(n, b)]['distinct_experts_per_layer']:.1f}, {100 * get[(n, b)]['expert_GBps'] / read_gbps:.0f}%"
                 if (n, b) in get else "-" for n in names]
        lines.append(f"{b} | " + " | ".join(cells))
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    run_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = dm.SHAPES[args.shape]
    specs = backend_specs(args.keep_alpha)
    names = args.backends
    compiled = [n for n in names if specs[n][0] is not None]
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), args=vars(args).copy(),
                started=time.strftime("%Y-%m-%d %H:%M:%S"), machine=dm.machine_info(args.threads))
    print(f"machine: {meta['machine']['cpu']}, {args.threads} threads, caches {meta['machine']['caches']}, "
          f"load {meta['machine']['loadavg']}")

    with torch.no_grad():
        # The model, and its routers' spread matched to a trained router's.
        t = time.perf_counter()
        sizes = dict(hidden=dm.QUICK_HIDDEN, inter=dm.QUICK_INTER) if args.quick else {}
        model = dm.build_model(shape, args.layers, dtype, args.heads, args.head_dim, args.vocab, seed=args.seed, **sizes)
        wb = dm.weight_bytes(model)
        meta["model"] = dict(shape=shape.name, family=shape.family, hidden=model.config.hidden_size,
                             expert_inter=sizes.get("inter", shape.inter), experts=shape.experts, top_k=shape.top_k,
                             norm_topk_prob=shape.norm_topk_prob, layers=args.layers, heads=args.heads,
                             vocab=args.vocab, dtype=args.dtype, quick=args.quick, bytes=wb,
                             build_s=time.perf_counter() - t)
        print(f"model: {shape.name} MoE shape{' (quick: tiny experts)' if args.quick else ''}, {args.layers} layers, "
              f"{args.dtype}; experts {wb['per_expert'] / 2**20:.2f} MiB each, {wb['per_layer'] / 2**20:.0f} MiB "
              f"per layer; other weights {wb['other'] / 2**20:.0f} MiB")
        if args.router_std is not None:
            target, how, ref_stats, ref_log = args.router_std, "given with --router-std", None, None
        else:
            target, how, ref_stats, ref_log = dm.reference_router_stats(dm.REPO / args.router_model, args.router_match)
        probe_batch, probe_len, probe_steps = shape.probe
        before, after, scales = dm.match_router_spread(model, target, probe_batch, probe_len, probe_steps)
        meta["router"] = dict(target_std=target, how=how, reference=ref_stats and ref_stats.to_dict(),
                              reference_log=ref_log and {k: ref_log[k] for k in ref_log
                                                           if k.startswith("router") or k in ("step", "experts", "top_k")},
                              before=before.to_dict(), after=after.to_dict(), scales=scales)
        print(f"routers: target logit std {target:.3f} ({how}); random init std {before.mean('logit_std'):.3f} "
              f"-> {after.mean('logit_std'):.3f}, top-1 prob {after.mean('top1_prob'):.3f}, "
              f"entropy {after.mean('entropy'):.2f} nats (uniform {torch.tensor(float(shape.experts)).log():.2f})")
        meta["machine"]["read_bandwidth_GBps"] = dm.read_bandwidth(model)
        print(f"streaming read bandwidth (one layer's experts): {meta['machine']['read_bandwidth_GBps']:.1f} GB/s")

        forwards = make_forwards(model, names, specs, args.dynamic)

        # Compile time: each compiled backend once, in a fresh Inductor cache.
        compile_rows = []
        max_len = args.prompt_len + max(args.steps, args.warmup_steps) + 1
        if compiled:
            compile_batch = args.compile_batch if args.compile_batch in args.batches else max(args.batches)
            meta["setup_s"] = one_time_setup(model, compile_batch, args.prompt_len)
            for name in tqdm(compiled, desc="compile", leave=False):
                row = measure_compile(name, forwards[name], model, compile_batch, args.prompt_len, max_len,
                                      not args.warm_compile)
                compile_rows.append(row)
                tqdm.write(f"  compile {name}: {row['compile_s']:.1f} s (prefill {row['prefill_compile_s']:.1f}, "
                           f"decode {row['decode_compile_s']:.1f})")
        meta["compile"] = compile_rows
        lynx_on = next((r for r in compile_rows if r["backend"] == "lynx on"), None)
        if lynx_on:
            for report in lynx_on["reports"]:
                for m in report["matched"]:
                    print(f"  lynx on: {m['module']}: E={m['num_experts']} k={m['top_k']} {m['rule']}, "
                          f"alpha={m['alpha']} beta={m['beta']} ({m['settings']})")

        step_rows, routing, warmups, tokens_same, selector_rows = [], {}, [], {}, []
        P = args.prompt_len
        bar = tqdm(args.batches, desc="batch sizes")
        for batch in bar:
            bar.set_postfix(batch=batch)
            g = torch.Generator().manual_seed(args.seed * 1000 + batch)
            prompt = torch.randint(1, args.vocab, (batch, args.prompt_len), generator=g)
            # One cache per backend, each filled by the same eager prefill.
            caches, first = {}, None
            for name in names:
                caches[name] = new_cache(model, max_len)
                first = prefill(model.forward, caches[name], prompt)

            # Warm-up: the first decode calls (recompiles for new shapes happen here).
            for name in names:
                t0 = time.perf_counter()
                decode(forwards[name], caches[name], first, P, args.warmup_steps)
                warmups.append(dict(backend=name, batch=batch, warmup_s=time.perf_counter() - t0))

            # Instrumented (untimed) run: distinct experts per layer per step, tokens, routing.
            counts, toks, selector_logits = {}, {}, []
            for name in names:
                if name == "eager":
                    counter = ExpertsInputCounter(model)
                    try:
                        _, toks[name] = decode(forwards[name], caches[name], first, P, args.steps)
                    finally:
                        counter.remove()
                    counts[name] = dict(distinct=counter.counts)
                elif name == "inductor":
                    _, toks[name] = decode(forwards[name], caches[name], first, P, args.steps)
                else:
                    with lynx_compile.capture_routing() as cap:
                        _, toks[name] = decode(forwards[name], caches[name], first, P, args.steps)
                    counts[name] = routing_summary(cap, shape.top_k)
                    if name == "lynx on":
                        selector_logits = [e.logits for e in cap.routing if e.rerouted]
            routing[batch] = counts
            reference = toks.get("eager", next(iter(toks.values())))
            tokens_same[batch] = {n: bool(torch.equal(t, reference)) for n, t in toks.items()}
            if selector_logits and lynx_on:
                selector_rows.append(time_selector(batch, selector_logits, lynx_on, shape, dtype))

            # Timed runs, the backends interleaved step by step; no recompiles allowed.
            with torch.compiler.set_stance("fail_on_recompile"):
                for rep in tqdm(range(args.reps), desc=f"  batch {batch} reps", leave=False):
                    for step, name, seconds in interleaved_steps(forwards, caches, names, first, P, args.steps, rep):
                        step_rows.append(dict(backend=name, batch=batch, rep=rep, step=step, seconds=seconds))
            meta["selector_op"] = selector_rows
            results = decode_report.summarise(args, meta, step_rows, routing, warmups, tokens_same, names)
            decode_report.write_all(out_dir, args, meta, results, step_rows)
            del caches

    meta["duration_s"] = time.perf_counter() - run_start
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["machine"]["loadavg_end"] = dm._loadavg()
    results = decode_report.summarise(args, meta, step_rows, routing, warmups, tokens_same, names)
    decode_report.write_all(out_dir, args, meta, results, step_rows)
    print()
    print(decode_report.console_table(results, names))
    print()
    print(stream_table(results, names, meta["machine"]["read_bandwidth_GBps"]))
    print(f"\nwrote {out_dir}/report.md, summary.csv, steps.csv, results.json, tokens_per_s.png, "
          f"distinct_experts.png ({meta['duration_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

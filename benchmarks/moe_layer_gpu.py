"""Time one MoE layer at decode on a CUDA GPU: our Triton experts against transformers'
paths, and our batch-aware selector in front of them.

For the expert shapes of Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B and gpt-oss-20b (its
interleaved, biased layout), bf16, batch 1..64, it reports microseconds per layer for
  ours        lynx's grouped_experts_triton on the model's plain top-k routing;
  grouped_mm  transformers' default experts forward (torch._grouped_mm);
  hf eager    transformers' per-expert Python loop (host-synchronising: timed eagerly);
  lynx        select_experts_triton (the release (alpha, beta)) then our experts,
plus distinct experts, MB of expert weights read, achieved GB/s, and the card's copy
bandwidth from a large device-to-device copy in the same run. Graph-capturable paths are
timed as CUDA-graph replays (what mode="reduce-overhead" runs), median over replays of
several calls each, after warmup; "eager" columns time single launches from Python. Weights
are cloned so that consecutive calls read different copies and L2 cannot serve them.

Routing model (synthetic; no checkpoints on the machine). Router logits of token t for
expert e are ``-s * log(rank_e) + c_t * n_te``: each model layer gets a random popularity
ranking of its experts, Zipf-distributed with exponent s = 1 (so softmax(bias) is
proportional to 1/rank), and each token adds Gaussian noise n ~ N(0, 1) scaled by its own
confidence c_t ~ U(0.5, 2.5) (sharp and flat routers side by side). The tables show the
distinct experts this gives next to the uniform-routing expectation E(1 - (1 - k/E)^T).

Run from the repository root: PYTHONPATH=$PWD python benchmarks/moe_layer_gpu.py --out out
``--dry-run`` runs tiny shapes on the CPU through the Triton interpreter (code paths only).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import replace




def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "out", help="folder for the tables")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU via the Triton interpreter")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new work after this")
    p.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    p.add_argument("--emulate-hf", action="store_true", help="use the emulated transformers paths")
    p.add_argument("--models", default="", help="comma-separated model names (default all)")
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer_baselines import hf_paths  # noqa: E402
from moe_layer_shapes import BATCHES, MODELS, ModelShape  # noqa: E402
from lynx_compile.kernels.triton_experts import grouped_experts_triton  # noqa: E402
from lynx_compile.kernels.triton_experts_config import default_config  # noqa: E402
from lynx_compile.kernels.triton_moe_align import align_routing  # noqa: E402
from lynx_compile.kernels.triton_select import select_experts_triton  # noqa: E402

START = time.monotonic()
DEVICE = torch.device("cpu" if ARGS.dry_run else "cuda")
DTYPE = torch.bfloat16


def elapsed() -> float:
    return time.monotonic() - START


# ---------------------------------------------------------------- inputs

class Layer:
    """One MoE layer's expert tensors in the layout experts_ref.py describes."""

    def __init__(self, shape: ModelShape, hidden: int, inter: int, seed: int):
        g = torch.Generator(DEVICE).manual_seed(seed)
        e = shape.experts

        def randn(*size, scale):
            return torch.randn(*size, generator=g, device=DEVICE, dtype=DTYPE).mul_(scale)

        self.num_experts, self.hidden_size, self.inter_size = e, hidden, inter
        self.layout, self.activation, self.activation_args = shape.layout, shape.activation, list(shape.activation_args)
        self.hf_class = shape.hf_class
        if shape.layout == "gate_up_interleaved_t":
            self.w_gate_up, self.w_down = randn(e, hidden, 2 * inter, scale=hidden ** -0.5), randn(e, inter, hidden, scale=inter ** -0.5)
        else:
            self.w_gate_up, self.w_down = randn(e, 2 * inter, hidden, scale=hidden ** -0.5), randn(e, hidden, inter, scale=inter ** -0.5)
        self.b_gate_up = randn(e, 2 * inter, scale=0.1) if shape.bias else None
        self.b_down = randn(e, hidden, scale=0.1) if shape.bias else None

    def clone(self) -> "Layer":
        other = object.__new__(Layer)
        other.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})
        return other

    def expert_bytes(self) -> int:
        per = 3 * self.hidden_size * self.inter_size + (2 * self.inter_size + self.hidden_size if self.b_gate_up is not None else 0)
        return per * self.w_gate_up.element_size()

    def ours(self, hidden, ids, weights, config=None):
        return grouped_experts_triton(hidden, ids, weights, self.w_gate_up, self.w_down, None, self.b_gate_up,
                                      self.b_down, self.activation, self.layout, self.activation_args, config=config)


def router_logits(num_tokens: int, num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(num_experts, generator=g).float() + 1
    popularity = -torch.log(rank)  # Zipf, exponent 1
    confidence = 0.5 + 2.0 * torch.rand(num_tokens, 1, generator=g)
    noise = torch.randn(num_tokens, num_experts, generator=g)
    return (popularity + confidence * noise).to(DEVICE)


def plain_route(logits, top_k, renormalize):
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# ---------------------------------------------------------------- timing

def _median_us(samples):
    return statistics.median(samples) * 1e6


def time_cpu(fns, iters=2):
    for fn in fns:
        fn()
    samples = []
    for i in range(iters):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        samples.append(time.perf_counter() - t0)
    return _median_us(samples)


def time_eager(fns, iters=30):
    """Median of single calls between CUDA events (includes Python launch gaps)."""
    if DEVICE.type == "cpu":
        return time_cpu(fns)
    for fn in fns * 2:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for i in range(iters):
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return _median_us(samples)


def time_graph(fns, calls=20, replays=15):
    """Median per-call time of a CUDA graph holding ``calls`` calls (rotating over fns)."""
    if DEVICE.type == "cpu":
        return time_cpu(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns * 2:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return _median_us(samples)


def time_graph_or_eager(fns):
    try:
        return time_graph(fns), "graph"
    except Exception as error:  # e.g. a baseline that cannot be captured
        print(f"  graph capture failed ({type(error).__name__}: {error}); timing eagerly")
        torch.cuda.synchronize()
        return time_eager(fns), "eager"


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of a large buffer: bytes read + written per second."""
    size = (1 << 20) if DEVICE.type == "cpu" else (2 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = time_eager([lambda: dst.copy_(src)], iters=10)
    return 2 * size / us / 1e3


# ---------------------------------------------------------------- one model

def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def layer_copies(shape, hidden, inter):
    """Enough weight copies that one call's reads exceed L2 several times over."""
    first = Layer(shape, hidden, inter, seed=0)
    if DEVICE.type == "cpu":
        return [first]
    smallest_read = shape.top_k * first.expert_bytes()
    layer_bytes = shape.experts * first.expert_bytes()
    free, _ = torch.cuda.mem_get_info()
    wanted = math.ceil(200e6 / smallest_read)
    allowed = max(1, int(0.4 * free // layer_bytes))
    return [first] + [first.clone() for _ in range(min(wanted, allowed, 8) - 1)]


def bench_model(shape, copy_gbps, rows):
    hidden_size, inter = (64, 48) if ARGS.dry_run else (shape.hidden, shape.inter)
    batches = (1, 2, 4) if ARGS.dry_run else BATCHES
    layers = layer_copies(shape, hidden_size, inter)
    probe = torch.randn(4, hidden_size, device=DEVICE, dtype=DTYPE)
    probe_w, probe_ids = plain_route(router_logits(4, shape.experts, 99), shape.top_k, shape.renormalize)
    hf = [hf_paths(layer, probe, probe_ids, probe_w, force_emulation=ARGS.emulate_hf) for layer in layers]
    sources = hf[0][1]
    print(f"{shape.name}: H={hidden_size} I={inter} E={shape.experts} k={shape.top_k} {shape.layout}; "
          f"{len(layers)} weight copies; transformers paths: {sources}")

    for t in batches:
        if elapsed() > ARGS.budget_s:
            print(f"  time budget reached: skipping {shape.name} T>={t}")
            return
        seed = 1000 * t + shape.experts
        hidden = torch.randn(t, hidden_size, device=DEVICE, dtype=DTYPE, generator=torch.Generator(DEVICE).manual_seed(seed))
        logits = router_logits(t, shape.experts, seed)
        weights, ids = plain_route(logits, shape.top_k, shape.renormalize)
        sel_weights, sel_ids = select_experts_triton(logits, shape.top_k, shape.alpha, shape.beta, shape.renormalize)

        ours_out = layers[0].ours(hidden, ids, weights)
        gmm_out = hf[0][0]["grouped_mm"](hidden, ids, weights)
        err = rel_err(ours_out, gmm_out)

        def run(name, layer_index, w=weights, i=ids):
            if name == "ours":
                return lambda: layers[layer_index].ours(hidden, i, w)
            return lambda: hf[layer_index][0][name](hidden, i, w)

        ours_us = time_graph([run("ours", c) for c in range(len(layers))])
        ours_eager_us = time_eager([run("ours", c) for c in range(len(layers))])
        block_m = default_config(t, shape.top_k, shape.experts, hidden_size, inter, 2, DEVICE, interpreted=ARGS.dry_run).block_m
        align_us = time_graph([lambda: align_routing(ids, shape.experts, block_m)])
        gmm_us, gmm_mode = time_graph_or_eager([run("grouped_mm", c) for c in range(len(layers))])
        gmm_eager_us = time_eager([run("grouped_mm", c) for c in range(len(layers))])
        hf_eager_us = time_eager([run("eager", c) for c in range(len(layers))], iters=10)
        route_us = time_graph([lambda: plain_route(logits, shape.top_k, shape.renormalize)])
        select_us = time_graph([lambda: select_experts_triton(logits, shape.top_k, shape.alpha, shape.beta, shape.renormalize)])
        lynx_experts_us = time_graph([run("ours", c, sel_weights, sel_ids) for c in range(len(layers))])

        def lynx_layer(c):
            def go():
                w, i = select_experts_triton(logits, shape.top_k, shape.alpha, shape.beta, shape.renormalize)
                return layers[c].ours(hidden, i, w)
            return go

        lynx_us = time_graph([lynx_layer(c) for c in range(len(layers))])

        distinct = ids.unique().numel()
        distinct_lynx = sel_ids.unique().numel()
        mb = distinct * layers[0].expert_bytes() / 1e6
        mb_lynx = distinct_lynx * layers[0].expert_bytes() / 1e6
        ours_gbps = mb / ours_us * 1e3
        rows.append(dict(
            model=shape.name, T=t, distinct_topk=distinct, distinct_lynx=distinct_lynx,
            uniform_expect=round(shape.experts * (1 - (1 - shape.top_k / shape.experts) ** t), 1),
            mb_topk=round(mb, 1), mb_lynx=round(mb_lynx, 1),
            ours_us=round(ours_us, 1), align_us=round(align_us, 1), ours_gbps=round(ours_gbps), ours_pct_copy=round(100 * ours_gbps / copy_gbps, 1),
            gmm_us=round(gmm_us, 1), gmm_gbps=round(mb / gmm_us * 1e3), hf_eager_us=round(hf_eager_us, 1),
            speedup_vs_gmm=round(gmm_us / ours_us, 2),
            ours_eager_us=round(ours_eager_us, 1), gmm_eager_us=round(gmm_eager_us, 1), gmm_timing=gmm_mode,
            route_us=round(route_us, 1), select_us=round(select_us, 1), lynx_experts_us=round(lynx_experts_us, 1),
            lynx_us=round(lynx_us, 1), select_pct=round(100 * select_us / lynx_us, 1),
            lynx_vs_gmm=round(gmm_us / lynx_us, 2), lynx_vs_ours=round(ours_us / lynx_us, 2),
            max_rel_err=f"{err:.1e}", alpha=shape.alpha, beta=shape.beta,
        ))
        r = rows[-1]
        print(f"  T={t:3d} experts {distinct:3d} (lynx {distinct_lynx:3d})  ours {r['ours_us']:8.1f} us "
              f"{r['ours_gbps']:5d} GB/s  grouped_mm {r['gmm_us']:8.1f}  eager {r['hf_eager_us']:8.1f}  "
              f"lynx {r['lynx_us']:8.1f} (select {r['select_us']:.1f})  err {err:.1e}  [{elapsed():.0f}s]")
        if err > 0.05:
            print(f"  WARNING: ours and grouped_mm disagree at T={t} (max rel err {err:.2e})")


def config_variants(config):
    yield "default", config
    yield "gate_up_n/2", replace(config, gate_up_block_n=max(16, config.gate_up_block_n // 2))
    yield "gate_up_n*2", replace(config, gate_up_block_n=min(128, config.gate_up_block_n * 2))
    yield "split*2", replace(config, split_k=config.split_k * 2)
    yield "split/2", replace(config, split_k=max(1, config.split_k // 2))
    yield "k64", replace(config, gate_up_block_k=64, down_block_k=64)
    yield "stages2", replace(config, num_stages=2)
    yield "warps8", replace(config, num_warps=8)


def sweep_model(shape, sweep_rows):
    """A few alternatives to the default block sizes at T = 1, 16, 64: data for tuning,
    after the main tables, while the time budget lasts."""
    hidden_size, inter = (64, 48) if ARGS.dry_run else (shape.hidden, shape.inter)
    layers = layer_copies(shape, hidden_size, inter)
    for t in (4,) if ARGS.dry_run else (1, 16, 64):
        seed = 1000 * t + shape.experts
        hidden = torch.randn(t, hidden_size, device=DEVICE, dtype=DTYPE)
        weights, ids = plain_route(router_logits(t, shape.experts, seed), shape.top_k, shape.renormalize)
        mb = ids.unique().numel() * layers[0].expert_bytes() / 1e6
        base = default_config(t, shape.top_k, shape.experts, hidden_size, inter, 2, DEVICE, interpreted=ARGS.dry_run)
        seen = set()
        for name, config in config_variants(base):
            if config in seen or elapsed() > ARGS.budget_s:
                continue
            seen.add(config)
            try:
                us = time_graph([lambda c=c: layers[c].ours(hidden, ids, weights, config) for c in range(len(layers))])
            except Exception as error:  # e.g. out of shared memory
                print(f"  sweep {shape.name} T={t} {name} failed: {type(error).__name__}: {str(error)[:120]}")
                if DEVICE.type == "cuda":
                    torch.cuda.synchronize()
                continue
            sweep_rows.append(dict(model=shape.name, T=t, variant=name, us=round(us, 1), gbps=round(mb / us * 1e3),
                                   **{k: v for k, v in config.__dict__.items()}))
        print(f"  sweep {shape.name} T={t}: " + ", ".join(f"{r['variant']} {r['us']}" for r in sweep_rows
                                                          if r["model"] == shape.name and r["T"] == t) + f"  [{elapsed():.0f}s]")


# ---------------------------------------------------------------- tables

MAIN_COLUMNS = [
    ("model", "model"), ("T", "T"), ("distinct_topk", "experts top-k"), ("uniform_expect", "uniform"),
    ("mb_topk", "MB read"), ("ours_us", "ours us"), ("align_us", "of which align us"), ("ours_gbps", "ours GB/s"), ("ours_pct_copy", "% copy BW"),
    ("gmm_us", "grouped_mm us"), ("hf_eager_us", "HF eager us"), ("speedup_vs_gmm", "x vs grouped_mm"),
    ("ours_eager_us", "ours eager us"), ("gmm_eager_us", "grouped_mm eager us"), ("gmm_timing", "grouped_mm timed"),
    ("max_rel_err", "rel err"),
]
LYNX_COLUMNS = [
    ("model", "model"), ("T", "T"), ("alpha", "alpha"), ("beta", "beta"), ("distinct_topk", "experts top-k"),
    ("distinct_lynx", "experts lynx"), ("mb_lynx", "MB read"), ("route_us", "top-k router us"),
    ("select_us", "selector us"), ("lynx_experts_us", "experts us"), ("lynx_us", "layer us"),
    ("select_pct", "selector %"), ("lynx_vs_ours", "x vs ours top-k"), ("lynx_vs_gmm", "x vs grouped_mm"),
]
BEST_COLUMNS = [(k, k) for k in ("model", "T", "default_us", "best", "best_us")]
SWEEP_COLUMNS = [(k, k) for k in ("model", "T", "variant", "us", "gbps", "block_m", "gate_up_block_n",
                                  "gate_up_block_k", "down_block_n", "down_block_k", "split_k", "num_warps", "num_stages")]


def markdown(rows, columns):
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def best_variants(sweep_rows):
    """Per (model, T): the default's time and the fastest variant's."""
    best = {}
    for r in sweep_rows:
        key = (r["model"], r["T"])
        entry = best.setdefault(key, dict(model=r["model"], T=r["T"], default_us="", best=r["variant"], best_us=r["us"]))
        if r["variant"] == "default":
            entry["default_us"] = r["us"]
        if r["us"] < entry["best_us"]:
            entry["best"], entry["best_us"] = r["variant"], r["us"]
    return list(best.values())


def write_tables(out_dir, header, rows, sweep_rows):
    os.makedirs(out_dir, exist_ok=True)
    for name, data in (("moe_layer.csv", rows), ("moe_layer_sweep.csv", sweep_rows)):
        if data:
            with open(os.path.join(out_dir, name), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(data[0]))
                writer.writeheader()
                writer.writerows(data)
    text = [header, "", "## Experts, plain top-k routing", "", markdown(rows, MAIN_COLUMNS), "",
            "## Lynx: batch-aware selector, then our experts", "", markdown(rows, LYNX_COLUMNS)]
    if sweep_rows:
        text += ["", "## Block-size sweep (ours, CUDA graph)", "", markdown(sweep_rows, SWEEP_COLUMNS)]
    with open(os.path.join(out_dir, "moe_layer.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    # For the terminal, whose tail is what a remote run shows: the sweep condensed, first.
    summary = ["## Block-size sweep, best variant", "", markdown(best_variants(sweep_rows), BEST_COLUMNS), ""] if sweep_rows else []
    return "\n".join(summary + text[:9])


def environment() -> str:
    import triton
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = "absent"
    device = "CPU (dry run, Triton interpreter)" if DEVICE.type == "cpu" else torch.cuda.get_device_name()
    return f"torch {torch.__version__}, triton {triton.__version__}, transformers {hf_version}, {device}"


def main():
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps()
    models = [m for m in MODELS if not ARGS.models or m.name in ARGS.models.split(",")]
    header = (f"# One MoE layer, bf16 decode\n\n{environment()}\n\n"
              f"Copy bandwidth (device-to-device, read + write): {copy_gbps:.0f} GB/s. "
              "Times are medians per layer call; 'us' columns are CUDA-graph replays unless the "
              "column says eager. Routing: Zipf(1) expert popularity + per-token noise (see script).")
    print(header)
    rows, sweep_rows = [], []
    with torch.inference_mode():
        for shape in models:
            if elapsed() > ARGS.budget_s:
                print(f"time budget reached: skipping {shape.name}")
                continue
            try:
                bench_model(shape, copy_gbps, rows)
            except torch.cuda.OutOfMemoryError as error:
                print(f"{shape.name}: out of memory ({error}); skipped")
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            write_tables(ARGS.out, header, rows, sweep_rows)  # keep partial results
        for shape in models if not ARGS.no_sweep else ():
            if elapsed() > ARGS.budget_s:
                break
            try:
                sweep_model(shape, sweep_rows)
            except torch.cuda.OutOfMemoryError as error:
                print(f"{shape.name} sweep: out of memory ({error}); skipped")
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            write_tables(ARGS.out, header, rows, sweep_rows)
    print()
    print(write_tables(ARGS.out, header, rows, sweep_rows))
    print(f"\ntotal {elapsed():.0f} s; tables in {ARGS.out}/moe_layer.md and .csv")


if __name__ == "__main__":
    main()

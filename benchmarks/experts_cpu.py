"""One MoE layer's experts on CPU at decode: lynx's op against transformers' grouped_mm experts
forward compiled by Inductor, as bytes of active experts read per second and as a share of this
machine's streaming-read bandwidth.

    .venv/bin/python benchmarks/experts_cpu.py                      # the full table (a few minutes)
    .venv/bin/python benchmarks/experts_cpu.py --shapes olmoe --dtypes bf16 --batches 1,16
    .venv/bin/python benchmarks/experts_cpu.py --crossover          # fused kernel vs grouped_mm, T up to 2048

Shapes: OLMoE-1B-7B (H 2048, I 1024, E 64, k 8), Qwen3-30B-A3B (H 2048, I 768, E 128, k 8) and the
shipped model (H 192, I 64, E 64, k 4; its experts fit in cache, so its GB/s is not a memory
number). Routing: top-k of skewed router logits (expert popularity + per-token noise), so each
token picks k distinct experts and some experts get several rows, as under a trained router.

Both sides run interleaved in one process, ``--reps`` times per row, medians reported:
- lynx: ``torch.ops.lynx.grouped_experts`` (its CPU kernel picks the fused C++ kernel or
  grouped_mm per shape; the path is printed);
- Inductor: transformers' ``grouped_mm_experts_forward`` under ``torch.compile`` (sort, histc,
  gathers compiled around ``torch._grouped_mm`` in bf16 or ``transformers::grouped_mm_fallback``
  in fp32), dynamic batch size.
Bytes read per call = distinct experts x 3*H*I x element size: what both have to read.
Streaming bandwidth = the larger of two plain reads, each timed 3 times just before and 3 times
just after the row's calls (medians): the sum of a 256 MB fp32 tensor, and the layer's own gate_up
weights read as integers (max), the same memory the experts kernels stream (for a layer that fits
in cache, the 256 MB sum alone). Per row, because a shared host's bandwidth moves within minutes
(between 30 and 67 GB/s on one machine here); not between the timed calls, because the calls
right after a 256 MB read run cold.
"% of streaming" = (bytes read / median call time) / that row's bandwidth.
Other processes on the machine lower every number; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.integrations import moe as hf_moe

import lynx_compile  # noqa: F401  (torch.ops.lynx)
from lynx_compile.kernels import experts_cpu, experts_cpu_fused

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_model import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int


SHAPES = {
    "olmoe": Shape("OLMoE-1B-7B", 2048, 1024, 64, 8),
    "qwen3": Shape("Qwen3-30B-A3B", 2048, 768, 128, 8),
    "shipped": Shape("lynx-tiny-moe (shipped)", 192, 64, 64, 4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HFExperts(torch.nn.Module):
    """The attributes transformers' grouped_mm experts forward reads."""

    def __init__(self, w_gate_up, w_down):
        super().__init__()
        self.gate_up_proj, self.down_proj = torch.nn.Parameter(w_gate_up), torch.nn.Parameter(w_down)
        self.num_experts = w_gate_up.shape[0]
        self.act_fn = torch.nn.functional.silu
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.has_post_expert_norm, self._is_expert_parallel = False, False

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden, ids, weights):
        return hf_moe.grouped_mm_experts_forward(self, hidden, ids, weights)


def routing(num_tokens, num_experts, top_k, gen):
    popularity = torch.randn(num_experts, generator=gen) * 1.5
    logits = popularity + torch.randn(num_tokens, num_experts, generator=gen) * 1.5
    weights, ids = torch.softmax(logits, -1).topk(top_k)
    return ids, weights / weights.sum(-1, keepdim=True)


def median(samples):
    return sorted(samples)[len(samples) // 2]


class Bandwidth:
    """Plain streaming reads, timed between the benchmark's calls."""

    def __init__(self, weight: torch.Tensor):
        self.big = torch.ones(64 * 2**20)  # 256 MB fp32
        self.weight = weight.view(torch.int16 if weight.element_size() == 2 else torch.int32).reshape(-1)
        self.samples = {"sum_256MB": [], "layer_weight": []}

    def sample(self, repeats: int = 3):
        for _ in range(repeats):
            for name, tensor, read in (("sum_256MB", self.big, torch.sum), ("layer_weight", self.weight, torch.max)):
                start = time.perf_counter()
                read(tensor)
                self.samples[name].append(tensor.numel() * tensor.element_size() / (time.perf_counter() - start) / 1e9)

    def take(self) -> dict:
        """The medians of the samples since the last take."""
        medians = {name: median(s) for name, s in self.samples.items()}
        self.samples = {name: [] for name in self.samples}
        return medians


def time_call(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def layer_weights(shape: Shape, dtype: torch.dtype, gen):
    w_gate_up = (torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=gen) / shape.hidden**0.5).to(dtype)
    w_down = (torch.randn(shape.experts, shape.hidden, shape.inter, generator=gen) / shape.inter**0.5).to(dtype)
    return w_gate_up, w_down


def decode_rows(shape: Shape, dtype: torch.dtype, batches, reps, gen, progress):
    w_gate_up, w_down = layer_weights(shape, dtype, gen)
    hf = torch.compile(HFExperts(w_gate_up, w_down).eval(), dynamic=True)
    expert_bytes = 3 * shape.hidden * shape.inter * w_gate_up.element_size()
    bandwidth = Bandwidth(w_gate_up)
    layer_mb = (w_gate_up.numel() + w_down.numel()) * w_gate_up.element_size() / 1e6

    def lynx(hidden, ids, weights):
        return torch.ops.lynx.grouped_experts(hidden, ids, weights, w_gate_up, w_down, None, None, None,
                                              "silu", "gate_up_concat", [])

    rows = []
    for batch in batches:
        hidden = torch.randn(batch, shape.hidden, generator=gen).to(dtype)
        ids, weights = routing(batch, shape.experts, shape.top_k, gen)
        weights = weights.to(dtype)  # transformers' routers hand the experts weights in the model's dtype
        # Bandwidth around the row, not between timed calls: on some machines the first calls
        # after a 256 MB read run cold (a few hundred us), which swamps the small shapes.
        bandwidth.sample()
        ref = hf(hidden, ids, weights)  # compiles (once per shape, dynamic batch), and warms up
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(lynx(hidden, ids, weights), ref, **tol)
        times = {"lynx": [], "inductor": []}
        for _ in range(reps):
            times["lynx"].append(time_call(lynx, hidden, ids, weights))
            times["inductor"].append(time_call(hf, hidden, ids, weights))
            progress.update(1)
        bandwidth.sample()
        bw = bandwidth.take()
        # the reference: the faster plain read, where the layer is too big for any cache
        bw["reference"] = max(bw["sum_256MB"], bw["layer_weight"]) if layer_mb > 256 else bw["sum_256MB"]
        distinct = ids.unique().numel()
        path = experts_cpu.choose_path(batch, shape.top_k, shape.experts, dtype)
        rows.append(dict(batch=batch, distinct=distinct, mb=distinct * expert_bytes / 1e6, path=path,
                         lynx_s=median(times["lynx"]), inductor_s=median(times["inductor"]), bw=bw))
    del hf, w_gate_up, w_down
    torch._dynamo.reset()
    return rows, layer_mb


def crossover_rows(shape: Shape, dtype: torch.dtype, batches, reps, gen, progress):
    """The fused kernel against the grouped_mm path at growing token counts (prefill)."""
    w_gate_up, w_down = layer_weights(shape, dtype, gen)
    rows = []
    for batch in batches:
        hidden = torch.randn(batch, shape.hidden, generator=gen).to(dtype)
        ids, weights = routing(batch, shape.experts, shape.top_k, gen)
        args = (hidden, ids, weights, w_gate_up, w_down, None, None, None, "silu", "gate_up_concat", [])
        times = {"fused": [], "grouped_mm": []}
        for _ in range(reps):
            for path in times:
                times[path].append(time_call(experts_cpu.grouped_experts_cpu, *args, path))
            progress.update(1)
        rows.append(dict(batch=batch, rows_per_expert=batch * shape.top_k / shape.experts,
                         fused_s=median(times["fused"]), grouped_mm_s=median(times["grouped_mm"]),
                         chosen=experts_cpu.choose_path(batch, shape.top_k, shape.experts, dtype)))
    return rows


def machine_lines(threads: int) -> list[str]:
    info = machine_info(threads)
    return [
        f"- machine: {info['cpu']}, {info['cores_available']} cores available, {threads} threads, "
        f"ISA {torch.backends.cpu.get_cpu_capability()} (bf16/AMX flags: {info['bf16_flags']}), caches {info['caches']}",
        f"- torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; "
        f"fused kernel: {'built' if experts_cpu_fused.kernel() else 'unavailable: ' + str(experts_cpu_fused.build_error)}"
        f"; bf16 experts: {'vdpbf16ps' if experts_cpu_fused.bf16_dot_available() else 'widened to fp32'}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="olmoe,qwen3,shipped", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--batches", default=None, help="default 1,2,4,8,16,32 (the shipped shape also 64); "
                        "--crossover: 32,128,512,2048")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--crossover", action="store_true", help="fused kernel vs grouped_mm at prefill sizes")
    parser.add_argument("--out", default=None, help="markdown output (default benchmarks/results/experts_cpu[_crossover].md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    dtypes = [(d, DTYPES[d]) for d in args.dtypes.split(",")]
    out_path = Path(args.out or REPO / "benchmarks" / "results" / f"experts_cpu{'_crossover' if args.crossover else ''}.md")
    command = "python benchmarks/experts_cpu.py " + " ".join(sys.argv[1:])
    experts_cpu_fused.kernel()  # build (or load) before timing anything
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(0)

    def batches_for(shape):
        if args.batches:
            return [int(b) for b in args.batches.split(",")]
        if args.crossover:
            return [32, 128, 512, 2048]
        return [1, 2, 4, 8, 16, 32] + ([64] if shape.hidden < 1024 else [])

    total = sum(len(batches_for(s)) for s in shapes) * len(dtypes) * args.reps
    lines = []
    with torch.no_grad(), tqdm(total=total, desc="calls", unit="rep") as progress:
        for shape in shapes:
            for dname, dtype in dtypes:
                progress.set_postfix_str(f"{shape.name} {dname}")
                if args.crossover:
                    rows = crossover_rows(shape, dtype, batches_for(shape), args.reps, gen, progress)
                    lines += [f"| {shape.name} | {dname} | {r['batch']} | {r['rows_per_expert']:.1f} | "
                              f"{r['fused_s'] * 1e3:.1f} | {r['grouped_mm_s'] * 1e3:.1f} | "
                              f"{r['grouped_mm_s'] / r['fused_s']:.2f}x | {r['chosen']} |" for r in rows]
                    continue
                rows, layer_mb = decode_rows(shape, dtype, batches_for(shape), args.reps, gen, progress)
                for r in rows:
                    bw, ref = r["bw"], r["bw"]["reference"]
                    lynx_gbps = r["mb"] / 1e3 / r["lynx_s"]
                    ind_gbps = r["mb"] / 1e3 / r["inductor_s"]
                    lines.append(
                        f"| {shape.name} | {dname} | {r['batch']} | {r['distinct']} | {r['mb']:.1f} | {r['path']} | "
                        f"{r['lynx_s'] * 1e3:.2f} | {lynx_gbps:.1f} | {100 * lynx_gbps / ref:.0f}% | "
                        f"{r['inductor_s'] * 1e3:.2f} | {ind_gbps:.1f} | {100 * ind_gbps / ref:.0f}% | "
                        f"{r['inductor_s'] / r['lynx_s']:.2f}x | {bw['sum_256MB']:.1f} / {bw['layer_weight']:.1f} "
                        f"({layer_mb:.0f} MB{', cache-resident' if layer_mb <= 256 else ''}) |")
    load_after = os.getloadavg()
    if args.crossover:
        header = [
            "| shape | dtype | tokens | rows per expert (T*k/E) | fused ms | grouped_mm ms | fused speed-up | op picks |",
            "|---|---|---|---|---|---|---|---|",
        ]
        title = "# CPU experts: fused kernel vs grouped_mm path, decode to prefill sizes"
    else:
        header = [
            "| shape | dtype | batch | distinct experts | MB read | lynx path | lynx ms | lynx GB/s | lynx % of streaming | "
            "Inductor ms | Inductor GB/s | Inductor % of streaming | lynx speed-up | streaming GB/s around the row: 256 MB sum / layer weights (their size) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        title = "# CPU experts at decode: lynx::grouped_experts vs transformers' grouped_mm path under Inductor"
    text = "\n".join([
        title, "",
        f"- command: `{command.strip()}` (median of {args.reps} interleaved calls per row)",
        *machine_lines(args.threads),
        f"- load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' '.join(f'{x:.2f}' for x in load_after)} (other processes lower every number)",
        "", *header, *lines, "",
    ])
    print("\n" + text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")


if __name__ == "__main__":
    main()

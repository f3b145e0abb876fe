"""One MoE layer's experts on CPU: lynx's experts op against transformers' grouped_mm path.

    .venv/bin/python benchmarks/experts_cpu.py [--dtype bf16|fp32] [--shape olmoe|qwen3] [--reps 7]

Same routing for both (plain top-k of skewed logits), interleaved repetitions, median
milliseconds per call. transformers' path runs as it does inside an Inductor graph: the
torch-level ops (sort, histc, gathers) compiled by Inductor around ``torch._grouped_mm``
(bf16) or ``transformers::grouped_mm_fallback`` (fp32). Writes a markdown table to
out/experts_cpu.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.integrations import moe as hf_moe

import lynx_compile  # noqa: F401  (torch.ops.lynx)

SHAPES = {"olmoe": (2048, 1024, 64, 8), "qwen3": (2048, 768, 128, 8)}  # hidden, inter, E, k
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def median_ms(samples):
    return sorted(samples)[len(samples) // 2] * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--shape", choices=SHAPES, default="olmoe")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="out/experts_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden_size, inter, num_experts, top_k = SHAPES[args.shape]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    w_down = (torch.randn(num_experts, hidden_size, inter, generator=gen) / inter**0.5).to(dtype)
    hf = torch.compile(HFExperts(w_gate_up, w_down).eval())
    expert_mb = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size() / 2**20

    def lynx(hidden, ids, weights):
        return torch.ops.lynx.grouped_experts(hidden, ids, weights, w_gate_up, w_down, None, None, None,
                                              "silu", "gate_up_concat", [])

    rows = []
    with torch.no_grad():
        for batch in tqdm([int(b) for b in args.batches.split(",")], desc="batch"):
            hidden = torch.randn(batch, hidden_size, generator=gen).to(dtype)
            ids, weights = routing(batch, num_experts, top_k, gen)
            weights = weights.to(dtype) if dtype == torch.bfloat16 else weights
            torch.testing.assert_close(lynx(hidden, ids, weights), hf(hidden, ids, weights), rtol=2e-2, atol=2e-2)
            times = {"lynx": [], "transformers": []}
            for _ in range(args.reps):
                for name, fn in (("lynx", lynx), ("transformers", hf)):
                    start = time.perf_counter()
                    fn(hidden, ids, weights)
                    times[name].append(time.perf_counter() - start)
            distinct = ids.unique().numel()
            lynx_ms, hf_ms = median_ms(times["lynx"]), median_ms(times["transformers"])
            rows.append((batch, distinct, distinct * expert_mb, lynx_ms, hf_ms, hf_ms / lynx_ms,
                         distinct * expert_mb / 1024 / (lynx_ms / 1e3)))
    lines = [
        f"# experts on CPU: {args.shape} shape (H {hidden_size}, I {inter}, E {num_experts}, k {top_k}), "
        f"{args.dtype}, {args.threads} threads",
        "",
        "| batch | distinct experts | expert MiB read | lynx ms | transformers (Inductor) ms | speed-up | lynx GiB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {b} | {d} | {mb:.0f} | {lm:.1f} | {hm:.1f} | {s:.2f}x | {gbs:.1f} |" for b, d, mb, lm, hm, s, gbs in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

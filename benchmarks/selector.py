#!/usr/bin/env python
"""The selector's cost per MoE layer call against the router's own softmax + top-k, every rule.

    .venv/bin/python benchmarks/selector.py            # [16, 64] k=4 and [64, 128] k=8, ~3 min
    .venv/bin/python benchmarks/selector.py --quick    # fewer repetitions

Both sides as they run in a compiled model: Inductor compiles a graph of ``--layers`` independent
routing calls (different logits each), the router's own ops (transformers' code for the rule)
against ``lynx::select_experts`` with the step context, traced and fused as the lynx backend
hands it to Inductor. The marginal cost of one call is (time of the L-call graph - time of a
1-call graph) / (L - 1), so the per-graph call overhead cancels; medians over interleaved
repetitions. Also the eager cost of each (the op as compiler="eager" runs it, the router in
eager PyTorch). Writes a markdown table to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from tqdm import tqdm

import lynx_compile  # noqa: F401  (registers torch.ops.lynx)
from lynx_compile.ops import select_experts_decomposition
from lynx_compile.policies.rules import RouterRule, group_mask
from lynx_compile.step import step_buffers

SELECT = torch.ops.lynx.select_experts.default

# name -> (RouterRule, biased, the router's own code as transformers writes it)
def _softmax_topk(renormalize):
    def router(logits, bias, k):
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True) if renormalize else weights), ids
    return router


def _gpt_oss(logits, bias, k):
    values, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), ids


def _grouped(rule, sigmoid):
    def router(logits, bias, k):
        scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
        choice = scores + bias if bias is not None else scores
        choice = choice.masked_fill(~group_mask(choice, rule), float("-inf") if sigmoid else 0.0)
        ids = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if rule.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * rule.scaling_factor, ids
    return router


def _sigmoid_topk(logits, bias, k):
    scores = torch.sigmoid(logits)
    ids = torch.topk(scores + bias, k, dim=-1).indices
    weights = scores.gather(-1, ids)
    return weights / weights.sum(dim=-1, keepdim=True), ids


V2 = RouterRule("softmax", False, False, 8, 3, "max", 2.0)
V3 = RouterRule("sigmoid", True, False, 8, 4, "top2_sum", 2.5)
RULES = {
    "softmax, renormalised (Mixtral, Qwen3)": (RouterRule(), False, _softmax_topk(True)),
    "softmax, not renormalised (OLMoE, Qwen2)": (RouterRule(renormalize=False), False, _softmax_topk(False)),
    "top-k then softmax (GPT-OSS)": (RouterRule(softmax_after_topk=True), False, _gpt_oss),
    "softmax, grouped (DeepSeek-V2)": (V2, False, _grouped(V2, sigmoid=False)),
    "sigmoid + bias (GLM-4.5 style)": (RouterRule("sigmoid"), True, _sigmoid_topk),
    "sigmoid + bias, grouped (DeepSeek-V3)": (V3, True, _grouped(V3, sigmoid=True)),
}


def lynx_backend_like(gm, example_inputs):
    """What the lynx backend hands Inductor: the selector op plus its decomposition."""
    return compile_fx(gm, example_inputs, decompositions={**select_decomp_table(), SELECT: select_experts_decomposition})


def selector_fn(rule: RouterRule, k: int, alpha: float, beta: int):
    state, mask = step_buffers("cpu")

    def select(logits, bias):
        return SELECT(logits, bias, state, mask, k, 1, "lynx", [alpha, float(beta)], True, rule.scoring,
                      rule.renormalize, rule.softmax_after_topk, rule.num_groups, rule.topk_groups, rule.group_score,
                      rule.scaling_factor)
    return select


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(rule_name, shape, layers, repeats, alpha, beta):
    rule, biased, router = RULES[rule_name]
    tokens, experts, k = shape
    g = torch.Generator().manual_seed(0)
    popularity = torch.randn(experts, generator=g)
    logits = [(popularity + torch.randn(tokens, experts, generator=g)) * 1.2 for _ in range(layers)]
    bias = (torch.randn(experts, generator=g) * 0.05) if biased else None
    select = selector_fn(rule, k, alpha, beta)

    def graph(fn, n):
        return lambda ls, b: [fn(x, b) for x in ls[:n]]

    variants = {
        ("plain", 1): torch.compile(graph(lambda x, b: router(x, b, k), 1), dynamic=False),
        ("plain", layers): torch.compile(graph(lambda x, b: router(x, b, k), layers), dynamic=False),
        ("lynx", 1): torch.compile(graph(select, 1), backend=lynx_backend_like, dynamic=False),
        ("lynx", layers): torch.compile(graph(select, layers), backend=lynx_backend_like, dynamic=False),
        ("plain eager", 1): graph(lambda x, b: router(x, b, k), 1),
        ("lynx eager", 1): graph(select, 1),
    }
    times = {key: [] for key in variants}
    with torch.no_grad():
        for fn in variants.values():  # compile and warm up
            for _ in range(3):
                fn(logits, bias)
        for _ in range(repeats):  # interleaved
            for key, fn in variants.items():
                times[key].append(timed(fn, logits, bias))
    med = {key: statistics.median(ts) * 1e6 for key, ts in times.items()}
    plain = (med[("plain", layers)] - med[("plain", 1)]) / (layers - 1)
    lynx = (med[("lynx", layers)] - med[("lynx", 1)]) / (layers - 1)
    return dict(rule=rule_name, shape=f"[{tokens}, {experts}] k={k}", plain_us=plain, lynx_us=lynx,
                ratio=lynx / plain, plain_eager_us=med[("plain eager", 1)], lynx_eager_us=med[("lynx eager", 1)])


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, ISA {torch.backends.cpu.get_cpu_capability()}, load average "
            f"{os.getloadavg()[0]:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/selector.md")
    args = parser.parse_args()
    repeats = 40 if args.quick else args.repeats
    shapes = [(16, 64, 4), (64, 128, 8)]
    rows = []
    for shape in tqdm(shapes, desc="shapes"):
        for name in tqdm(RULES, desc="rules", leave=False):
            torch._dynamo.reset()
            rows.append(measure(name, shape, args.layers, repeats, 3.0, 2))
    lines = [f"Machine: {machine()}. Selector (alpha 3, beta 2) vs the router's own ops, both compiled by Inductor "
             f"({args.layers} calls per graph, marginal cost per call, median of {repeats} interleaved repetitions); "
             "eager: one call outside any compiled graph.", "",
             "| rule | logits | router's top-k us | lynx selector us | ratio | eager: router us / lynx op us |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['shape']} | {r['plain_us']:.1f} | {r['lynx_us']:.1f} | {r['ratio']:.2f} | "
                     f"{r['plain_eager_us']:.0f} / {r['lynx_eager_us']:.0f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

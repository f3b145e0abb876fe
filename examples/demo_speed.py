"""The demo's second table: decode speed on a memory-bound MoE shape, where lynx exists to help.

A model with OLMoE-1B-7B's MoE layers (hidden 2048, expert size 1024, E=64, k=8), built from a
config by ``benchmarks/decode_model.py`` with its routers scaled to the logit spread of the
shipped trained model, bf16: 12 MiB per expert, so a decode step streams its experts from memory.
Prefill runs uncompiled (it is the same for every mode); only the ``[B, 1]`` decode step is
compiled, once per mode, and the modes' decode steps are timed interleaved, round after round.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lynx_compile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode_model as dm  # noqa: E402
from decode import distinct_code_forward  # noqa: E402

MODES = {"inductor": ("inductor", None), "lynx off": ("lynx", {"policy": "off"}), "lynx on": ("lynx", {"policy": "lynx"})}


def machine_line(bandwidth_gbs: float) -> str:
    """Cores, ISA and measured bandwidth: the facts a reader needs to compare tables across machines."""
    info = dm.machine_info(torch.get_num_threads())
    isa = torch.backends.cpu.get_cpu_capability()
    return (f"machine: {info['cpu']}, {info['cores_available']} cores, ISA {isa} (bf16 flags: {info['bf16_flags']}), "
            f"streaming read {bandwidth_gbs:.1f} GB/s, load {info['loadavg']}")


def streaming_bandwidth(megabytes: int = 256) -> float:
    """GB/s of a plain streaming read: the sum of an fp32 tensor far larger than the caches."""
    return dm.streaming_read(torch.ones(megabytes * 2**20 // 4))


def memory_bound_table(batch: int = 16, layers: int = 2, rounds: int = 3, steps: int = 3, prompt_len: int = 8) -> str:
    """The table as markdown; ``layers`` x 768 MiB of bf16 experts are built and streamed."""
    shape = dm.SHAPES["olmoe"]
    model = dm.build_model(shape, layers, torch.bfloat16, heads=4, head_dim=64, vocab=512)
    target_std, _, _, _ = dm.reference_router_stats()
    dm.match_router_spread(model, target_std, batch=batch, prompt_len=prompt_len, steps=1, passes=1)  # routers are linear: one pass nearly lands
    bandwidth = dm.read_bandwidth(model)
    sizes = dm.weight_bytes(model)
    from transformers import StaticCache

    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    max_len = prompt_len + 1 + rounds * steps + steps
    runs = {}
    torch._dynamo.reset()
    for name, (backend, options) in tqdm(MODES.items(), desc="memory-bound: compile"):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        first = model(input_ids=prompt, cache=cache, cache_position=torch.arange(prompt_len), use_cache=True)
        # each mode's own code object: its own dynamo cache, so the modes can interleave
        forward = torch.compile(distinct_code_forward(model, name), backend=backend, options=options)
        runs[name] = dict(forward=forward, cache=cache, token=first.logits[:, -1].argmax(-1), position=prompt_len,
                          times=[], experts=[])
        step(runs[name])  # compiles the decode graph
    for _ in tqdm(range(rounds), desc="memory-bound: timed rounds"):
        for run in runs.values():
            for _ in range(steps):
                with lynx_compile.capture_routing() as cap:
                    run["times"].append(step(run))
                run["experts"].extend(cap.distinct_experts())
    rows = []
    inductor = statistics.median(runs["inductor"]["times"])
    for name, run in runs.items():
        seconds = statistics.median(run["times"])
        experts = statistics.mean(run["experts"]) if run["experts"] else None
        read = (experts if experts is not None else float("nan")) * sizes["per_expert"] * layers
        share = f"{100 * read / seconds / 1e9 / bandwidth:.0f}%" if experts is not None else "-"
        rows.append(f"| {name} | {batch / seconds:.1f} ({inductor / seconds:.2f}x) | "
                    f"{'-' if experts is None else f'{experts:.1f}'} | {share} |")
    return "\n".join([
        f"Memory-bound shape: {shape.name} MoE layers (E={shape.experts}, k={shape.top_k}, {sizes['per_expert'] / 2**20:.0f} "
        f"MiB per expert), {layers} layers, bf16, batch {batch}; median of {rounds * steps} decode steps per mode",
        machine_line(bandwidth), "",
        "| mode | decode tokens/s (x Inductor) | distinct experts / layer / step | expert bytes read / step time, % of streaming bandwidth |",
        "|---|---|---|---|", *rows, "",
        "Inductor's graph hides the routing (plain top-k: the same experts as lynx off).",
    ])


def step(run) -> float:
    """One timed decode step of a mode; advances its cache and token."""
    position = torch.tensor([run["position"]])
    start = time.perf_counter()
    out = run["forward"](input_ids=run["token"][:, None], cache=run["cache"], cache_position=position, use_cache=True)
    run["token"] = out.logits[:, -1].argmax(-1)
    seconds = time.perf_counter() - start
    run["position"] += 1
    return seconds

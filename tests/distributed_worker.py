"""One rank of the sharded-model tests: run under ``torchrun --nproc-per-node 2`` (gloo on CPU).

For each case ``family:layout:dtype`` (layout ``tp``: ``DistributedConfig(tp_size=2)``, ``ep``:
``DistributedConfig(tp_size=2, ep_size=2)``) this rank loads the model sharded and unsharded,
compiles both with lynx (selector off and on), runs a prefill and decode steps on fixed tokens,
and saves what tests/test_distributed.py checks: the reports, the graph dumps, the logits, and
the routing and experts calls of every MoE layer; for the sharded model also the router logits
and chosen ids of every rank (all_gather). This script asserts nothing itself.

    torchrun --nproc-per-node 2 tests/distributed_worker.py --models DIR --out DIR mixtral:ep:fp32 ...
    torchrun --nproc-per-node 2 tests/distributed_worker.py --gpt-fast --out DIR
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import lynx_compile
from lynx_compile import capture_routing, collect_reports
from lynx_compile.capture import RoutingCapture
from lynx_compile.integrations.distributed import check_same_routing

ALPHA, BETA = 3.0, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCH, PROMPT, DECODE_STEPS = 8, 5, 3
VOCAB = 96  # tests/moe_models.py


def layouts():
    from transformers.distributed import DistributedConfig

    return {"tp": DistributedConfig(tp_size=2), "ep": DistributedConfig(tp_size=2, ep_size=2)}


def step_tokens(seed: int = 0) -> list[torch.Tensor]:
    """The prompt, then one fixed token per sequence and step (decode inputs do not depend on
    the model's output, so sharded and single-process runs see the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, VOCAB, (BATCH, PROMPT), generator=g)
    return [prompt] + [torch.randint(2, VOCAB, (BATCH, 1), generator=g) for _ in range(DECODE_STEPS)]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """[world, ...]: every rank's copy of ``tensor``."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def same_routing(cap: RoutingCapture) -> int | str:
    """check_same_routing's count, or its error message."""
    try:
        return check_same_routing(cap)
    except RuntimeError as error:
        return str(error)


def tampered_routing() -> int | str:
    """check_same_routing on captures that differ in one expert id of rank 1: must report it."""
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    weights, ids = lynx_compile.select_experts(logits, 2, alpha=1.0, beta=1)
    if dist.get_rank() == 1:
        ids = ids.clone()
        ids[2, 0] = (ids[2, 0] + 1) % 8
    capture = SimpleNamespace(routing=[SimpleNamespace(logits=logits, ids=ids)])  # what check_same_routing reads
    return same_routing(capture)


def run_steps(model, policy: str, dump_dir: Path, sharded: bool) -> dict:
    """Prefill, then decode steps, through a static KV cache (two graphs: prefill and decode)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    compiled = torch.compile(model.forward, backend="lynx", options={
        "compiler": "eager", "policy": policy, "alpha": ALPHA, "beta": BETA, "dump_dir": str(dump_dir)})
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + DECODE_STEPS)
    steps, position = [], 0
    counters.clear()
    with torch.no_grad():
        for tokens in step_tokens():
            cache_position = torch.arange(position, position + tokens.shape[1])
            position += tokens.shape[1]
            with collect_reports() as reports, capture_routing() as cap:
                out = compiled(input_ids=tokens, past_key_values=cache, use_cache=True, cache_position=cache_position)
            step = {
                "logits": out.logits.float(),
                "reports": [r.to_dict() for r in reports],
                "routing": [{"ids": e.ids, "logits": e.logits, "rerouted": e.rerouted, "rule": e.rule,
                             "score_bias": e.score_bias, "alpha": e.alpha, "beta": e.beta} for e in cap.routing],
                "dispatch": [{"ids": e.ids, "distinct": e.distinct_experts} for e in cap.dispatch],
            }
            if sharded:  # every rank's router logits and choices, to compare bit for bit
                for event in step["routing"]:
                    event["all_ids"], event["all_logits"] = gather(event["ids"]), gather(event["logits"])
                step["same_routing"] = same_routing(cap)
            steps.append(step)
    return {"steps": steps, "graph_breaks": sum(counters["graph_break"].values())}


def run_case(case: str, models: Path, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    family, layout, dtype, *only = case.split(":")  # a 4th field "lynx": the selector on only
    path = models / family
    sharded = AutoModelForCausalLM.from_pretrained(path, distributed_config=layouts()[layout], dtype=DTYPES[dtype]).eval()
    single = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    rank, result = dist.get_rank(), {}
    dumps = out / f"dumps_rank{rank}" / case.replace(":", "_")
    policies = tuple(only) or ("off", "lynx")
    for policy in policies:
        torch._dynamo.reset()
        result[("sharded", policy)] = run_steps(sharded, policy, dumps / f"sharded_{policy}", sharded=True)
    # The single-process reference does not depend on the rank: rank 0 runs it with the selector
    # on, rank 1 with it off, at the same time (the tests read both ranks' files).
    policy = ("lynx", "off")[rank % 2]
    if policy in policies:
        torch._dynamo.reset()
        result[("single", policy)] = run_steps(single, policy, dumps / f"single_{policy}", sharded=False)
    return result


def run_gpt_fast(out: Path) -> dict:
    """tests/gpt_fast_moe.py sharded by hand like gpt-fast's tp.py: every rank holds its slice of the
    intermediate dimension of all experts; a functional all_reduce sums the ranks' outputs, either after
    the MoE layer ("after_combine") or, as gpt-fast does, on the experts' outputs before the weighted
    sum ("before_combine")."""
    from gpt_fast_sharded import sharded_gpt_fast

    result = {}
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (16, 1), generator=torch.Generator().manual_seed(1))
    for placement in ("after_combine", "before_combine"):
        reference, model = sharded_gpt_fast(placement)
        with torch.no_grad():
            expected = reference(tokens)
        for policy in ("off", "lynx"):
            torch._dynamo.reset()
            dump_dir = out / f"dumps_rank{dist.get_rank()}" / f"gpt_fast_{placement}_{policy}"
            compiled = torch.compile(model, backend="lynx", options={
                "compiler": "eager", "policy": policy, "alpha": 1.0, "beta": 1, "dump_dir": str(dump_dir),
                "sequence_dim": 1})  # gpt-fast: [batch, seq, dim]
            with torch.no_grad(), collect_reports() as reports, capture_routing() as cap:
                logits = compiled(tokens)
            result[(placement, policy)] = {
                "logits": logits, "reports": [r.to_dict() for r in reports],
                "routing": [{"ids": e.ids, "logits": e.logits, "all_ids": gather(e.ids)} for e in cap.routing],
                "dispatch": [{"ids": e.ids, "distinct": e.distinct_experts} for e in cap.dispatch],
            }
        torch._dynamo.reset()
        with torch.no_grad():  # the unsharded module, single-process lynx, policy off
            compiled = torch.compile(reference, backend="lynx", options={"compiler": "eager", "policy": "off"})
            result[(placement, "single_off")] = {"logits": compiled(tokens), "eager": expected}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help="family:layout:dtype[:lynx], e.g. mixtral:ep:fp32")
    parser.add_argument("--models", type=Path, help="directory of saved tiny models, one folder per family")
    parser.add_argument("--gpt-fast", action="store_true", help="also run the hand-sharded gpt-fast module")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {"rank": rank, "world": dist.get_world_size(), "version": lynx_compile.__version__}
    for case in args.cases:
        start = time.perf_counter()
        results[case] = run_case(case, args.models, args.out)
        if rank == 0:
            print(f"{case}: {time.perf_counter() - start:.1f} s", flush=True)
    if args.gpt_fast:
        start = time.perf_counter()
        results["gpt_fast"] = run_gpt_fast(args.out)
        if rank == 0:
            print(f"gpt-fast: {time.perf_counter() - start:.1f} s", flush=True)
    results["tampered"] = tampered_routing()
    torch.save(results, args.out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()

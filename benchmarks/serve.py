#!/usr/bin/env python
"""Serving benchmark: a stream of requests through transformers' continuous batching, eager vs
Inductor vs lynx (selector off / on), side by side in one process.

    .venv/bin/python benchmarks/serve.py --quick       # smoke run (< 2 min with a warm Inductor cache)
    .venv/bin/python benchmarks/serve.py               # both models, 2 interleaved rounds
    .venv/bin/python benchmarks/serve.py --models olmoe --configs "eager,inductor,lynx off,lynx on,oea"

The stream: ``--requests`` requests with mixed prompt lengths and output lengths (uniform in the
given ranges; no end-of-sequence token, so every configuration does the same work), arriving as a
Poisson process of ``--rate`` requests/s, all seeded. Each configuration gets the same stream
through its own ``ContinuousBatchingManager`` (``generate_batch``'s engine, driven directly:
``add_request`` at each arrival time, results as they finish). Rounds interleave the
configurations (one whole stream each, the order rotating every round); each manager is kept
between rounds, so its compiled graphs are reused and nothing recompiles while timed.

Configurations (``--configs``), all fp32/bf16 as the model is, greedy:
  eager       the model as transformers runs it (no compile configs: no padding)
  inductor    varlen_compile_config=CompileConfig(backend="inductor", mode="default", fullgraph=False)
  lynx off    CompileConfig(backend="lynx", options={"policy": "off", "mode": "default"}, fullgraph=False)
  lynx on     the same with policy "lynx" (the model's default alpha, beta)
  oea, xshare the peers' rules (k0 = k/2; budget = 2k), same compile config
lynx's step hooks (``integrations.transformers.enable_step_hooks``) are on for every
configuration, so the graphs differ only in the backend.

Models (``--models``):
  tiny    the shipped trained model (models/lynx-tiny-moe, Qwen3-MoE, E=64, k=4, 4 layers, fp32),
          prompts from held-out text: quality. Does lynx off give eager's tokens? How many
          tokens does lynx on share with lynx off?
  olmoe   the memory-bound OLMoE-1B-7B MoE shape of benchmarks/decode.py (``decode_model``:
          E=64, k=8, 2 layers, bf16, routers scaled to the trained router's spread), random
          prompts: speed.

Measured per configuration and round: output tokens/s (all output tokens / first arrival to last
finish), time to first token (arrival to first token) and time per output token (per request:
(last token - first token) / (tokens - 1)), median and p90 over requests; per forward step of the
engine: decode or prefill, the live sequences and tokens (from ``cu_seq_lens_q``), and the
distinct experts each MoE layer read (eager: the experts modules' inputs; lynx: the experts op's
ids, padded rows included, as the op reads them for them too; Inductor fuses the routing, so
none); for lynx's selector policies the share of decode routing calls that were re-routed
(``capture_routing``; this needs ``options={"observe": True}``, which keeps the selector an
unfused op: ``--no-observe`` times lynx without it, and then re-routing is not counted).

The step log is a forward pre-hook outside the compiled graphs (``torch._dynamo.disable``): it
adds one graph break at the top of the model's forward in every compiled configuration alike.

Writes report.md, summary.csv, requests.csv, steps.csv, results.json and experts_per_step.png
(distinct experts per decode step over time, one line per configuration) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import decode_model as dm  # noqa: E402
from decode import ExpertsInputCounter, median  # noqa: E402
from demo_model import heldout_sources  # noqa: E402

import lynx_compile  # noqa: E402
from lynx_compile.integrations.transformers import enable_step_hooks  # noqa: E402

warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function")

ALL_CONFIGS = ("eager", "inductor", "lynx off", "lynx on", "oea", "xshare")
SELECTOR_POLICIES = {"lynx on": "lynx", "oea": "oea", "xshare": "xshare"}


# --- the configurations --------------------------------------------------------------------

def compile_config(name: str, top_k: int, observe: bool):
    """The CompileConfig of configuration ``name`` (None: eager)."""
    from transformers import CompileConfig

    if name == "eager":
        return None
    if name == "inductor":
        return CompileConfig(backend="inductor", mode="default", fullgraph=False, dynamic=True)
    options = {"mode": "default"}
    if name == "lynx off":
        options["policy"] = "off"
    else:
        options.update(policy=SELECTOR_POLICIES[name], observe=observe)
        if name == "oea":
            options["k0"] = max(1, top_k // 2)
        if name == "xshare":
            options["budget"] = 2 * top_k
    return CompileConfig(backend="lynx", mode=None, fullgraph=False, dynamic=True, options=options)


def cb_config(compiled, args):
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(
        num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens, max_requests_per_batch=args.max_batch_requests,
        allow_block_sharing=False, use_async_batching=False, use_cuda_graph=False,
        q_padding_interval_size=args.q_padding, kv_padding_interval_size=args.kv_padding,
        varlen_compile_config=compiled, decode_compile_config=compiled)


# --- the request stream --------------------------------------------------------------------

@dataclass
class Request:
    prompt: list[int]
    new_tokens: int
    arrival: float  # seconds after the stream starts


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected a range LO-HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_stream(args, source: list[int] | None, vocab: int) -> list[Request]:
    """``args.requests`` requests: Poisson arrivals, uniform prompt and output lengths (seeded).
    ``source``: token ids to cut prompts from (held-out text), or None for random ids."""
    rng = random.Random(args.seed)
    t, stream = 0.0, []
    for _ in range(args.requests):
        length = rng.randint(*args.prompt_len)
        if source is None:
            prompt = [rng.randrange(1, vocab) for _ in range(length)]
        else:
            start = rng.randrange(0, len(source) - length)
            prompt = source[start:start + length]
        stream.append(Request(prompt, rng.randint(*args.output_len), t))
        t += rng.expovariate(args.rate)
    return stream


def heldout_ids(model_dir: Path, tokenizer) -> list[int]:
    """The held-out standard-library text of the shipped model, as token ids."""
    text = "".join(p.read_text(errors="replace") for p in heldout_sources(model_dir)[:20])
    return tokenizer(text, add_special_tokens=False).input_ids


# --- instruments ----------------------------------------------------------------------------

def dynamo_limits() -> None:
    """Raise dynamo's recompile limits in the calling thread, and fail where one is hit.

    Every configuration's graphs share CB's forward's code object, and transformers' deprecation
    wrapper (``deprecate_kwarg``) is one code object for the attention, decoder layer and model
    forwards: the default limit (8) is hit within one configuration's warm-up, and dynamo then
    runs those frames eagerly without a word (lynx would match nothing). torch 2.13 keeps config
    overrides per thread, and CB compiles in its own worker thread: ``StepLog`` calls this there.
    """
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 8192
    torch._dynamo.config.fail_on_recompile_limit_hit = True


class StepLog:
    """One entry per engine forward: step kind and live rows from ``cu_seq_lens_q``, and where
    that step's experts and routing records start. A forward pre-hook run outside dynamo."""

    def __init__(self, model):
        self.steps: list[dict] = []
        self.cap = None
        self.counter: ExpertsInputCounter | None = None
        self.thread = threading.local()  # not thread ids: CB's next worker thread may reuse one
        self.handle = model.register_forward_pre_hook(torch._dynamo.disable(self._hook), with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not getattr(self.thread, "limits", False):  # CB's worker thread: before its model frames compile
            dynamo_limits()
            self.thread.limits = True
        cu = kwargs.get("cu_seq_lens_q")
        if not isinstance(cu, torch.Tensor):
            return
        lengths = (cu[1:] - cu[:-1]).tolist()
        live = int(cu[-1])
        self.steps.append(dict(
            time=time.perf_counter(), decode=live > 0 and max(lengths) <= 1, sequences=sum(n > 0 for n in lengths),
            tokens=live, rows=int(kwargs["input_ids"].shape[-1]),
            dispatch=len(self.cap.dispatch) if self.cap else 0, routing=len(self.cap.routing) if self.cap else 0,
            eager=len(self.counter.counts) if self.counter else 0))


def per_step(log: StepLog, cap, counter, layers: int, t0: float) -> list[dict]:
    """Each logged step with the distinct experts its MoE layers read, and its re-routed calls.

    ``cap``: the lynx capture of a lynx configuration (each step must run lynx's experts op in
    every MoE layer: a layer lynx left unmatched, or a frame dynamo fell back to eager for, fails
    here); ``counter``: the eager experts counter."""
    rows = []
    ends = log.steps[1:] + [dict(dispatch=len(cap.dispatch) if cap else 0, routing=len(cap.routing) if cap else 0,
                                 eager=len(counter.counts) if counter else 0)]
    for step, end in zip(log.steps, ends):
        if counter is not None:
            distinct = counter.counts[step["eager"]:end["eager"]]
        elif cap is not None:
            distinct = [e.distinct_experts for e in cap.dispatch[step["dispatch"]:end["dispatch"]]]
        else:
            distinct = []
        routing = cap.routing[step["routing"]:end["routing"]] if cap is not None else []
        if (cap is not None or counter is not None) and len(distinct) != layers:
            raise RuntimeError(f"a step recorded {len(distinct)} experts calls for {layers} MoE layers (steps: "
                               f"{[(s['decode'], s['tokens'], e['dispatch'] - s['dispatch']) for s, e in zip(log.steps, ends)]})")
        rows.append(dict(time=step["time"] - t0, decode=step["decode"], sequences=step["sequences"],
                         tokens=step["tokens"], rows=step["rows"],
                         distinct=sum(distinct) / len(distinct) if distinct else None,
                         routing_calls=len(routing), rerouted=sum(e.rerouted for e in routing)))
    return rows


# --- one stream through one manager ---------------------------------------------------------

@dataclass
class Engine:
    name: str
    manager: object
    compiled: bool
    observe: bool
    warm_s: float = 0.0
    results: list[dict] = field(default_factory=list)


def new_engine(model, name, generation, args, top_k) -> Engine:
    from transformers import ContinuousBatchingManager

    compiled = compile_config(name, top_k, args.observe)
    manager = ContinuousBatchingManager(model, generation, cb_config(compiled, args))
    return Engine(name, manager, compiled is not None, args.observe)


def run_stream(model, engine: Engine, stream: list[Request], log: StepLog, layers: int, desc: str) -> dict:
    """Send ``stream`` through ``engine`` in real time; the requests' timings, tokens and steps."""
    manager = engine.manager
    manager.switch_to_cb_friendly_attn(model, manager.continuous_batching_config.auto_switch_to_flash)
    counter = ExpertsInputCounter(model) if engine.name == "eager" else None
    log.steps, log.counter = [], counter
    outputs, failures = {}, []
    frames_before = _compiled_frames()
    with lynx_compile.capture_routing(all_threads=True) as cap:
        log.cap = cap
        manager.start()
        t0 = time.perf_counter()

        def feed():
            for i, request in enumerate(stream):
                delay = t0 + request.arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                manager.add_request(request.prompt, request_id=f"r{i}", max_new_tokens=request.new_tokens,
                                    record_timestamps=True, eos_token_id=-1)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            with tqdm(total=len(stream), desc=desc, unit="req", leave=False) as bar:
                while len(outputs) + len(failures) < len(stream):
                    result = manager.get_result(timeout=1)
                    if result is None:
                        if not manager.is_running():
                            raise RuntimeError(f"{engine.name}: the generation thread stopped "
                                               f"({len(outputs)} of {len(stream)} requests done)")
                        continue
                    if result.is_finished():
                        if result.error:
                            failures.append(result)
                        else:
                            outputs[result.request_id] = result
                        bar.update(1)
        finally:
            feeder.join()
            manager.stop(block=True, keep_for_next_session=True)  # keep the compiled forward for the next round
            model.__dict__.pop("_cached_continuous_batching_manager", None)
            log.cap, log.counter = None, None
            if counter is not None:
                counter.remove()
    if failures:
        raise RuntimeError(f"{engine.name}: {len(failures)} requests failed, e.g. {failures[0].error}")
    check_graphs(engine.name, cap, args_observe=engine.observe)
    requests = []
    for i, request in enumerate(stream):
        out = outputs[f"r{i}"]
        stamps = out.timestamps
        if len(out.generated_tokens) != request.new_tokens:
            raise RuntimeError(f"{engine.name}: request {i} got {len(out.generated_tokens)} tokens, "
                               f"asked {request.new_tokens}")
        requests.append(dict(request=i, prompt_len=len(request.prompt), new_tokens=request.new_tokens,
                             arrival=out.created_time - t0, ttft=stamps[0] - out.created_time,
                             tpot=(stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
                             finish=stamps[-1] - t0, tokens=list(out.generated_tokens)))
    lynx_cap = cap if engine.name.startswith("lynx") or engine.name in SELECTOR_POLICIES else None
    return dict(requests=requests, steps=per_step(log, lynx_cap, counter, layers, t0),
                duration=max(r["finish"] for r in requests) - min(r["arrival"] for r in requests),
                recompiles=_compiled_frames() - frames_before, experts_calls=len(cap.dispatch),
                routing_calls=len(cap.routing))


def check_graphs(name: str, cap, args_observe: bool) -> None:
    """Fail if a configuration ran graphs that are not its own (dynamo caches them per code
    object, shared by every configuration): no lynx op outside lynx, no selector under lynx off."""
    lynx = name.startswith("lynx") or name in SELECTOR_POLICIES
    if not lynx and (cap.dispatch or cap.routing):
        raise RuntimeError(f"{name} ran lynx's ops ({len(cap.dispatch)} experts calls): another configuration's graphs")
    if name == "lynx off" and cap.routing:
        raise RuntimeError(f"lynx off ran the selector ({len(cap.routing)} calls): another configuration's graphs")
    if name in SELECTOR_POLICIES and args_observe and not cap.routing:
        raise RuntimeError(f"{name} recorded no routing call: it ran another configuration's graphs")
    if name in SELECTOR_POLICIES and args_observe and any(e.policy != SELECTOR_POLICIES[name] for e in cap.routing):
        raise RuntimeError(f"{name} ran another policy's selector")


def _compiled_frames() -> int:
    """Frames dynamo has compiled so far, in any thread (CB compiles in its worker thread)."""
    return int(torch._dynamo.utils.counters["frames"]["ok"])


def quantile(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def summarise_run(run: dict) -> dict:
    reqs, steps = run["requests"], run["steps"]
    decode = [s for s in steps if s["decode"]]
    distinct = [s["distinct"] for s in decode if s["distinct"] is not None]
    calls = sum(s["routing_calls"] for s in decode)
    prefill_rerouted = sum(s["rerouted"] for s in steps if not s["decode"])
    return dict(
        tokens_per_s=sum(r["new_tokens"] for r in reqs) / run["duration"],
        tpot_median_ms=1e3 * quantile([r["tpot"] for r in reqs], 0.5),
        tpot_p90_ms=1e3 * quantile([r["tpot"] for r in reqs], 0.9),
        ttft_median_ms=1e3 * quantile([r["ttft"] for r in reqs], 0.5),
        ttft_p90_ms=1e3 * quantile([r["ttft"] for r in reqs], 0.9),
        decode_steps=len(decode), prefill_steps=len(steps) - len(decode),
        decode_sequences=median([s["sequences"] for s in decode]),
        distinct_per_decode_step=sum(distinct) / len(distinct) if distinct else None,
        decode_routing_calls=calls,
        rerouted_share=sum(s["rerouted"] for s in decode) / calls if calls else None,
        prefill_rerouted=prefill_rerouted, duration_s=run["duration"])


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Token agreement of two runs of one stream: positions equal, requests identical."""
    same = total = identical = 0
    for x, y in zip(a, b):
        same += sum(p == q for p, q in zip(x["tokens"], y["tokens"]))
        total += len(x["tokens"])
        identical += x["tokens"] == y["tokens"]
    return dict(token_agreement=same / total, identical_requests=identical, requests=len(a))


# --- the models -----------------------------------------------------------------------------

def load_tiny(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dm.SHIPPED, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(dm.SHIPPED)
    info = dict(name="lynx-tiny-moe (shipped, trained)", family=model.config.model_type, dtype="fp32",
                experts=model.config.num_experts, top_k=model.config.num_experts_per_tok,
                layers=model.config.num_hidden_layers)
    return model, heldout_ids(dm.SHIPPED, tokenizer), info


def load_olmoe(args):
    shape = dm.SHAPES["olmoe"]
    sizes = dict(hidden=dm.QUICK_HIDDEN, inter=dm.QUICK_INTER) if args.quick else {}
    model = dm.build_model(shape, args.layers, torch.bfloat16, heads=4, head_dim=64, vocab=512, seed=args.seed, **sizes)
    target, how, _, _ = dm.reference_router_stats(dm.SHIPPED)
    _, after, _ = dm.match_router_spread(model, target)
    wb = dm.weight_bytes(model)
    info = dict(name=f"{shape.name} MoE shape{' (quick: tiny experts)' if args.quick else ''}", family=shape.family,
                dtype="bf16", experts=shape.experts, top_k=shape.top_k, layers=args.layers,
                hidden=model.config.hidden_size, expert_mib=wb["per_expert"] / 2**20,
                layer_mib=wb["per_layer"] / 2**20, router_std=target, router_std_how=how,
                router_top1=after.mean("top1_prob"))
    return model, None, info


LOADERS = {"tiny": load_tiny, "olmoe": load_olmoe}
RATES = {"tiny": 12.0, "olmoe": 3.0}  # requests/s; chosen so a stream keeps ~10-20 sequences in flight here


def bench_model(key: str, args, meta: dict) -> dict:
    from transformers import GenerationConfig

    model, source, info = LOADERS[key](args)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = len(dm.experts_modules(model))
    rate = args.rate if args.rate is not None else RATES[key]
    stream_args = argparse.Namespace(**{**vars(args), "rate": rate})
    stream = make_stream(stream_args, source, model.config.vocab_size)
    info.update(rate=rate, requests=len(stream), output_tokens=sum(r.new_tokens for r in stream),
                prompt_tokens=sum(len(r.prompt) for r in stream), stream_span_s=stream[-1].arrival)
    if key == "olmoe":
        meta["machine"]["read_bandwidth_GBps"] = dm.read_bandwidth(model)
    tqdm.write(f"{key}: {info['name']}, {layers} MoE layers, {info['dtype']}; {len(stream)} requests at {rate}/s, "
               f"{info['prompt_tokens']} prompt + {info['output_tokens']} output tokens")
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=args.output_len[1])
    enable_step_hooks(model)
    log = StepLog(model)
    engines = {name: new_engine(model, name, generation, args, info["top_k"]) for name in args.configs}
    warm = make_stream(argparse.Namespace(**{**vars(stream_args), "requests": min(8, len(stream)), "seed": args.seed + 1,
                                             "rate": 1e6}), source, model.config.vocab_size)
    runs = {name: [] for name in args.configs}
    try:
        with torch.no_grad():
            for name, engine in engines.items():  # compile (and warm) every configuration before timing
                start = time.perf_counter()
                if engine.compiled:
                    engine.manager.warmup()
                run = run_stream(model, engine, warm, log, layers, f"{key} warm-up {name}")
                engine.warm_s = time.perf_counter() - start
                tqdm.write(f"  {name}: compile + warm-up {engine.warm_s:.1f} s ({run['experts_calls']} lynx experts "
                           f"calls, {run['routing_calls']} routing calls)")
            order = list(args.configs)
            with tqdm(total=args.rounds * len(order), desc=f"{key} streams") as bar:
                for rnd in range(args.rounds):
                    shift = rnd % len(order)
                    for name in order[shift:] + order[:shift]:
                        run = run_stream(model, engines[name], stream, log, layers, f"{key} round {rnd} {name}")
                        run["summary"] = summarise_run(run)
                        runs[name].append(run)
                        bar.update(1)
                        s = run["summary"]
                        tqdm.write(f"  round {rnd} {name}: {s['tokens_per_s']:.1f} tok/s, TPOT {s['tpot_median_ms']:.1f} "
                                   f"ms, TTFT {s['ttft_median_ms']:.0f} ms, experts/decode step "
                                   f"{_fmt(s['distinct_per_decode_step'], '.1f')}, lynx experts calls {run['experts_calls']}, "
                                   f"recompiles {run['recompiles']}")
    finally:
        log.handle.remove()
        for engine in engines.values():
            engine.manager.destroy()
    return dict(model=key, info=info, runs=runs, warm_s={n: e.warm_s for n, e in engines.items()})


# --- the report -----------------------------------------------------------------------------

def _fmt(value, spec=".1f"):
    return "-" if value is None or value != value else format(value, spec)


def combine(result: dict, configs: list[str]) -> list[dict]:
    """One row per configuration: medians over rounds, ratios to Inductor, token agreement."""
    runs = result["runs"]
    rows = []
    for name in configs:
        summaries = [r["summary"] for r in runs[name]]
        row = dict(model=result["model"], config=name, rounds=len(summaries))
        for key in summaries[0]:
            values = [s[key] for s in summaries if s[key] is not None]
            row[key] = median(values) if values else None
        row["recompiles_timed"] = sum(r["recompiles"] for r in runs[name])
        row["warm_s"] = result["warm_s"][name]
        if "eager" in runs and name != "eager":
            pairs = [agreement(r["requests"], e["requests"]) for r, e in zip(runs[name], runs["eager"])]
            row["identical_to_eager"] = f"{sum(p['identical_requests'] for p in pairs)}/{sum(p['requests'] for p in pairs)}"
            row["agreement_eager"] = sum(p["token_agreement"] for p in pairs) / len(pairs)
        if "lynx off" in runs and name in SELECTOR_POLICIES:
            pairs = [agreement(r["requests"], o["requests"]) for r, o in zip(runs[name], runs["lynx off"])]
            row["agreement_lynx_off"] = sum(p["token_agreement"] for p in pairs) / len(pairs)
        rows.append(row)
    base = next((r for r in rows if r["config"] == "inductor"), None)
    for row in rows:
        row["tokens_per_s_vs_inductor"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def markdown(meta: dict, results: list[dict], tables: dict) -> str:
    m = meta["machine"]
    lines = ["# Serving benchmark: continuous batching, eager vs Inductor vs lynx", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores_available']} cores, {m['threads']} threads, ISA flags "
             f"{m['bf16_flags']}, caches {m['caches']}, streaming read "
             f"{_fmt(m.get('read_bandwidth_GBps'))} GB/s; torch {m['torch']}, transformers {m['transformers']}. "
             f"Load average (1, 5, 15 min) at start {meta['load_start']}, at end {meta['load_end']}; "
             f"`uptime` at end: `{meta['uptime_end']}`. Run took {meta['duration_s'] / 60:.1f} min; "
             f"{meta['args']['rounds']} interleaved round(s) per model, medians over rounds.", ""]
    for result in results:
        info, rows = result["info"], tables[result["model"]]
        lines += [f"## {info['name']}", "",
                  f"{info['layers']} MoE layers, E={info['experts']}, k={info['top_k']}, {info['dtype']}. "
                  f"{info['requests']} requests, Poisson arrivals at {info['rate']}/s (last arrival at "
                  f"{info['stream_span_s']:.1f} s), prompts {meta['args']['prompt_len']} tokens, outputs "
                  f"{meta['args']['output_len']} tokens ({info['output_tokens']} in all)."
                  + (f" Experts {info['expert_mib']:.1f} MiB each ({info['layer_mib']:.0f} MiB per layer); routers "
                     f"scaled to logit std {info['router_std']:.2f}." if "expert_mib" in info else ""), "",
                  "| config | output tok/s (vs Inductor) | TPOT median / p90 ms | TTFT median / p90 ms | decode steps "
                  "| seqs / decode step | experts read / layer / decode step | decode calls re-routed | "
                  "same tokens as eager | token agreement with lynx off |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            share = "-" if r["rerouted_share"] is None else f"{100 * r['rerouted_share']:.0f}% of {r['decode_routing_calls']:.0f}"
            if r["rerouted_share"] is not None and r["prefill_rerouted"]:
                share += f" (prefill: {r['prefill_rerouted']:.0f}!)"
            same = "-" if "identical_to_eager" not in r else \
                f"{r['identical_to_eager']} requests ({100 * r['agreement_eager']:.1f}% tokens)"
            lines.append(
                f"| {r['config']} | {r['tokens_per_s']:.1f} ({_fmt(r['tokens_per_s_vs_inductor'], '.2f')}) | "
                f"{r['tpot_median_ms']:.1f} / {r['tpot_p90_ms']:.1f} | {r['ttft_median_ms']:.0f} / {r['ttft_p90_ms']:.0f} | "
                f"{r['decode_steps']:.0f} | {_fmt(r['decode_sequences'], '.0f')} | "
                f"{_fmt(r['distinct_per_decode_step'])} | {share} | {same} | "
                f"{_fmt(100 * r['agreement_lynx_off'] if r.get('agreement_lynx_off') is not None else None)}"
                f"{'%' if r.get('agreement_lynx_off') is not None else ''} |")
        lines += ["", "Compile + warm-up before timing (s): "
                  + ", ".join(f"{r['config']} {r['warm_s']:.0f}" for r in rows)
                  + ". Recompiles while timed: " + ", ".join(f"{r['config']} {r['recompiles_timed']}" for r in rows) + ".", ""]
    lines += [
        "Notes: the stream arrives in real time, so batch composition follows each configuration's own speed "
        "(a faster one holds fewer sequences per step). Experts read counts every row the experts run on: "
        "the compiled configurations pad the token count, and under lynx off padded rows route like tokens "
        "(under a selector policy they only use experts the live rows chose); Inductor fuses the routing, so "
        "it has no count (its rule is eager's). Token agreement is position-wise over all output tokens. "
        "The selector policies ran with observe=" + str(meta["args"]["observe"]) + " (True: the selector is an "
        "unfused op so every routing call is recorded).", ""]
    return "\n".join(lines)


def plot(path: Path, results: list[dict], configs: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: f"C{i}" for i, name in enumerate(ALL_CONFIGS)}  # one colour per configuration in every panel
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 6.5), squeeze=False, sharex="col")
    for col, result in enumerate(results):
        top, bottom = axes[0][col], axes[1][col]
        for name in configs:
            steps = [s for s in result["runs"][name][0]["steps"] if s["decode"]]
            times = [s["time"] for s in steps]
            distinct = [s["distinct"] for s in steps]
            if any(d is not None for d in distinct):
                top.plot(times, distinct, label=name, lw=1, color=colors[name])
            bottom.plot(times, [s["sequences"] for s in steps], label=name, lw=1, color=colors[name])
        top.set_title(f"{result['info']['name']} (round 0)")
        top.set_ylabel("experts read / layer / decode step")
        bottom.set_ylabel("sequences in the decode step")
        bottom.set_xlabel("seconds since the first arrival")
        top.axhline(result["info"]["experts"], color="grey", lw=0.5, ls="--")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out: Path, meta: dict, results: list[dict], configs: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tables = {r["model"]: combine(r, configs) for r in results}
    rows = [row for t in tables.values() for row in t]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                                                     if k in rows[0] else 99))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "requests.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "config", "round", "request", "prompt_len", "new_tokens", "arrival_s", "ttft_s",
                         "tpot_s", "finish_s"])
        for r in results:
            for name in configs:
                for rnd, run in enumerate(r["runs"][name]):
                    for q in run["requests"]:
                        writer.writerow([r["model"], name, rnd, q["request"], q["prompt_len"], q["new_tokens"],
                                         f"{q['arrival']:.4f}", f"{q['ttft']:.4f}",
                                         "" if q["tpot"] is None else f"{q['tpot']:.5f}", f"{q['finish']:.4f}"])
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "config", "round", "time_s", "decode", "sequences", "tokens", "rows",
                         "distinct_experts", "routing_calls", "rerouted"])
        for r in results:
            for name in configs:
                for rnd, run in enumerate(r["runs"][name]):
                    for s in run["steps"]:
                        writer.writerow([r["model"], name, rnd, f"{s['time']:.4f}", int(s["decode"]), s["sequences"],
                                         s["tokens"], s["rows"], "" if s["distinct"] is None else f"{s['distinct']:.2f}",
                                         s["routing_calls"], s["rerouted"]])
    (out / "report.md").write_text(markdown(meta, results, tables))
    slim = [dict(model=r["model"], info=r["info"], warm_s=r["warm_s"],
                 summaries={n: [run["summary"] for run in r["runs"][n]] for n in configs}) for r in results]
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=slim, tables=tables), indent=1, default=str))
    plot(out / "experts_per_step.png", results, configs)
    return tables


# --- main -----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,olmoe", help="comma-separated: tiny (quality), olmoe (speed)")
    p.add_argument("--configs", default="eager,inductor,lynx off,lynx on", help="subset of: " + ", ".join(ALL_CONFIGS))
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=None,
                   help=f"arrivals per second (default per model: {', '.join(f'{k} {v}' for k, v in RATES.items())})")
    p.add_argument("--prompt-len", type=parse_range, default=(8, 96), help="prompt lengths, LO-HI tokens")
    p.add_argument("--output-len", type=parse_range, default=(16, 64), help="output lengths, LO-HI tokens")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each configuration once per round)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the OLMoE-shape model")
    p.add_argument("--num-blocks", type=int, default=48, help="KV cache blocks (CB sizes it from RAM otherwise)")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="CB's token budget per step")
    p.add_argument("--max-batch-requests", type=int, default=32, help="CB's sequences per step")
    p.add_argument("--q-padding", type=int, default=16,
                   help="compiled configurations pad a step's tokens to a multiple of this (CB's default: 64)")
    p.add_argument("--kv-padding", type=int, default=256,
                   help="... and its KV reads to a multiple of this (CB's default 16384: the whole cache on CPU)")
    p.add_argument("--observe", action=argparse.BooleanOptionalAction, default=True,
                   help="keep lynx's selector an unfused op so re-routing is counted (default on)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/serve")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 12 requests, outputs 4-12, prompts 8-32, 1 round, OLMoE shape with tiny experts")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in dict(requests=12, output_len=(4, 12), prompt_len=(8, 32), rounds=1).items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        if args.out == p.get_default("out"):
            args.out = "out/serve-quick"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if set(args.models) - set(LOADERS):
        p.error(f"unknown models {sorted(set(args.models) - set(LOADERS))}; valid: {', '.join(LOADERS)}")
    if set(args.configs) - set(ALL_CONFIGS) or not args.configs:
        p.error(f"unknown configs {sorted(set(args.configs) - set(ALL_CONFIGS))}; valid: {', '.join(ALL_CONFIGS)}")
    if args.requests < 2 or args.rounds < 1:
        p.error("--requests must be >= 2 and --rounds >= 1")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return args


def uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    dynamo_limits()
    out = Path(args.out)
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]),
                args={k: v for k, v in vars(args).items()}, machine=dm.machine_info(args.threads),
                load_start=dm._loadavg(), uptime_start=uptime())
    tqdm.write(f"machine: {meta['machine']['cpu']}, {args.threads} threads; {meta['uptime_start']}")
    results = []
    for key in args.models:
        torch._dynamo.reset()  # each model starts with empty dynamo caches
        results.append(bench_model(key, args, meta))
        meta.update(duration_s=time.perf_counter() - started, load_end=dm._loadavg(), uptime_end=uptime())
        tables = write_all(out, meta, results, args.configs)
    print()
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, summary.csv, requests.csv, steps.csv, results.json, experts_per_step.png "
          f"({meta['duration_s'] / 60:.1f} min)")
    return tables


if __name__ == "__main__":
    main()

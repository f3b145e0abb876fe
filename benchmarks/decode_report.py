"""Tables, CSV, markdown and plots for ``benchmarks/decode.py``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

PLAIN_SOURCES = ("eager", "lynx off")  # backends whose experts see plain top-k routing


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(args, meta, step_rows, routing, warmups, tokens_same, names) -> dict:
    """Medians per (backend, batch), ratios to Inductor, routing and bytes, overhead, verdicts."""
    import decode_model as dm

    wb = meta["model"]["bytes"]
    experts, top_k = meta["model"]["experts"], meta["model"]["top_k"]
    rows = []
    batches = sorted({r["batch"] for r in step_rows})
    for batch in batches:
        counts = routing.get(batch, {})
        plain = next((_mean(counts[n]["distinct"]) for n in PLAIN_SOURCES if n in counts), float("nan"))
        for name in names:
            times = [r["seconds"] for r in step_rows if r["backend"] == name and r["batch"] == batch]
            if not times:
                continue
            reps = {}
            for r in step_rows:
                if r["backend"] == name and r["batch"] == batch:
                    reps.setdefault(r["rep"], []).append(r["seconds"])
            rep_medians = [_quantile(v, 0.5) for v in reps.values()]
            med = _quantile(times, 0.5)
            distinct = _mean(counts[name]["distinct"]) if name in counts else plain
            row = dict(backend=name, batch=batch, median_step_ms=1e3 * med,
                       p25_step_ms=1e3 * _quantile(times, 0.25), p75_step_ms=1e3 * _quantile(times, 0.75),
                       rep_median_min_ms=1e3 * min(rep_medians), rep_median_max_ms=1e3 * max(rep_medians),
                       steps_timed=len(times), tokens_per_s=batch / med, distinct_experts_per_layer=distinct,
                       expert_MB_per_step=distinct * wb["per_expert"] * wb["moe_layers"] / 1e6)
            row["expert_GBps"] = row["expert_MB_per_step"] / 1e3 / med
            row["same_tokens_as_eager"] = tokens_same.get(batch, {}).get(name)
            rows.append(row)
        ind = next((r for r in rows if r["backend"] == "inductor" and r["batch"] == batch), None)
        for r in rows:
            if r["batch"] == batch:
                r["ratio_vs_inductor"] = ind["median_step_ms"] / r["median_step_ms"] if ind else float("nan")

    route_rows = []
    for batch in batches:
        counts = routing.get(batch, {})
        on = counts.get("lynx on")
        plain = next((counts[n] for n in PLAIN_SOURCES if n in counts), None)
        route_rows.append(dict(
            batch=batch, uniform=dm.uniform_distinct(experts, top_k, batch),
            plain=_mean(plain["distinct"]) if plain else float("nan"),
            lynx_on=_mean(on["distinct"]) if on else float("nan"),
            lynx_on_plain_same_logits=_mean(on["plain_distinct"]) if on and on["plain_distinct"] else float("nan"),
            mass_kept=_mean(on["mass_kept"]) if on and on["mass_kept"] else float("nan"),
            top1_kept=_mean(on["top1_kept"]) if on and on["top1_kept"] else float("nan"),
            tokens_rerouted=(on["tokens_rerouted"] / on["tokens"]) if on and on["tokens"] else float("nan"),
        ))

    overhead = []
    for batch in batches:
        off = next((r for r in rows if r["backend"] == "lynx off" and r["batch"] == batch), None)
        keep = next((r for r in rows if r["backend"] == "lynx keep" and r["batch"] == batch), None)
        k = routing.get(batch, {}).get("lynx keep")
        if not (off and keep and k):
            continue
        overhead.append(dict(
            batch=batch, lynx_off_ms=off["median_step_ms"], lynx_keep_ms=keep["median_step_ms"],
            overhead_ms=keep["median_step_ms"] - off["median_step_ms"],
            overhead_pct=100 * (keep["median_step_ms"] / off["median_step_ms"] - 1),
            selector_calls=k["selector_calls"], tokens_checked=k["tokens"], tokens_changed=k["tokens_rerouted"],
            distinct_keep=_mean(k["distinct"]),
            distinct_off=_mean(routing[batch]["lynx off"]["distinct"]) if "lynx off" in routing[batch] else float("nan"),
        ))

    selector = []
    for sel in meta.get("selector_op", []):
        on = next((r for r in rows if r["backend"] == "lynx on" and r["batch"] == sel["batch"]), None)
        per_step_ms = (sel["selector_us"] - sel["plain_us"]) * wb["moe_layers"] / 1e3
        selector.append(dict(sel, extra_ms_per_step=per_step_ms,
                             pct_of_lynx_on_step=100 * per_step_ms / on["median_step_ms"] if on else float("nan")))

    return dict(rows=rows, routing=route_rows, overhead=overhead, selector_op=selector, compile=meta.get("compile", []),
                warmups=warmups, verdicts=verdicts(args, rows, meta.get("compile", [])))


def verdicts(args, rows, compile_rows) -> list[dict]:
    b = args.target_batch
    get = {(r["backend"], r["batch"]): r for r in rows}
    out = []
    on, off, ind = get.get(("lynx on", b)), get.get(("lynx off", b)), get.get(("inductor", b))
    if on and ind:
        ratio = on["tokens_per_s"] / ind["tokens_per_s"]
        out.append(dict(target=f"lynx on >= 1.3x Inductor tokens/s at batch {b}", value=f"{ratio:.2f}x",
                        met=ratio >= 1.3))
    if off and ind:
        ratio = off["tokens_per_s"] / ind["tokens_per_s"]
        out.append(dict(target=f"lynx off within 5% of Inductor tokens/s at batch {b}", value=f"{ratio:.3f}x",
                        met=abs(ratio - 1) <= 0.05))
    cmp = {r["backend"]: r["compile_s"] for r in compile_rows}
    if "inductor" in cmp:
        for name in ("lynx on", "lynx off"):
            if name in cmp:
                ratio = cmp[name] / cmp["inductor"]
                out.append(dict(target=f"{name} compile time <= 1.2x Inductor's", met=ratio <= 1.2,
                                value=f"{cmp[name]:.1f} s vs {cmp['inductor']:.1f} s = {ratio:.2f}x"))
    return out


# --- output -----------------------------------------------------------------------------------

def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return str(v)


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def console_table(results, names) -> str:
    rows = results["rows"]
    batches = sorted({r["batch"] for r in rows})
    get = {(r["backend"], r["batch"]): r for r in rows}
    header = ["batch"] + [f"{n} tok/s (x ind)" for n in names]
    body = []
    for b in batches:
        cells = [str(b)]
        for n in names:
            r = get.get((n, b))
            cells.append("-" if r is None else f"{r['tokens_per_s']:.1f} ({r['ratio_vs_inductor']:.2f})")
        body.append(cells)
    return "\n".join(_table(header, body))


def markdown(args, meta, results, names) -> str:
    m, mach, router = meta["model"], meta["machine"], meta["router"]
    wb = m["bytes"]
    L = []
    L += ["# Decode benchmark: eager vs Inductor vs lynx", ""]
    L += [f"Command: `{meta['command']}`  ", f"Started {meta['started']}" +
          (f", finished {meta['finished']} ({meta['duration_s'] / 60:.1f} min)." if "finished" in meta else
           " (in progress: partial results).")]
    if m["quick"]:
        L += ["", "**Quick smoke run: tiny experts that fit in the CPU caches, one repetition. The numbers "
              "only show that the pipeline works; they say nothing about performance.**"]
    L += ["", "## Machine", ""]
    caches = ", ".join(f"{k} {v}" for k, v in mach["caches"].items())
    L += [f"- CPU: {mach['cpu']}; caches: {caches}; bf16 instructions: {mach.get('bf16_flags', '?')}",
          f"- threads used: {mach['threads']} of {mach['cores_available']} cores available; "
          f"OMP_WAIT_POLICY={mach['omp_wait_policy']}",
          f"- load average at start: {mach['loadavg']}" + (f"; at end: {mach['loadavg_end']}" if "loadavg_end" in mach else "")
          + " (a load above the thread count means other work shared the cores: timings are noisy)",
          f"- streaming read bandwidth (max over one layer's expert weights): {mach.get('read_bandwidth_GBps', float('nan')):.1f} GB/s",
          f"- Python {mach['python']}, torch {mach['torch']}, transformers {mach['transformers']}"]
    L += ["", "## Model", ""]
    L += [f"- {m['shape']} MoE layer shape ({m['family']} family): hidden {m['hidden']}, expert intermediate "
          f"{m['expert_inter']}, E={m['experts']}, k={m['top_k']}, "
          f"{'renormalised' if m['norm_topk_prob'] else 'not renormalised'} top-k weights; {m['layers']} layers, "
          f"{m['heads']} attention heads, vocab {m['vocab']}, {m['dtype']}",
          f"- expert bytes: {wb['per_expert'] / 2**20:.2f} MiB per expert, {wb['per_layer'] / 2**20:.1f} MiB per MoE "
          f"layer ({wb['per_layer'] / 2**20 / _l3_mib(mach):.1f}x the L3 cache), "
          f"{wb['experts_total'] / 2**30:.2f} GiB in all; other weights {wb['other'] / 2**20:.1f} MiB",
          "- a decode step reads (distinct experts per layer) x (bytes per expert) x (layers) of expert weights"]
    on = next((r for r in results["compile"] if r["backend"] == "lynx on"), None)
    if on:
        settings = {(x["alpha"], x["beta"], x["settings"]) for rep in on["reports"] for x in rep["matched"]}
        layers = sum(len(rep["matched"]) for rep in on["reports"])
        for alpha, beta, source in sorted(settings, key=str):
            L += [f"- lynx on settings (from the report, {layers} matched layer calls over "
                  f"{len(on['reports'])} graphs): alpha={alpha}, beta={beta} ({source})"]
        unmatched = [u for rep in on["reports"] for u in rep["unmatched"]]
        if unmatched:
            L += ["- lynx left unchanged: " + "; ".join(f"{u['module']} ({u['reason']})" for u in unmatched)]
    L += [f"- lynx keep: alpha={args.keep_alpha} (every expert in bin 0: plain top-k, selector still runs)"]

    L += ["", "## Router realism", ""]
    before, after, ref = router["before"], router["after"], router.get("reference")

    def stat_row(label, s):
        mean = lambda k: sum(s[k]) / len(s[k])  # noqa: E731
        return [label, s["num_experts"], s["top_k"], _fmt(mean("logit_std"), ".3f"), _fmt(mean("top1_prob"), ".3f"),
                _fmt(mean("entropy"), ".2f"), _fmt(math.log(s["num_experts"]), ".2f"), _fmt(mean("topk_mass"), ".3f"),
                _fmt(mean("load_cv"), ".2f"),
                " / ".join(_fmt(sum(g[i] for g in s["gaps"]) / len(s["gaps"]), ".2f") for i in range(len(s["gaps"][0])))
                if s.get("gaps") else "-"]

    L += [f"Matched: the per-token standard deviation of the router logits over the experts (mean over "
          f"tokens and layers), in decode steps, set to {router['target_std']:.3f}: {router['how']}. Each layer's "
          f"router weight was scaled (x{', x'.join(f'{s:.2f}' for s in router['scales'])}).", ""]
    hdr = ["routers", "E", "k", "logit std", "top-1 prob", "entropy (nats)", "uniform entropy", "top-k mass",
           "load CV", "best minus 2nd / 4th / 8th logit"]
    body = []
    if ref:
        body.append(stat_row(ref["source"], ref))
    log = router.get("reference_log")
    if log:
        body.append([f"training log, step {log.get('step')} (held-out)", log.get("experts", "-"), log.get("top_k") or "-", "-",
                     _fmt(_mean(log["router_top1_prob"]), ".3f"), _fmt(_mean(log.get("router_entropy_nats", [])), ".2f"),
                     _fmt(log.get("router_entropy_max_nats"), ".2f"), _fmt(_mean(log.get("router_topk_mass", [])), ".3f"), "-", "-"])
    body.append(stat_row("this model, random init", before))
    body.append(stat_row("this model, routers scaled (benchmarked)", after))
    L += _table(hdr, body)
    L += ["", "top-k mass: probability of each row's own k best experts (k of that row). Load CV: coefficient "
          "of variation of the top-k assignment counts over the experts (trained model: held-out text; this "
          "model: decode steps of random prompts). The gaps (mean over tokens, logits) decide the Lynx bins "
          "(1/alpha logits wide). Only one number is matched (see above); a trained router is peakier than "
          "Gaussian logits (a clear best expert over a flatter rest), and its expert popularity skew and "
          "the correlation between the tokens of a batch are not reproduced: both would lower the plain "
          "distinct-expert count below this model's (close to the uniform-routing curve)."]

    rows = results["rows"]
    get = {(r["backend"], r["batch"]): r for r in rows}
    batches = sorted({r["batch"] for r in rows})
    L += ["", "## Decode throughput", "",
          "Median time per decode step over all timed steps (all repetitions); tokens/s = batch / median step; "
          "x ind = tokens/s relative to Inductor. IQR: 25th-75th percentile of the step times.", ""]
    hdr = ["batch"] + [f"{n} ms (IQR)" for n in names] + [f"{n} tok/s (x ind)" for n in names]
    body = []
    for b in batches:
        cells = [b]
        for n in names:
            r = get.get((n, b))
            cells.append("-" if not r else f"{r['median_step_ms']:.1f} ({r['p25_step_ms']:.1f}-{r['p75_step_ms']:.1f})")
        for n in names:
            r = get.get((n, b))
            cells.append("-" if not r else f"{r['tokens_per_s']:.1f} ({r['ratio_vs_inductor']:.2f}x)")
        body.append(cells)
    L += _table(hdr, body)

    L += ["", "## Experts read per decode step", "",
          "Distinct experts per MoE layer per decode step (mean over layers and steps). Plain: eager (from the "
          "experts' inputs) or lynx off (capture_routing); Inductor routes exactly as eager. lynx on: "
          "capture_routing; 'plain, same logits': plain top-k of the very logits the selector saw. Uniform: "
          "E(1-(1-k/E)^B). Mass kept: routing probability of lynx's choices / plain top-k's; top-1 kept: tokens that keep their best expert; tokens re-routed: tokens whose experts are not their k best (ties count as equal). Expert MB per step "
          f"= distinct x bytes per expert x layers; GB/s = that / median step time (expert bytes only: each step "
          f"also reads the {wb['other'] / 2**20:.1f} MiB of other weights).", ""]
    hdr = ["batch", "uniform", "plain", "lynx on", "plain, same logits", "plain MB/step", "lynx on MB/step",
           "mass kept", "top-1 kept", "tokens re-routed", "inductor GB/s", "lynx off GB/s", "lynx on GB/s"]
    body = []
    per_expert, layers = wb["per_expert"], wb["moe_layers"]
    for rr in results["routing"]:
        b = rr["batch"]
        gbps = lambda n: _fmt(get[(n, b)]["expert_GBps"], ".1f") if (n, b) in get else "-"  # noqa: E731
        body.append([b, _fmt(rr["uniform"], ".1f"), _fmt(rr["plain"], ".1f"), _fmt(rr["lynx_on"], ".1f"),
                     _fmt(rr["lynx_on_plain_same_logits"], ".1f"), _fmt(rr["plain"] * per_expert * layers / 1e6, ".0f"),
                     _fmt(rr["lynx_on"] * per_expert * layers / 1e6, ".0f"), _fmt(rr["mass_kept"], ".3f"),
                     _fmt(rr["top1_kept"], ".3f"), _fmt(rr["tokens_rerouted"], ".2f"), gbps("inductor"),
                     gbps("lynx off"), gbps("lynx on")])
    L += _table(hdr, body)
    differ = {}
    for r in rows:
        if r["same_tokens_as_eager"] is False and r["backend"] != "lynx on":
            differ.setdefault(r["backend"], []).append(str(r["batch"]))
    L += ["", "Greedy tokens (plain-routing backends) equal to eager's: " + (
          "at every batch size." if not differ else "except " + "; ".join(
              f"{n} at batch {', '.join(b)}" for n, b in differ.items()) +
          f" ({m['dtype']}: compiled kernels round differently and a random model's near-tied logits flip; the "
          "routing itself is plain top-k, as the distinct-expert counts show).")]

    L += ["", "## Compile time", ""]
    if results["compile"]:
        cold = results["compile"][0]["cold"]
        L += [f"First prefill call + first decode call at batch {results['compile'][0]['batch']} (the calls that "
              f"compile), minus the same calls once compiled; measured once per backend, "
              + ("each in a fresh, empty Inductor cache (cold compile)." if cold else
                 "with the normal Inductor cache (**warm: compile times are not comparable to a cold run**).")
              + f" One-time set-up first, charged to no backend (a tiny Inductor compile, and dynamo + "
              f"AOTAutograd tracing this model with backend aot_eager): {meta.get('setup_s', float('nan')):.1f} s.", ""]
        hdr = ["backend", "compile s", "prefill compile s", "decode compile s", "x Inductor", "first prefill s",
               "first decode s", "steady prefill s", "steady decode s"]
        ind = next((r["compile_s"] for r in results["compile"] if r["backend"] == "inductor"), None)
        body = [[r["backend"], _fmt(r["compile_s"], ".1f"), _fmt(r["prefill_compile_s"], ".1f"),
                 _fmt(r["decode_compile_s"], ".1f"), _fmt(r["compile_s"] / ind if ind else None, ".2f"),
                 _fmt(r["prefill_first_s"], ".2f"), _fmt(r["decode_first_s"], ".2f"), _fmt(r["prefill_steady_s"], ".2f"),
                 _fmt(r["decode_steady_s"], ".3f")] for r in results["compile"]]
        L += _table(hdr, body)
        warm = {}
        for w in results["warmups"]:
            warm.setdefault(w["backend"], []).append(f"{w['batch']}: {w['warmup_s']:.1f}")
        L += ["", f"Warm-up ({args.warmup_steps} decode steps per backend per batch size; a recompile for a new "
              f"shape shows here, seconds by batch size): " + "; ".join(f"{n}: {', '.join(v)}" for n, v in warm.items())]

    if results["overhead"]:
        L += ["", "## Selector overhead", "",
              f"lynx keep (alpha={args.keep_alpha}: the selector runs, every expert is in bin 0, so it keeps "
              "each token's plain top-k) against lynx off (no selector), same experts op and Inductor. "
              "'tokens changed': tokens whose experts' logits are not their k largest (ties "
              "count as equal; must be 0).", ""]
        hdr = ["batch", "lynx off ms", "lynx keep ms", "overhead ms", "overhead %", "selector calls",
               "tokens checked", "tokens changed", "distinct keep / off"]
        body = [[o["batch"], _fmt(o["lynx_off_ms"], ".1f"), _fmt(o["lynx_keep_ms"], ".1f"), _fmt(o["overhead_ms"], "+.2f"),
                 _fmt(o["overhead_pct"], "+.1f"), o["selector_calls"], o["tokens_checked"], o["tokens_changed"],
                 f"{_fmt(o['distinct_keep'], '.1f')} / {_fmt(o['distinct_off'], '.1f')}"] for o in results["overhead"]]
        L += _table(hdr, body)
        if results.get("selector_op"):
            L += ["", "The selector op alone (`torch.ops.lynx.select_experts` on the decode-step router logits "
                  "lynx on saw, lynx on's alpha/beta) against the router's own plain top-k (fp32 softmax, top-k"
                  + (", renormalise" if m["norm_topk_prob"] else "") + "): median microseconds per MoE layer call, "
                  "and the difference per decode step (x layers) as a share of lynx on's median step. Much less "
                  "noisy than the end-to-end difference above.", ""]
            L += _table(["batch", "selector us / call", "plain top-k us / call", "extra ms / step",
                         "% of lynx on step"],
                        [[x["batch"], _fmt(x["selector_us"], ".0f"), _fmt(x["plain_us"], ".0f"),
                          _fmt(x["extra_ms_per_step"], ".2f"), _fmt(x["pct_of_lynx_on_step"], ".2f")]
                         for x in results["selector_op"]])
        bad = [o["batch"] for o in results["overhead"] if o["tokens_changed"] or (o["batch"] >= 2 and not o["selector_calls"])]
        L += ["", "Plain routing reproduced by lynx keep: " + ("yes, at every batch size (the selector ran at "
              "batch >= 2; batch 1 is plain top-k by rule)." if not bad else f"**NO at batch {bad}**")]

    L += ["", "## Targets", "", f"Assessed at batch {args.target_batch} on this run's shape. "
          + ("Quick run: not meaningful." if m["quick"] else "Timings from this machine; see the load average above."), ""]
    L += _table(["target", "measured", "verdict"],
                [[v["target"], v["value"], "met" if v["met"] else "**not met**"] for v in results["verdicts"]])
    return "\n".join(L) + "\n"


def _l3_mib(mach) -> float:
    text = mach["caches"].get("L3", "32 MiB")
    try:
        value, unit = text.split()[:2]
        return float(value) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(unit, 1)
    except ValueError:
        return 32.0


def plots(out_dir: Path, results, meta, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    batches = sorted({r["batch"] for r in rows})
    title = f"{meta['model']['shape']} MoE shape, {meta['model']['layers']} layers, {meta['model']['dtype']}" + \
        (" (quick)" if meta["model"]["quick"] else "")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n in names:
        pts = [(r["batch"], r["tokens_per_s"]) for r in rows if r["backend"] == n]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Decode throughput, {title}\n{meta['machine']['cpu']}, {meta['machine']['threads']} threads", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "tokens_per_s.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rr = results["routing"]
    xs = [r["batch"] for r in rr]
    ax.plot(xs, [r["uniform"] for r in rr], ls=":", color="gray", label="uniform routing E(1-(1-k/E)^B)")
    ax.plot(xs, [r["plain"] for r in rr], marker="o", label="plain top-k")
    ax.plot(xs, [r["lynx_on"] for r in rr], marker="s", label="lynx on")
    ax.axhline(meta["model"]["experts"], color="k", lw=0.8, ls="--", label=f"E = {meta['model']['experts']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(b) for b in xs])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("distinct experts per MoE layer per decode step")
    ax.set_title(f"Experts read per decode step, {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "distinct_experts.png", dpi=120)
    plt.close(fig)


def write_all(out_dir: Path, args, meta, results, step_rows) -> None:
    names = args.backends
    rows = results["rows"]
    if rows:
        with open(out_dir / "summary.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    with open(out_dir / "steps.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["backend", "batch", "rep", "step", "seconds"])
        w.writeheader()
        w.writerows(step_rows)
    compile_rows = [{k: v for k, v in r.items() if k != "reports"} for r in results["compile"]]
    (out_dir / "results.json").write_text(json.dumps(
        dict(meta={k: v for k, v in meta.items() if k != "compile"}, compile=compile_rows,
             lynx_reports={r["backend"]: r["reports"] for r in results["compile"]},
             **{k: v for k, v in results.items() if k != "compile"}), indent=1, default=str))
    (out_dir / "report.md").write_text(markdown(args, meta, results, names))
    if rows:
        plots(out_dir, results, meta, names)

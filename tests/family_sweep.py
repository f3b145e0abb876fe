"""Every transformers family with ``@use_experts_implementation`` through lynx: each MoE block
is either rewritten and correct, or left untouched with a reason. Never a wrong output.

Per family (tiny model from ``family_zoo``; the whole model, or with ``scope="block"`` its
first MoE block alone), the rewritten graph runs as is (``compiler="eager"``) on a prefill:
routing stays plain, so the output must equal the eager model's. This checks both rewrites end
to end: a misread router rule (renormalising, scaling, groups, bias) or experts layout changes
the output. Then a decode step runs (``decode=True``), and each selector call must re-route and
choose exactly what the reference selector chooses on its logits under the matched rule.

``python tests/family_sweep.py [family ...]`` prints the status table used in README.md.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import family_zoo  # noqa: E402

from lynx_compile import capture_routing, collect_reports  # noqa: E402
from lynx_compile.selector import reference_route  # noqa: E402


@dataclass
class SweepResult:
    family: str
    status: str  # "rewritten", "partly rewritten", "left unchanged", "not built"
    matched: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    rewritten: int = 0  # blocks whose experts ran through lynx's op in one forward
    rules: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # wrong outputs or choices: must be empty
    seconds: float = 0.0


def _run(fn, *args, **options):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="lynx", options={"compiler": "eager", **options})
    with torch.no_grad(), capture_routing() as cap, collect_reports() as reports:
        out = compiled(*args)
    return _main_output(out), cap, reports


def _main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else torch.utils._pytree.tree_leaves(out)[0]


def _target(entry, scope: str, gen: torch.Generator):
    """(function, prefill args, decode args, blocks it runs). Scope "block" compiles the first
    MoE block alone (fast); "model", or a block that needs more than its hidden states, the model."""
    model = entry.model
    if scope == "block":
        block = model.get_submodule(entry.moe_blocks[0])
        hidden = model.config.get_text_config(decoder=True).hidden_size
        prefill, decode = torch.randn(2, 5, hidden, generator=gen), torch.randn(8, 1, hidden, generator=gen)
        try:
            with torch.no_grad():
                block(prefill)
            return block.forward, (prefill,), (decode,), entry.moe_blocks[:1]
        except Exception:  # noqa: BLE001  (e.g. gemma4's block is a decoder layer)
            pass
    vocab = entry.vocab_size

    def forward(input_ids):
        return model(input_ids=input_ids, use_cache=False)

    prefill = torch.randint(3, vocab, (2, 5), generator=gen)
    decode = torch.randint(3, vocab, (8, 1), generator=gen)
    return forward, (prefill,), (decode,), list(entry.moe_blocks)


def sweep_family(family: str, scope: str = "model", decode: bool = True) -> SweepResult:
    start = time.perf_counter()
    entry = family_zoo.build(family)
    if entry.model is None:
        return SweepResult(family, "not built", reasons=[entry.skip_reason])
    fn, prefill, decode_args, blocks = _target(entry, scope, torch.Generator().manual_seed(0))
    result = SweepResult(family, "", blocks=blocks)
    with torch.no_grad():
        expected = _main_output(fn(*prefill))

    out, prefill_cap, reports = _run(fn, *prefill)
    matched = [m for r in reports for m in r.matched]
    result.matched = sorted({m.module for m in matched})
    result.rules = sorted({f"{m.rule}; {m.layout}, {m.activation}" for m in matched})
    result.reasons = sorted({f"{u.module}: {u.reason}" for r in reports for u in r.unmatched})
    result.problems += [f"matcher crashed: {r}" for r in result.reasons if "matcher error" in r]
    if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
        err = (out - expected).abs().max().item()
        result.problems.append(f"prefill output differs from eager by {err:.3g}")

    if matched and decode:
        _, cap, _ = _run(fn, *decode_args)
        if not cap.routing or not all(e.rerouted for e in cap.routing):
            result.problems.append("a decode step was not re-routed")
        for event in cap.routing:
            top_k = event.ids.shape[1]
            weights, ids = reference_route(event.logits, top_k, event.rule, event.policy, event.knobs, event.score_bias)
            if not (torch.equal(ids, event.ids) and torch.equal(weights, event.weights)):
                result.problems.append("a decode-step choice differs from the reference selector")
    # Blocks run through lynx's experts op (one graph may serve several blocks, and a graph
    # that starts inside a module reports paths relative to it).
    result.rewritten = len(prefill_cap.dispatch)
    covered = result.rewritten >= len(result.blocks)
    result.status = "rewritten" if matched and covered else "partly rewritten" if matched else "left unchanged"
    result.seconds = time.perf_counter() - start
    return result


def markdown(results: list[SweepResult]) -> str:
    lines = ["| family | status | MoE blocks rewritten | router rule; experts layout | reason left unchanged |",
             "|---|---|---|---|---|"]
    for r in results:
        rewritten = f"{r.rewritten}/{len(r.blocks)}" if r.blocks else "-"
        reasons = "; ".join(reason.replace("|", "/") for reason in r.reasons[:2])
        lines.append(f"| {r.family} | {r.status} | {rewritten} | {'<br>'.join(r.rules)} | {reasons[:300]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    names = sys.argv[1:] or family_zoo.families()
    results = []
    for name in names:
        results.append(sweep_family(name))
        r = results[-1]
        print(f"{name}: {r.status} {r.rewritten}/{len(r.blocks)} {r.seconds:.1f}s {r.problems or ''}", file=sys.stderr)
    print(markdown(results))

"""End to end on tiny models of every supported transformers family, fp32 and bf16:
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS (grouped_mm, and batched_mm).

The rewritten graph runs without Inductor here (compiler="eager") so that these tests
check lynx's own rewrite and ops; tests/test_inductor.py covers the Inductor hand-off.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from moe_models import FAMILIES, VOCAB, moe_blocks, router_modules, tiny_model

from lynx_compile import capture_routing, last_report
from lynx_compile.selector import reference_route

ALPHA, BETA = 3.0, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [pytest.param(f, d, id=f"{f}-{d}") for f in FAMILIES for d in DTYPES]
BATCHED = [pytest.param(f, id=f"{f}-batched_mm") for f in FAMILIES]


def tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)


def tokens(batch, seq, seed=0):
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run_lynx(model, input_ids, **options):
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", **options})
    with torch.no_grad(), capture_routing() as cap:
        logits = compiled(input_ids=input_ids, use_cache=False).logits
    return logits, cap, last_report()


def run_eager(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


@contextlib.contextmanager
def reference_routing(model, family):
    """Every router routes with ``select_experts`` (our reference selector, called with the
    family's rule written out in moe_models.py); the experts stay transformers' own.
    Yields the expert ids each router chose."""
    chosen = []
    gates = [gate for _, gate in router_modules(model, family)]
    for gate in gates:
        gate.forward = FAMILIES[family].reference_forward(gate, ALPHA, BETA, chosen)
    try:
        yield chosen
    finally:
        for gate in gates:
            del gate.forward


def check_report(report, model, family, policy):
    spec = FAMILIES[family]
    assert report.unmatched == []
    assert [m.module for m in report.matched] == moe_blocks(model, family)
    for layer in report.matched:
        assert (layer.num_experts, layer.top_k, layer.rule, layer.layout, layer.policy) == (
            spec.num_experts, spec.top_k, spec.rule, spec.layout, policy)


def check_lynx_off(model, family, dtype):
    for shape in [(16, 1), (2, 7)]:
        input_ids = tokens(*shape)
        logits, cap, report = run_lynx(model, input_ids, policy="off")
        check_report(report, model, family, "off")
        assert cap.routing == [] and len(cap.dispatch) == len(report.matched)  # router untouched, experts ours
        torch.testing.assert_close(logits, run_eager(model, input_ids), **tolerance(dtype))
        torch._dynamo.reset()


def check_lynx_on(model, family, dtype):
    input_ids = tokens(16, 1)  # a decode step: one new token for each of 16 sequences
    logits, cap, report = run_lynx(model, input_ids, alpha=ALPHA, beta=BETA)
    check_report(report, model, family, "lynx")
    assert cap.routing and all(e.rerouted for e in cap.routing)
    for event in cap.routing:  # the op chose exactly what the reference chooses on its input
        ref_w, ref_ids = reference_route(event.logits, FAMILIES[family].top_k, event.rule, "lynx",
                                         {"alpha": ALPHA, "beta": BETA}, event.score_bias)
        assert torch.equal(event.ids, ref_ids) and torch.equal(event.weights, ref_w)
    with reference_routing(model, family) as ref_chosen:
        ref_logits = run_eager(model, input_ids)
    assert len(ref_chosen) == len(cap.routing)
    same = [(e.ids.sort(-1).values == r.sort(-1).values).all(-1) for e, r in zip(cap.routing, ref_chosen)]
    # The first MoE layer sees the eager model's own router input: the same choice, token for
    # token. Later layers see hidden states that lynx's experts kernel rounded (fp32 sums, one
    # rounding) where transformers rounds elsewhere: the same choices in fp32, but in bf16 one
    # near-tie moves the batch's votes and with them other tokens' choices. There the op's
    # exact choice on its own input (checked above) is the guarantee.
    assert bool(same[0].all())
    if dtype == torch.float32:
        assert all(bool(agree.all()) for agree in same)
    torch.testing.assert_close(logits, ref_logits, **tolerance(dtype))


@pytest.mark.parametrize("family,dtype", CASES)
def test_lynx_off_equals_eager(family, dtype):
    check_lynx_off(tiny_model(family, DTYPES[dtype]), family, DTYPES[dtype])


@pytest.mark.parametrize("family,dtype", CASES)
def test_lynx_on_decode_matches_reference_selector(family, dtype):
    check_lynx_on(tiny_model(family, DTYPES[dtype]), family, DTYPES[dtype])


@pytest.mark.parametrize("family", BATCHED)
def test_batched_mm_experts_path(family):
    model = tiny_model(family, experts_implementation="batched_mm")
    check_lynx_off(model, family, torch.float32)
    torch._dynamo.reset()
    check_lynx_on(model, family, torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_keeps_plain_routing(family):
    model = tiny_model(family)
    input_ids = tokens(2, 8)
    logits, cap, _ = run_lynx(model, input_ids, alpha=ALPHA, beta=BETA)
    assert cap.routing and not any(e.rerouted for e in cap.routing)
    torch.testing.assert_close(logits, run_eager(model, input_ids), **tolerance(torch.float32))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_selector_reads_fewer_experts_in_decode(family):
    model = tiny_model(family)
    input_ids = tokens(16, 1, seed=1)
    _, off, _ = run_lynx(model, input_ids, policy="off")
    torch._dynamo.reset()
    _, on, _ = run_lynx(model, input_ids, alpha=ALPHA, beta=BETA)
    assert sum(on.distinct_experts()) < sum(off.distinct_experts())


def test_dynamic_shapes_read_seq_len_at_run_time():
    # One graph serves several sequence lengths: the selector op reads seq_len per call.
    model = tiny_model("qwen3_moe")
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"}, dynamic=True)
    seen = []
    with torch.no_grad():
        for shape in [(4, 6), (3, 5), (8, 1)]:
            input_ids = tokens(*shape)
            with capture_routing() as cap:
                logits = compiled(input_ids=input_ids, use_cache=False).logits
            assert len(last_report().matched) == 2
            seen.append([(e.seq_len, e.rerouted) for e in cap.routing])
            if shape[1] > 1:
                torch.testing.assert_close(logits, run_eager(model, input_ids), **tolerance(torch.float32))
    assert seen == [[(6, False)] * 2, [(5, False)] * 2, [(1, True)] * 2]

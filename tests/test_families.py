"""End to end on tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models, fp32 and bf16.

The rewritten graph runs without Inductor here (compiler="eager") so that these tests
check lynx's own rewrite and ops; tests/test_inductor.py covers the Inductor hand-off.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from moe_models import FAMILIES, VOCAB, router_modules, tiny_model

from lynx_compile import capture_routing, last_report, select_experts

ALPHA, BETA = 3.0, 2
CASES = [(f, d) for f in FAMILIES for d in (torch.float32, torch.bfloat16)]
IDS = [f"{f}-{str(d).split('.')[-1]}" for f, d in CASES]


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
    """Every router of ``model`` routes with ``select_experts`` (our reference selector);
    the experts stay transformers' own. Yields the expert ids each router chose."""
    chosen = []
    renormalize = FAMILIES[family][3]

    def make_forward(gate):
        def forward(hidden_states):
            x = hidden_states.reshape(-1, gate.hidden_dim)
            router_logits = F.linear(x, gate.weight)
            weights, ids = select_experts(router_logits, gate.top_k, alpha=ALPHA, beta=BETA, renormalize=renormalize)
            if family != "mixtral":  # these routers hand the experts weights in the logits' dtype
                weights = weights.to(router_logits.dtype)
            chosen.append(ids)
            return router_logits, weights, ids
        return forward

    gates = [gate for _, gate in router_modules(model)]
    for gate in gates:
        gate.forward = make_forward(gate)
    try:
        yield chosen
    finally:
        for gate in gates:
            del gate.forward


@pytest.mark.parametrize("family,dtype", CASES, ids=IDS)
def test_every_moe_layer_matched(family, dtype):
    _, top_k, num_experts, renormalize = FAMILIES[family]
    model = tiny_model(family, dtype)
    run_lynx(model, tokens(2, 5))
    report = last_report()
    assert report.unmatched == []
    assert [m.module for m in report.matched] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for layer in report.matched:
        assert (layer.num_experts, layer.top_k, layer.renormalize) == (num_experts, top_k, renormalize)
        assert (layer.router, layer.dispatch, layer.layout, layer.activation) == (
            "softmax_topk", "hf_experts", "gate_up_concat", "silu")
        assert layer.policy == "lynx" and layer.alpha is not None


@pytest.mark.parametrize("family,dtype", CASES, ids=IDS)
def test_lynx_off_equals_eager(family, dtype):
    model = tiny_model(family, dtype)
    for shape in [(2, 7), (16, 1)]:
        input_ids = tokens(*shape)
        logits, cap, report = run_lynx(model, input_ids, policy="off")
        assert len(report.matched) == 2 and cap.routing == []  # router untouched
        assert len(cap.dispatch) == 2  # experts ran through lynx's op
        torch.testing.assert_close(logits, run_eager(model, input_ids), **tolerance(dtype))
        torch._dynamo.reset()


@pytest.mark.parametrize("family,dtype", CASES, ids=IDS)
def test_lynx_on_decode_matches_reference_selector(family, dtype):
    _, top_k, _, renormalize = FAMILIES[family]
    model = tiny_model(family, dtype)
    input_ids = tokens(16, 1)  # a decode step: one new token for each of 16 sequences
    logits, cap, _ = run_lynx(model, input_ids, alpha=ALPHA, beta=BETA)
    assert [e.rerouted for e in cap.routing] == [True, True]
    for event in cap.routing:  # the op chose exactly what the reference chooses on its input
        ref_w, ref_ids = select_experts(event.logits, top_k, alpha=ALPHA, beta=BETA, renormalize=renormalize)
        assert torch.equal(event.ids, ref_ids)
        assert torch.equal(event.weights, ref_w)
    with reference_routing(model, family) as ref_chosen:
        ref_logits = run_eager(model, input_ids)
    assert [torch.equal(e.ids, r) for e, r in zip(cap.routing, ref_chosen)] == [True, True]
    torch.testing.assert_close(logits, ref_logits, **tolerance(dtype))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_keeps_plain_topk(family):
    _, top_k, _, _ = FAMILIES[family]
    model = tiny_model(family)
    input_ids = tokens(2, 8)
    logits, cap, _ = run_lynx(model, input_ids, alpha=ALPHA, beta=BETA)
    assert [e.rerouted for e in cap.routing] == [False, False]
    for event in cap.routing:
        assert torch.equal(event.ids, torch.softmax(event.logits, -1).topk(top_k).indices)
    torch.testing.assert_close(logits, run_eager(model, input_ids), **tolerance(torch.float32))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
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

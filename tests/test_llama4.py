"""transformers' Llama-4 MoE block (dense routing: every expert on every token, the sigmoid
weight scaling the input) rewritten to lynx's experts op over the chosen experts.

Plain routing must equal eager Llama-4 (fp32 to 1e-5, bf16 to a few ulps), for top-1 (the
released models) and top-2; decode steps must choose what the reference selector chooses and
weigh the chosen experts as Llama-4 does. compiler="eager" except one Inductor test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Llama4TextConfig
from transformers.models.llama4 import modeling_llama4
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

from lynx_compile import capture_routing, collect_reports
from lynx_compile.selector import RouterRule, reference_route

HIDDEN, EXPERTS = 48, 4


def block(top_k=1, dtype=torch.float32, router_scale=1.0, seed=0):
    config = Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=32, intermediate_size_mlp=64,
                              num_local_experts=EXPERTS, num_experts_per_tok=top_k)
    torch.manual_seed(seed)
    moe = Llama4TextMoe(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        moe.router.weight.mul_(router_scale)
    return moe.to(dtype)


def compile_run(moe, x, compiler="eager", **options):
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="lynx", options={"compiler": compiler, **options})
    with torch.no_grad(), capture_routing() as cap, collect_reports() as reports:
        out, _ = compiled(x)
    return out, cap, reports


def eager_with_ids(moe, x, ids):
    """Llama4TextMoe.forward with the experts ``ids`` [T, k] chosen for it: the chosen logits
    scattered into -inf and through the sigmoid, every expert run on every token."""
    hidden = x.reshape(-1, HIDDEN)
    logits = F.linear(hidden, moe.router.weight)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, ids, logits.gather(1, ids))
    scores = torch.sigmoid(scores.float()).to(scores.dtype)
    routed = moe.experts(hidden.repeat(EXPERTS, 1) * scores.transpose(0, 1).reshape(-1, 1))
    return moe.shared_expert(hidden) + routed.reshape(EXPERTS, -1, HIDDEN).sum(dim=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_plain_routing_equals_eager_fp32(top_k):
    moe, x = block(top_k), torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        expected, _ = moe(x)
    out, cap, reports = compile_run(moe, x, policy="off")
    [layer] = [m for r in reports for m in r.matched]
    assert (layer.router, layer.dispatch) == ("dense_sigmoid", "dense_experts (input-weighted)")
    assert (layer.rule, layer.layout, layer.activation, layer.top_k) == (
        "sigmoid of the logits' top-k, not renormalised", "gate_up_concat_t", "silu", top_k)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    [dispatch] = cap.dispatch  # one row per (token, slot): only the chosen experts are read
    assert dispatch.ids.shape == (10 * top_k, 1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_plain_routing_bf16_within_ulps(top_k):
    moe, x = block(top_k, torch.bfloat16), torch.randn(2, 5, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, _ = moe(x)
    out, _, _ = compile_run(moe, x, policy="off")
    # lynx's kernel rounds its intermediates differently from eager's bf16 bmm chain (and the
    # shared expert's output is added after): within 2 ulps of the output's largest entry
    ulp = 2.0 ** (torch.floor(torch.log2(expected.float().abs().max())) - 7)
    assert (out.float() - expected.float()).abs().max() <= 2 * ulp


def test_saturated_logits_keep_eager_top_k():
    """Router logits above ~17 give sigmoid 1.0 in fp32: selecting by the sigmoid would tie
    experts that Llama-4's top-k over the logits tells apart."""
    moe, x = block(1, router_scale=100.0), torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, logits = moe(x)
    assert (logits.topk(2, dim=-1).values > 20).all(dim=-1).sum() >= 3  # tokens whose best two both saturate
    out, cap, _ = compile_run(moe, x)  # selector on, prefill: plain routing
    [event] = cap.routing
    assert not event.rerouted and torch.equal(event.ids, logits.topk(1, dim=-1).indices)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_step_reroutes_as_reference(top_k):
    moe, x = block(top_k), torch.randn(16, 1, HIDDEN)
    out, cap, reports = compile_run(moe, x)
    [layer] = [m for r in reports for m in r.matched]
    assert layer.alpha is not None and layer.policy == "lynx"
    [event] = cap.routing
    assert event.rerouted
    knobs = {"alpha": layer.alpha, "beta": layer.beta}
    weights, ids = reference_route(event.logits, top_k, event.rule, "lynx", knobs)
    assert torch.equal(ids, event.ids) and torch.equal(weights, event.weights)
    assert torch.equal(event.weights, torch.sigmoid(event.logits.gather(-1, event.ids).float()))  # the router's
    # the router rule itself gives the same choice where nothing saturates (|logits| small here)
    _, sigmoid_ids = reference_route(event.logits, top_k, RouterRule("sigmoid", False), "lynx", knobs)
    assert torch.equal(sigmoid_ids, event.ids)
    if top_k == 1:  # (top-2 of 4 experts keeps all 4 for 16 tokens)
        assert len(event.ids.unique()) < len(event.logits.topk(top_k, dim=-1).indices.unique())  # it re-routed
    # the chosen experts weigh their input by Llama-4's sigmoid of their logits
    with torch.no_grad():
        expected = eager_with_ids(moe, x, event.ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_inductor_decode_step():
    moe, x = block(1), torch.randn(16, 1, HIDDEN)
    out, cap, _ = compile_run(moe, x, compiler="inductor", observe=True)
    [event] = cap.routing
    assert event.rerouted
    with torch.no_grad():
        expected = eager_with_ids(moe, x, event.ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_whole_model_sweep():
    from family_sweep import sweep_family

    result = sweep_family("llama4")
    assert result.problems == [] and result.status == "rewritten", result
    assert result.rules == ["sigmoid of the logits' top-k, not renormalised; gate_up_concat_t, silu"]


def left_unchanged(moe):
    """The one candidate lynx left alone on ``moe``, after checking nothing matched and the
    output equals eager."""
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        expected, _ = moe(x)
    out, _, reports = compile_run(moe, x)
    assert not any(r.matched for r in reports)
    [candidate] = [u for r in reports for u in r.unmatched]
    assert torch.equal(out, expected)
    return candidate


def test_nonzero_weight_for_unchosen_experts_left_alone(monkeypatch):
    """A fill other than -inf gives the unchosen experts weight sigmoid(fill) > 0: not sparse."""
    def forward(self, hidden_states):
        logits = F.linear(hidden_states, self.weight)
        values, ids = torch.topk(logits, self.top_k, dim=1)
        scores = torch.full_like(logits, -4.0).scatter_(1, ids, values)
        return torch.sigmoid(scores.float()).to(scores.dtype), logits

    monkeypatch.setattr(modeling_llama4.Llama4Router, "forward", forward)
    candidate = left_unchanged(block(1))
    assert "not -inf" in candidate.reason and candidate.module.endswith("router")


def test_scaled_experts_output_left_alone(monkeypatch):
    """Arithmetic the pattern does not model (here the experts' output scaled) is not replaced."""
    original = modeling_llama4.Llama4TextExperts.forward
    monkeypatch.setattr(modeling_llama4.Llama4TextExperts, "forward", lambda self, h: original(self, h) * 0.5)
    assert "the sum over the experts reads mul" in left_unchanged(block(1)).reason


def test_dynamic_batch_sizes_top2():
    """One dynamic-shape graph for several token counts (the [T*k, H] rows are reshaped at run time)."""
    moe = block(2)
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="lynx", options={"compiler": "eager", "policy": "off"}, dynamic=True)
    with torch.no_grad(), collect_reports() as reports:
        for batch in (2, 4, 5):
            x = torch.randn(batch, 3, HIDDEN)
            torch.testing.assert_close(compiled(x)[0], moe(x)[0], rtol=1e-5, atol=1e-5)
    assert [len(r.matched) for r in reports] == [1]

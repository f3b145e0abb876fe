"""What lynx does not understand it leaves exactly as it was, and says why."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lynx_compile import collect_reports, last_report


class GatherEinsumMoE(nn.Module):
    """A softmax -> top-k router feeding experts computed by gathering weights per token:
    an experts layout lynx's dispatch patterns do not cover."""

    def __init__(self, hidden=16, inter=24, num_experts=6, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(num_experts, inter, hidden) / 4)
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, inter) / 5)

    def forward(self, x):
        batch, seq, hidden = x.shape
        x = x.view(-1, hidden)
        probs = F.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        h = F.gelu(torch.einsum("th,tkih->tki", x, self.w_in[ids]))
        y = torch.einsum("tki,tkhi->tkh", h, self.w_out[ids])
        return (y * weights[..., None]).sum(1).view(batch, seq, hidden)


class SamplingHead(nn.Module):
    """A top-k that is not a router at all (top-k of logits over a 3-D tensor)."""

    def forward(self, x):
        values, _ = torch.topk(x, 3, dim=-1)
        return values.sum(-1)


def compile_and_run(module, x, **options):
    compiled = torch.compile(module, backend="lynx", options={"compiler": "eager", **options})
    with torch.no_grad():
        return compiled(x)


def test_unrecognised_experts_left_untouched_and_reported(caplog):
    torch.manual_seed(0)
    moe = GatherEinsumMoE().eval()
    x = torch.randn(4, 1, 16)
    with caplog.at_level(logging.WARNING, logger="lynx_compile"):
        out = compile_and_run(moe, x)
    with torch.no_grad():
        assert torch.equal(out, moe(x))  # bit-identical: nothing was rewritten
    report = last_report()
    assert report.matched == []
    [candidate] = report.unmatched
    assert candidate.node == "topk"
    assert "experts dispatch not recognised" in candidate.reason
    assert "left" in caplog.text and "unchanged" in caplog.text


def test_non_router_topk_reported_with_reason():
    head = SamplingHead()
    x = torch.randn(2, 3, 8)
    out = compile_and_run(head, x)
    assert torch.equal(out, head(x))
    [candidate] = last_report().unmatched
    assert "router not recognised" in candidate.reason and "2-D" in candidate.reason


def test_graph_without_moe_has_empty_report():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    x = torch.randn(2, 8)
    assert torch.equal(compile_and_run(mlp, x), mlp(x))
    report = last_report()
    assert report.matched == [] and report.unmatched == []


def test_eager_experts_loop_reported_with_fix():
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("eager")
    input_ids = torch.randint(2, 90, (4, 1))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
    with torch.no_grad(), collect_reports() as seen:
        out = compiled(input_ids=input_ids, use_cache=False).logits
        assert torch.equal(out, model(input_ids=input_ids, use_cache=False).logits)
    assert len(seen) > 1  # the eager loop breaks the forward into several graphs
    reasons = [u.reason for r in seen for u in r.unmatched]
    assert any("set_experts_implementation('grouped_mm')" in r for r in reasons)
    assert all(not r.matched for r in seen)


def test_llama4_dense_routing_reported():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=96, hidden_size=48, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=128,
    )
    model = Llama4ForCausalLM(config).eval()
    input_ids = torch.randint(2, 90, (4, 1))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(input_ids=input_ids, use_cache=False).logits
        assert torch.equal(out, model(input_ids=input_ids, use_cache=False).logits)
    [candidate] = last_report().unmatched
    assert candidate.module == "model.layers.0.feed_forward.router"
    assert "dense routing" in candidate.reason and "Llama-4" in candidate.reason


def test_graphs_with_gradients_left_alone():
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")
    input_ids = torch.randint(2, 90, (4, 1))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
    out = compiled(input_ids=input_ids, use_cache=False).logits  # grad mode on: training
    out.sum().backward()  # works: nothing without a backward was inserted
    report = last_report()
    assert report.matched == [] and "gradients are enabled" in report.unmatched[0].reason
    assert torch.equal(out, model(input_ids=input_ids, use_cache=False).logits)


def test_experts_with_extra_value_computation_left_alone(monkeypatch):
    # transformers' grouped_mm path with one extra in-place write into a GEMM output: every
    # other op is as usual, so only op-by-op accounting tells this is not plain experts.
    from moe_models import tiny_model
    from transformers.integrations import moe as hf_moe

    original = hf_moe._grouped_linear

    def zero_first_feature(*args, **kwargs):
        out = original(*args, **kwargs)
        out[:, 0] = 0.0
        return out

    monkeypatch.setattr(hf_moe, "_grouped_linear", zero_first_feature)
    model = tiny_model("qwen3_moe")
    input_ids = torch.randint(2, 90, (4, 1))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
    with torch.no_grad():
        out = compiled(input_ids=input_ids, use_cache=False).logits
        assert torch.equal(out, model(input_ids=input_ids, use_cache=False).logits)
    report = last_report()
    assert report.matched == []
    assert any("unexpected setitem" in u.reason for u in report.unmatched)

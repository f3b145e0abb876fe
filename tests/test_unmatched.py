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


def test_graphs_with_gradients_left_alone():
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")
    input_ids = torch.randint(2, 90, (4, 1))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager"})
    out = compiled(input_ids=input_ids, use_cache=False).logits  # grad mode on: training
    out.sum().backward()  # works: nothing without a backward was inserted
    report = last_report()
    assert report.matched == [] and len(report.unmatched) == 2
    assert all("require gradients" in u.reason for u in report.unmatched)
    assert torch.equal(out, model(input_ids=input_ids, use_cache=False).logits)


def test_no_grad_inside_the_compiled_function_is_an_inference_graph():
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")

    def generate_step(input_ids):
        with torch.no_grad():  # the grad mode outside (on) is not what the graph runs under
            return model(input_ids=input_ids, use_cache=False).logits

    compiled = torch.compile(generate_step, backend="lynx", options={"compiler": "eager", "policy": "off"})
    input_ids = torch.randint(2, 90, (4, 1))
    out = compiled(input_ids)
    assert len(last_report().matched) == 2
    torch.testing.assert_close(out, generate_step(input_ids), rtol=1e-5, atol=1e-5)


def test_layer_settings_match_whatever_was_compiled(caplog):
    # calibrate() names blocks as paths of the model the user holds (model.layers.0.mlp);
    # compiling model.model.forward names them layers.0.mlp: the settings still apply.
    from moe_models import tiny_model

    model = tiny_model("qwen3_moe")
    settings = {"model.layers.0.mlp": (1.5, 3), "model.layers.1.mlp": {"alpha": 2.5}}
    compiled = torch.compile(model.model.forward, backend="lynx",
                             options={"compiler": "eager", "layer_settings": settings})
    with torch.no_grad():
        compiled(input_ids=torch.randint(2, 90, (4, 1)), use_cache=False)
    layers = {m.module: m for m in last_report().matched}
    assert (layers["layers.0.mlp"].alpha, layers["layers.0.mlp"].beta) == (1.5, 3)
    assert layers["layers.1.mlp"].alpha == 2.5
    assert layers["layers.0.mlp"].settings == "layer_settings['model.layers.0.mlp']"
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="lynx_compile"):  # a key that matches nothing is said
        compiled = torch.compile(model.forward, backend="lynx",
                                 options={"compiler": "eager", "layer_settings": {"model.layers.7.mlp": (2, 2)}})
        with torch.no_grad():
            compiled(input_ids=torch.randint(2, 90, (4, 1)), use_cache=False)
    assert "model.layers.0.mlp has no layer_settings entry (keys: model.layers.7.mlp)" in caplog.text


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

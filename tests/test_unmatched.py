"""What lynx does not understand it leaves exactly as it was, and says why."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lynx_compile import last_report


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

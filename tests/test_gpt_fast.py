"""A gpt-fast style user module (experts indexed by ids, einsum) is matched and rewritten."""

from __future__ import annotations

import pytest
import torch
from gpt_fast_moe import GptFastMoE

from lynx_compile import capture_routing, last_report, select_experts

ALPHA, BETA = 1.0, 1


def run(model, idx, **options):
    compiled = torch.compile(model, backend="lynx", options={"compiler": "eager", **options})
    with torch.no_grad(), capture_routing() as cap:
        return compiled(idx), cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_fast_moe(dtype):
    torch.manual_seed(0)
    model = GptFastMoE().eval().to(dtype)
    idx = torch.randint(0, 96, (16, 1))
    with torch.no_grad():
        eager = model(idx)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)

    off, _ = run(model, idx, policy="off")
    report = last_report()
    assert [m.module for m in report.matched] == ["layers.0.block_sparse_moe", "layers.1.block_sparse_moe"]
    assert {(m.dispatch, m.layout, m.rule, m.top_k, m.num_experts) for m in report.matched} == {
        ("gather_einsum", "gate_up_split", "softmax, renormalised", 2, 8)}
    torch.testing.assert_close(off, eager, **tol)

    torch._dynamo.reset()
    on, cap = run(model, idx, alpha=ALPHA, beta=BETA)
    for event in cap.routing:
        weights, ids = select_experts(event.logits, 2, alpha=ALPHA, beta=BETA)
        assert torch.equal(event.ids, ids) and torch.equal(event.weights, weights)
    assert sum(cap.distinct_experts()) < 16  # re-routing shared experts across the batch
    assert not torch.allclose(on, eager)

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

    # A module outside transformers: lynx does not know which dimension is the sequence, so
    # without a step context or sequence_dim it never re-routes.
    torch._dynamo.reset()
    unknown, cap = run(model, idx, alpha=ALPHA, beta=BETA)
    assert not any(e.rerouted for e in cap.routing)
    assert all(m.step.startswith("step context only") for m in last_report().matched)
    torch.testing.assert_close(unknown, eager, **tol)

    torch._dynamo.reset()
    on, cap = run(model, idx, alpha=ALPHA, beta=BETA, sequence_dim=1)  # gpt-fast: [batch, seq]
    assert cap.routing and all(e.rerouted for e in cap.routing)
    for event in cap.routing:
        weights, ids = select_experts(event.logits, 2, alpha=ALPHA, beta=BETA)
        assert torch.equal(event.ids, ids) and torch.equal(event.weights, weights)
    assert sum(cap.distinct_experts()) < 16  # re-routing shared experts across the batch
    assert not torch.allclose(on, eager)


def test_sequence_first_layout_never_swaps_prefill_and_decode():
    # [seq, batch, hidden] activations: a prefill of 6 tokens is [6, 1, H] and a decode step of 6
    # sequences [1, 6, H]. Reading dim 1 as the sequence would re-route the prefill and never the
    # decode; lynx reads no dimension it does not know, and the sequence_dim option says it.
    torch.manual_seed(0)
    model = GptFastMoE(seq_first=True).eval()
    prefill, decode = torch.randint(0, 96, (1, 6)), torch.randint(0, 96, (6, 1))
    for options, expected in (({}, [False, False]), ({"sequence_dim": 0}, [False, True])):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="lynx", options={"compiler": "eager", **options})
        seen = []
        for idx in (prefill, decode):
            with torch.no_grad(), capture_routing() as cap:
                compiled(idx)
            seen.append(all(e.rerouted for e in cap.routing) and bool(cap.routing))
        assert seen == expected, options

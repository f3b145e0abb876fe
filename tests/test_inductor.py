"""The Inductor hand-off: a real Inductor compile of a rewritten model (slow: keep few)."""

from __future__ import annotations

import pytest
import torch
from moe_models import VOCAB, tiny_model

from lynx_compile import capture_routing, last_report

pytestmark = pytest.mark.inductor


def run(model, input_ids, **options):
    compiled = torch.compile(model.forward, backend="lynx", options=options)
    with torch.no_grad(), capture_routing() as cap:
        return compiled(input_ids=input_ids, use_cache=False).logits, cap


def test_inductor_compiles_rewritten_graph():
    model = tiny_model("mixtral")
    input_ids = torch.randint(2, VOCAB, (16, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=input_ids, use_cache=False).logits

    off, _ = run(model, input_ids, policy="off")
    assert len(last_report().matched) == 2
    torch.testing.assert_close(off, eager, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    on, on_cap = run(model, input_ids)
    torch._dynamo.reset()
    ref, ref_cap = run(model, input_ids, compiler="eager")  # same rewrite, no Inductor
    assert [e.rerouted for e in on_cap.routing] == [True, True]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(on_cap.routing, ref_cap.routing))
    torch.testing.assert_close(on, ref, rtol=1e-4, atol=1e-4)

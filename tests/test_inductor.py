"""The Inductor hand-off: a real Inductor compile of a rewritten model (slow: keep few)."""

from __future__ import annotations

import pytest
import torch
from moe_models import VOCAB, tiny_model

import lynx_compile
from lynx_compile import capture_routing, last_report

pytestmark = pytest.mark.inductor


def run(model, input_ids, **options):
    compiled = torch.compile(model.forward, backend="lynx", options=options)
    _compiled["forward"] = compiled
    with torch.no_grad(), capture_routing() as cap:
        return compiled(input_ids=input_ids, use_cache=False).logits, cap


def ids_per_layer(cap):
    return [event.ids for event in cap.dispatch]  # the experts op records the ids it ran


def test_inductor_compiles_rewritten_graph():
    model = tiny_model("mixtral")
    input_ids = torch.randint(2, VOCAB, (16, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=input_ids, use_cache=False).logits

    off, _ = run(model, input_ids, policy="off")
    assert len(last_report().matched) == 2
    torch.testing.assert_close(off, eager, rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    on, on_cap = run(model, input_ids)  # the selector fused into Inductor's code
    torch._dynamo.reset()
    ref, ref_cap = run(model, input_ids, compiler="eager")  # same rewrite, no Inductor
    assert on_cap.routing == [] and [e.rerouted for e in ref_cap.routing] == [True, True]
    assert all(torch.equal(a, b) for a, b in zip(ids_per_layer(on_cap), ids_per_layer(ref_cap)))
    torch.testing.assert_close(on, ref, rtol=1e-4, atol=1e-4)


def _plain(model, input_ids):
    torch._dynamo.reset()
    return run(model, input_ids, compiler="eager", policy="off")[1]


def test_one_compiled_graph_decides_the_step_kind_at_run_time():
    # A packed row [1, 16]: a prefill by its shape, a decode step of 16 sequences when the
    # engine says so. One Inductor graph serves both; the context is read on every call.
    model = tiny_model("qwen3_moe")
    packed = torch.randint(2, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    plain = _plain(model, packed)
    torch._dynamo.reset()
    _, as_prefill = run(model, packed)
    with torch.compiler.set_stance("fail_on_recompile"), lynx_compile.step(decode=True):
        _, as_decode = run_again(model, packed)
    torch._dynamo.reset()
    with lynx_compile.step(decode=True):
        _, reference = run(model, packed, compiler="eager")
    assert all(torch.equal(a, b) for a, b in zip(ids_per_layer(as_prefill), ids_per_layer(plain)))
    assert all(torch.equal(a, b) for a, b in zip(ids_per_layer(as_decode), ids_per_layer(reference)))
    assert sum(e.distinct_experts for e in as_decode.dispatch) < sum(e.distinct_experts for e in plain.dispatch)


_compiled = {}


def run_again(model, input_ids):
    """The forward compiled by the last ``run`` call, called again."""
    with torch.no_grad(), capture_routing() as cap:
        return _compiled["forward"](input_ids=input_ids, use_cache=False).logits, cap

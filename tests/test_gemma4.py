"""Gemma-4: the router reads the residual (normalised inside the router), the experts read
their own copy of it (``pre_feedforward_layernorm_2``) and are weighed by ``weights *
per_expert_scale[ids]``. lynx's experts op must read exactly those tensors (the computation
making them stays in the graph), so with plain routing the decoder layer equals eager; the zoo
model's norm weight and per-expert scale are randomised so that reading the router's input or
the router's own weights instead would show."""

from __future__ import annotations

import pytest
import torch

import family_zoo
from lynx_compile import capture_routing, collect_reports
from lynx_compile.selector import reference_route


@pytest.fixture(scope="module")
def model():
    entry = family_zoo.build("gemma4")
    if entry.model is None:
        pytest.skip(entry.skip_reason)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in entry.model.model.layers:
            if getattr(layer, "enable_moe_block", False):
                layer.router.per_expert_scale.copy_(torch.rand(layer.router.per_expert_scale.shape, generator=gen) * 2 + 0.25)
                norm = layer.pre_feedforward_layernorm_2.weight
                norm.copy_(torch.randn(norm.shape, generator=gen))
    return entry.model


def run(model, input_ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: model(input_ids=ids, use_cache=False).logits, backend="lynx",
                             options={"compiler": "eager", **options})
    with torch.no_grad(), capture_routing() as cap, collect_reports() as reports:
        out = compiled(input_ids)
    return out, cap, [m for r in reports for m in r.matched]


def test_plain_routing_equals_eager(model):
    input_ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=input_ids, use_cache=False).logits
    out, cap, matched = run(model, input_ids, policy="off")
    assert len(matched) == 2 and {m.rule for m in matched} == {"softmax, renormalised"}
    assert len(cap.dispatch) == 2  # both MoE blocks ran lynx's experts op
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_decode_step_reroutes_as_reference(model):
    input_ids = torch.randint(3, 90, (16, 1), generator=torch.Generator().manual_seed(2))
    out, cap, matched = run(model, input_ids)
    assert cap.routing and all(e.rerouted for e in cap.routing)
    for event in cap.routing:
        weights, ids = reference_route(event.logits, event.ids.shape[1], event.rule, event.policy, event.knobs)
        assert torch.equal(ids, event.ids) and torch.equal(weights, event.weights)
    assert torch.isfinite(out).all()

"""Calibration of (alpha, beta) from router logits: the bound, the trade-off, the model path."""

from __future__ import annotations

import pytest
import torch
from moe_models import VOCAB, tiny_model

import lynx_compile
from lynx_compile import capture_routing, last_report, select_experts
from lynx_compile.calibrate import Calibration, calibrate_logits, capture_decode_logits

LAYER = "model.layers.0.mlp"


def skewed_steps(steps=12, batch=16, experts=32, scale=2.0, seed=0):
    """Decode steps whose experts have skewed popularity, like a trained router's."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.linspace(2.0, -2.0, experts)
    return [torch.randn(batch, experts, generator=g) * scale + popularity for _ in range(steps)]


def independent_metrics(steps, top_k, alpha, beta):
    """Mass kept and top-1 kept recomputed directly from the reference selector."""
    mass, top1 = [], []
    for logits in steps:
        _, ids = select_experts(logits, top_k, alpha=alpha, beta=beta)
        probs = torch.softmax(logits, -1)
        plain = probs.topk(top_k).indices
        mass.append(probs.gather(-1, ids).sum(-1) / probs.gather(-1, plain).sum(-1))
        top1.append((ids == plain[:, :1]).any(-1))
    return torch.cat(mass).mean().item(), torch.cat(top1).float().mean().item()


@pytest.fixture(scope="module")
def skewed():
    steps = skewed_steps()
    return steps, calibrate_logits({LAYER: steps}, top_k=4)


def test_skewed_logits_give_feasible_settings_within_the_bound(skewed):
    steps, cal = skewed
    layer = cal[LAYER]
    assert cal.infeasible == [] and layer.feasible
    assert layer.chosen.mass_kept >= 0.95 and layer.chosen.top1_kept >= 0.99
    assert layer.chosen.distinct < layer.plain_distinct  # the selector saves experts here
    assert len(layer.grid) == 40 and layer.chosen in layer.grid
    # the chosen point is the fewest-experts feasible one
    assert layer.chosen.distinct == min(c.distinct for c in layer.grid if c.feasible)
    mass, top1 = independent_metrics(steps, 4, layer.chosen.alpha, layer.chosen.beta)
    assert mass == pytest.approx(layer.chosen.mass_kept, abs=1e-5)
    assert top1 == pytest.approx(layer.chosen.top1_kept)
    beta = "none" if layer.chosen.beta is None else layer.chosen.beta  # "none": no clamp; None: the default
    assert cal.layer_settings == {LAYER: (layer.chosen.alpha, beta)}
    assert "| model.layers.0.mlp | 4/32 |" in str(cal)
    rows = cal.grid_rows()
    assert len(rows) == 40 and sum(r["chosen"] for r in rows) == 1


def test_tighter_bound_never_gives_fewer_experts(skewed):
    steps, cal = skewed
    losses = [0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005]  # loosest to tightest
    distinct = []
    for loss in losses:
        layer = cal.with_bound(max_mass_loss=loss)[LAYER]
        if layer.feasible:
            distinct.append(layer.chosen.distinct)
            assert layer.chosen.mass_kept >= 1 - loss
    assert len(distinct) >= 4
    assert distinct == sorted(distinct) and distinct[0] < distinct[-1]
    strict_top1 = cal.with_bound(max_mass_loss=0.1, min_top1_kept=1.0)[LAYER]
    loose_top1 = cal.with_bound(max_mass_loss=0.1, min_top1_kept=0.9)[LAYER]
    assert strict_top1.chosen.distinct >= loose_top1.chosen.distinct
    shifts = [cal.with_bound(max_mass_loss=0.2, max_weight_shift=w)[LAYER] for w in (0.2, 0.05, 0.01)]
    assert all(layer.chosen.weight_shift <= w for layer, w in zip(shifts, (0.2, 0.05, 0.01)) if layer.feasible)
    assert [layer.chosen.distinct for layer in shifts] == sorted(layer.chosen.distinct for layer in shifts)
    # re-choosing from the grid is the same as calibrating again under that bound
    again = calibrate_logits({LAYER: steps}, top_k=4, max_mass_loss=0.02)[LAYER]
    assert again.chosen == cal.with_bound(max_mass_loss=0.02)[LAYER].chosen


def test_infeasible_bound_keeps_routing_closest_to_plain():
    # wide bins share experts aggressively: every candidate of this grid changes some routing,
    # so a zero-loss bound cannot be met
    steps = skewed_steps(steps=4)
    cal = calibrate_logits({LAYER: steps}, top_k=4, max_mass_loss=0.0, alphas=[0.5, 0.7, 1.0], betas=[1, 2])
    layer = cal[LAYER]
    assert all(c.mass_kept < 1 for c in layer.grid)
    assert cal.infeasible == [LAYER] and not layer.feasible
    assert layer.chosen.mass_kept == max(c.mass_kept for c in layer.grid)
    assert LAYER in cal.layer_settings  # still usable, and flagged
    assert "NO (closest to plain)" in str(cal) and "No candidate met the bound" in str(cal)


def test_per_layer_rules_and_bad_inputs():
    steps = skewed_steps(steps=3, experts=16)
    cal = lynx_compile.calibrate({"a": steps, "b": steps}, top_k={"a": 2, "b": 4},
                                 renormalize={"a": True, "b": False}, alphas=[1, 3], betas=[2, None])
    assert [(l.module, l.top_k, l.renormalize, len(l.grid)) for l in cal.layers] == [
        ("a", 2, True, 4), ("b", 4, False, 4)]
    with pytest.raises(ValueError, match="top_k is required"):
        calibrate_logits({"a": steps}, top_k=None)
    with pytest.raises(ValueError, match="2-D"):
        calibrate_logits({"a": [torch.randn(16)]}, top_k=2)
    with pytest.raises(ValueError, match="max_mass_loss"):
        calibrate_logits({"a": steps}, top_k=2, max_mass_loss=1.5)
    with pytest.raises(ValueError, match="max_weight_shift"):
        cal.with_bound(max_weight_shift=-0.1)
    with pytest.raises(ValueError, match="decode batches"):
        lynx_compile.calibrate(tiny_model("qwen3_moe"))


def test_model_calibration_feeds_layer_settings():
    model = tiny_model("qwen3_moe")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (8, 6), generator=g) for _ in range(2)]
    decode = torch.randint(2, VOCAB, (8, 1), generator=g)
    cal = lynx_compile.calibrate(model, prompts + [decode], start_position=2)
    assert isinstance(cal, Calibration)
    blocks = ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert list(cal.layer_settings) == blocks
    assert [(l.top_k, l.num_experts, l.renormalize, l.steps) for l in cal.layers] == [(4, 16, True, 9)] * 2

    # a prompt's row b, position s is step s, token b: compare with the eager router on row 3 alone
    gate = model.model.layers[1].mlp.gate
    seen = []
    handle = gate.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        model(input_ids=prompts[0][3:4], use_cache=False)
    handle.remove()
    logits, _ = capture_decode_logits(model, [prompts[0]])
    for s in range(6):
        torch.testing.assert_close(logits[blocks[1]][s][3], seen[0][s], rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="lynx",
                             options={"compiler": "eager", "layer_settings": cal.layer_settings})
    with torch.no_grad(), capture_routing() as cap:
        compiled(input_ids=torch.randint(2, VOCAB, (16, 1), generator=g), use_cache=False)
    matched = last_report().matched
    assert [m.module for m in matched] == blocks
    for m in matched:
        assert m.settings == "layer_settings"
        assert (m.alpha, m.beta) == cal.layer_settings[m.module]
    # what calibration predicts is what the compiled model chose (the first layer's logits
    # do not depend on earlier re-routing)
    alpha, beta = cal.layer_settings[blocks[0]]
    first = cap.routing[0]
    assert first.rerouted
    assert torch.equal(first.ids, select_experts(first.logits, 4, alpha=alpha, beta=beta)[1])

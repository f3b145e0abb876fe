"""Calibration of each policy's knob from router logits: the bound, the trade-off, every router rule,
the model path and bad arguments."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moe_models import FAMILIES, VOCAB, moe_blocks, tiny_model

import lynx_compile
import lynx_compile.policies
from lynx_compile import capture_routing, last_report, select_experts
from lynx_compile.calibrate import Calibration, calibrate_logits, capture_decode_logits
from lynx_compile.policies.rules import RouterRule, route_plain

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
    assert "| model.layers.0.mlp | softmax, renormalised | 4/32 |" in str(cal)
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
    assert layer.held == {"mass kept": False, "top-1 kept": layer.chosen.top1_kept >= 0.99}
    assert "NO: mass kept" in str(cal) and "No candidate met the bound" in str(cal)


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


# --- every policy, every router rule ---------------------------------------------------------

def reference_metrics(steps, top_k, rule_kwargs, policy_kwargs, score_bias=None):
    """Distinct experts, mass kept and top-1 kept from sets of expert ids, against the routers'
    own plain op sequence (``route_plain``), not calibrate's code."""
    rule = RouterRule(**rule_kwargs)
    distinct, mass, top1 = [], [], []
    for logits in steps:
        _, ids = select_experts(logits, top_k, **policy_kwargs, **rule_kwargs, score_bias=score_bias)
        _, plain = route_plain(logits, top_k, rule, score_bias)
        gates = torch.softmax(logits, -1) if rule.scoring == "softmax" else torch.sigmoid(logits)
        for t in range(logits.shape[0]):
            mine, theirs = set(ids[t].tolist()), set(plain[t].tolist())
            mass.append(sum(gates[t, e].item() for e in mine) / sum(gates[t, e].item() for e in theirs))
            top1.append(plain[t, 0].item() in mine)
        distinct.append(ids.unique().numel())
    return sum(distinct) / len(distinct), sum(mass) / len(mass), sum(top1) / len(top1)


@pytest.mark.parametrize("policy,knob,grid", [("oea", "k0", [1, 2, 3, 4]), ("xshare", "budget", list(range(4, 33)))])
def test_oea_and_xshare_pick_their_knob(skewed, policy, knob, grid):
    steps, _ = skewed
    cal = calibrate_logits({LAYER: steps}, top_k=4, policy=policy)
    layer = cal[LAYER]
    assert cal.policy == policy and layer.default is None
    assert [c.knobs[knob] for c in layer.grid] == grid  # the default grid: k0 in 1..k, budget in k..E
    # the grid's plain end reproduces plain top-k exactly: always feasible
    plain = layer.grid[-1]
    assert (plain.mass_kept, plain.top1_kept, plain.weight_shift) == pytest.approx((1, 1, 0), abs=1e-6)
    assert plain.distinct == layer.plain_distinct and plain.experts_per_token == 4 and plain.feasible
    assert layer.feasible and layer.held == {"mass kept": True, "top-1 kept": True}
    assert layer.chosen.distinct == min(c.distinct for c in layer.grid if c.feasible) < layer.plain_distinct
    for c in (layer.chosen, layer.grid[0]):
        distinct, mass, top1 = reference_metrics(steps, 4, {}, {"policy": policy, **c.knobs})
        assert (c.distinct, c.mass_kept, c.top1_kept) == pytest.approx((distinct, mass, top1), abs=1e-5)
    assert cal.layer_settings == {LAYER: {knob: layer.chosen.knobs[knob]}}
    assert cal.options == {"policy": policy, "layer_settings": cal.layer_settings}
    # OEA with k0 = 1 on two tokens: a union of 2 experts, so each token has 2, not 4 (an expert
    # repeated at weight 0 fills its slots and must not count twice)
    if policy == "oea":
        two = torch.tensor([[4.0, 3, 2, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 2, 3, 4]])
        c = calibrate_logits({LAYER: [two]}, top_k=4, policy="oea", k0s=[1])[LAYER].chosen
        probs = torch.softmax(two[0], -1)
        assert (c.distinct, c.experts_per_token) == (2, 2)
        assert c.mass_kept == pytest.approx(((probs[0] + probs[7]) / probs[:4].sum()).item())
    tight = cal.with_bound(max_mass_loss=0.001, min_top1_kept=1.0)[LAYER]
    assert tight.feasible and tight.chosen.distinct >= layer.chosen.distinct


RULES = {
    "softmax, not renormalised": (dict(renormalize=False), False),
    "top-k then softmax (GPT-OSS)": (dict(softmax_after_topk=True), False),
    "grouped softmax (DeepSeek-V2)": (dict(renormalize=False, num_groups=4, topk_groups=2, scaling_factor=2.0), False),
    "sigmoid + bias": (dict(scoring="sigmoid"), True),
    "grouped sigmoid + bias (DeepSeek-V3)": (dict(scoring="sigmoid", num_groups=8, topk_groups=3,
                                                  group_score="top2_sum", scaling_factor=2.5), True),
    "grouped sigmoid, not renormalised": (dict(scoring="sigmoid", renormalize=False, num_groups=4, topk_groups=2), False),
}


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("policy,grid", [("lynx", dict(alphas=[1.0, 3.0], betas=[2, "none"])),
                                         ("oea", dict(k0s=[1, 2, 4])), ("xshare", dict(budgets=[4, 10, 32]))])
def test_every_rule_is_calibrated_with_its_own_routing(name, policy, grid):
    rule_kwargs, biased = RULES[name]
    steps = skewed_steps(steps=4, experts=32, scale=1.5, seed=3)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 0.1 if biased else None
    cal = calibrate_logits({LAYER: steps}, top_k=4, policy=policy, rule=RouterRule(**rule_kwargs),
                           score_bias=bias, **grid)
    layer = cal[LAYER]
    assert layer.rule == RouterRule(**rule_kwargs) and layer.biased == biased
    assert len(layer.grid) == (4 if policy == "lynx" else 3)
    for c in layer.grid:
        distinct, mass, top1 = reference_metrics(steps, 4, rule_kwargs, {"policy": policy, **c.knobs}, bias)
        assert (c.distinct, c.mass_kept, c.top1_kept) == pytest.approx((distinct, mass, top1), abs=1e-5), c
        if not biased:  # T is the set of most gate mass inside the allowed groups
            assert c.mass_kept <= 1 + 1e-6
    assert 0 < layer.topk_mass < 1
    assert layer.rule_text in str(cal)


# --- the model path: k, rule and bias from what lynx matched ------------------------------------

@pytest.mark.parametrize("family,policy", [("deepseek_v3", "oea"), ("gpt_oss", "xshare"), ("deepseek_v2", "lynx"),
                                           ("qwen2_moe", "oea")])
def test_model_calibration_for_each_policy_and_rule(family, policy):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (8, 6), generator=g) for _ in range(2)]
    cal = lynx_compile.calibrate(model, prompts, policy=policy, start_position=2)
    family_info = FAMILIES[family]
    blocks = moe_blocks(model, family)
    assert [l.module for l in cal.layers] == blocks
    assert [(l.top_k, l.num_experts, l.rule_text, l.steps) for l in cal.layers] == [
        (family_info.top_k, family_info.num_experts, family_info.rule, 8)] * len(blocks)
    assert all(layer.held for layer in cal.layers)

    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", **cal.options})
    with torch.no_grad(), capture_routing() as cap:
        compiled(input_ids=torch.randint(2, VOCAB, (16, 1), generator=g), use_cache=False)
    matched = last_report().matched
    assert [m.module for m in matched] == blocks
    for m in matched:  # the report shows the policy and each layer's calibrated knob
        chosen = cal[m.module].chosen
        assert (m.policy, m.settings, m.knobs) == (policy, "layer_settings",
                                                   lynx_compile.policies.get_policy(policy).describe(chosen.knobs))
    # the first layer re-routes what calibration predicted, under its own rule and bias
    first = cap.routing[0]
    assert first.rerouted and first.policy == policy
    knobs = cal[blocks[0]].chosen.knobs
    _, ids = select_experts(first.logits, family_info.top_k, policy=policy, **knobs,
                            **dataclasses.asdict(first.rule), score_bias=first.score_bias)
    assert torch.equal(first.ids, ids)


# --- bad arguments ---------------------------------------------------------------------------

def test_bad_arguments_raise_naming_them():
    steps = skewed_steps(steps=2, experts=16)
    model = tiny_model("qwen3_moe")
    prompts = [torch.randint(2, VOCAB, (4, 4))]
    bad = [
        (dict(alphas=[]), "alphas is empty"),
        (dict(betas=[]), "betas is empty"),
        (dict(alphas=[0]), "alphas holds 0"),
        (dict(alphas=["3"]), "alphas holds '3'"),
        (dict(betas=["nope"]), "betas holds 'nope'"),
        (dict(betas=[0]), "betas holds 0"),
        (dict(alphas=3.0), "alphas must be a list"),
        (dict(max_mass_loss=1), "max_mass_loss must be a number in"),
        (dict(max_mass_loss=float("nan")), "max_mass_loss"),
        (dict(max_mass_loss="0.05"), "max_mass_loss"),
        (dict(min_top1_kept=1.5), "min_top1_kept"),
        (dict(min_top1_kept=True), "min_top1_kept"),
        (dict(max_weight_shift=-0.1), "max_weight_shift"),
        (dict(policy="random"), "policy must be one of lynx, oea, xshare"),
        (dict(k0s=[1, 2]), "k0s are grids of policy 'oea', not of 'lynx'"),
        (dict(policy="oea", k0s=[]), "k0s is empty"),
        (dict(policy="oea", k0s=[2, 5]), r"k0s \[5\] do not fit layer"),
        (dict(policy="oea", k0s=[1.5]), "k0s holds 1.5"),
        (dict(policy="xshare", budgets=[3, 8]), r"budgets \[3\] do not fit layer"),
        (dict(policy="xshare", budgets=[17]), r"budgets \[17\] do not fit layer"),
        (dict(policy="xshare", alphas=[1.0]), "alphas are grids of policy 'lynx'"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            lynx_compile.calibrate({"a": steps}, top_k=4, **kwargs)
        if "fit layer" not in match:  # checked before the capture, on a model too
            with pytest.raises(ValueError, match=match):
                lynx_compile.calibrate(model, prompts, **kwargs)
    with pytest.raises(ValueError, match="batches is empty"):
        lynx_compile.calibrate(model, [])
    with pytest.raises(ValueError, match="layer_logits is empty"):
        lynx_compile.calibrate({}, top_k=4)
    with pytest.raises(ValueError, match="layer 'a' has no decode steps"):
        lynx_compile.calibrate({"a": []}, top_k=4)
    with pytest.raises(ValueError, match="are for calibrating from logits"):
        lynx_compile.calibrate(model, prompts, top_k=4)
    with pytest.raises(ValueError, match="contradicts its rule"):
        lynx_compile.calibrate({"a": steps}, top_k=4, renormalize=False, rule=RouterRule())
    with pytest.raises(ValueError, match="score_bias"):
        lynx_compile.calibrate({"a": steps}, top_k=4, score_bias=torch.zeros(15))  # one entry per expert
    with pytest.raises(ValueError, match="start_position=4 skips every position"):
        lynx_compile.calibrate(model, prompts, start_position=4)
    # "none" in the beta grid is no clamp, like None
    none = lynx_compile.calibrate({"a": steps}, top_k=4, alphas=[2.0], betas=["none"])["a"].grid
    plain = lynx_compile.calibrate({"a": steps}, top_k=4, alphas=[2.0], betas=[None])["a"].grid
    assert none == plain and none[0].beta is None

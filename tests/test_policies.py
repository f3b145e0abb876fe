"""The peers' rules beside AffinityBinning, each against a plain reference written here:
OEA (keep the top-k0, fill from the union) and XShare (top-1s, then utility up to a budget)."""

from __future__ import annotations

import pytest
import torch

import lynx_compile
from lynx_compile import select_experts


def skewed(num_tokens, num_experts=32, seed=0, spread=1.5, quantise=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_experts, generator=g) + torch.randn(num_tokens, num_experts, generator=g)) * spread
    return (logits * 2).round() / 2 if quantise else logits


def order(row: list[float]) -> list[int]:
    """Experts by score, best first; ties to the lower index."""
    return sorted(range(len(row)), key=lambda e: (-row[e], e))


def finish_reference(logits: torch.Tensor, kept: set[int], k: int, renormalize: bool):
    """Each token's best k experts inside ``kept`` (fewer: repeat the first at weight 0),
    weighed by the softmax router's rule."""
    probs = torch.softmax(logits, -1)
    ids, weights = [], []
    for t, row in enumerate(logits.tolist()):
        mine = [e for e in order(row) if e in kept][:k]
        plain = order(row)[:k]
        w = [probs[t, e].item() for e in mine]
        scale = 1 / sum(w) if renormalize else sum(probs[t, e].item() for e in plain) / sum(w)
        w = [x * scale for x in w]
        ids.append(mine + [mine[0]] * (k - len(mine)))
        weights.append(w + [0.0] * (k - len(mine)))
    return torch.tensor(weights), torch.tensor(ids)


def oea_reference(logits, k, k0, renormalize=True):
    kept = {e for row in logits.tolist() for e in order(row)[:k0]}
    return finish_reference(logits, kept, k, renormalize)


def xshare_reference(logits, k, budget, renormalize=True):
    kept = {order(row)[0] for row in logits.tolist()}
    utility = torch.softmax(logits, -1).sum(0).tolist()
    for e in order(utility):
        if len(kept) >= budget:
            break
        kept.add(e)
    return finish_reference(logits, kept, k, renormalize)


CASES = [(16, 32, 4), (8, 64, 8), (5, 16, 2), (24, 128, 8)]


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES)
def test_oea_matches_reference(num_tokens, num_experts, k, quantise):
    for k0 in sorted({1, k // 2 or 1, k}):
        for renormalize in (True, False):
            logits = skewed(num_tokens, num_experts, seed=k0, quantise=quantise)
            weights, ids = select_experts(logits, k, policy="oea", k0=k0, renormalize=renormalize)
            ref_w, ref_ids = oea_reference(logits, k, k0, renormalize)
            assert torch.equal(ids, ref_ids)
            torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,k", CASES)
def test_xshare_matches_reference(num_tokens, num_experts, k, quantise):
    for budget in sorted({k, 2 * k, num_experts // 2, num_experts}):
        for renormalize in (True, False):
            logits = skewed(num_tokens, num_experts, seed=budget, quantise=quantise)
            weights, ids = select_experts(logits, k, policy="xshare", budget=budget, renormalize=renormalize)
            ref_w, ref_ids = xshare_reference(logits, k, budget, renormalize)
            assert torch.equal(ids, ref_ids)
            torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_limits_are_plain_top_k():
    logits = skewed(16, 32)
    plain = torch.softmax(logits, -1).topk(4)
    for kwargs in (dict(policy="oea", k0=4), dict(policy="xshare", budget=32)):
        weights, ids = select_experts(logits, 4, **kwargs)
        assert torch.equal(ids, plain.indices), kwargs
        torch.testing.assert_close(weights, plain.values / plain.values.sum(-1, keepdim=True))


def test_properties():
    logits = skewed(32, 64, seed=3, spread=1.0)
    top = torch.softmax(logits, -1).topk(8).indices
    _, ids = select_experts(logits, 8, policy="oea", k0=3)
    for t in range(32):
        assert set(top[t, :3].tolist()) <= set(ids[t].tolist())  # every token keeps its top-k0
    assert ids.unique().numel() <= top[:, :3].unique().numel()  # no expert beyond the union
    weights, ids = select_experts(logits, 8, policy="xshare", budget=20)
    assert ids.unique().numel() <= max(20, top[:, 0].unique().numel())
    assert (ids[:, 0] == top[:, 0]).all()  # every token keeps its top-1
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("kwargs", [dict(policy="oea", k0=2), dict(policy="xshare", budget=12)])
def test_padding_rows_change_nothing_for_live_rows(kwargs):
    live_rows, padding = skewed(12, seed=1), skewed(20, seed=2, spread=3.0)
    live = torch.tensor([True] * 12 + [False] * 20)
    weights, ids = select_experts(torch.cat([live_rows, padding]), 4, live=live, **kwargs)
    ref_w, ref_ids = select_experts(live_rows, 4, **kwargs)
    assert torch.equal(ids[:12], ref_ids) and torch.equal(weights[:12], ref_w)
    assert set(ids[12:].flatten().tolist()) <= set(ref_ids.flatten().tolist())


@pytest.mark.parametrize("kwargs", [dict(policy="oea", k0=2), dict(policy="xshare", budget=12)])
def test_prefill_is_plain(kwargs):
    logits = skewed(16, seed=4)
    _, ids = select_experts(logits, 4, decode=False, **kwargs)
    assert torch.equal(ids, torch.softmax(logits, -1).topk(4).indices)


def test_grouped_sigmoid_router_under_each_policy():
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(16, 32, generator=g) * 2, torch.randn(32, generator=g) * 0.05
    rule = dict(scoring="sigmoid", score_bias=bias, num_groups=8, topk_groups=3, group_score="top2_sum")
    groups = torch.sigmoid(logits) + bias
    for kwargs in (dict(policy="oea", k0=2), dict(policy="xshare", budget=8), dict(alpha=3.0, beta=2)):
        weights, ids = select_experts(logits, 4, **kwargs, **rule)
        assert torch.isfinite(weights).all() and ids.min() >= 0
        # the group limit holds: every chosen expert lies in one of the token's 3 best groups
        group_scores = groups.view(16, 8, 4).topk(2, -1).values.sum(-1)
        allowed = group_scores.topk(3, -1).indices
        assert all(set((ids[t] // 4).tolist()) <= set(allowed[t].tolist()) for t in range(16)), kwargs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(policy="oea"), "needs k0"),
        (dict(policy="oea", k0=5), r"1 <= k0 <= 4"),
        (dict(policy="oea", k0=2.0), "invalid k0"),
        (dict(policy="xshare", budget=3), r"4 <= budget <= 32"),
        (dict(policy="xshare", budget=33), r"4 <= budget <= 32"),
        (dict(policy="xshare", budget=8, alpha=3.0), "unknown: alpha"),
        (dict(policy="lynx", alpha=3.0, k0=2), "unknown: k0"),
        (dict(policy="random"), "unknown selection policy"),
        (dict(alpha=float("inf")), "invalid alpha"),
        (dict(alpha=1e39), "invalid alpha"),
    ],
)
def test_bad_knobs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_experts(skewed(8), 4, **kwargs)


def test_policies_reach_the_graph():
    from moe_models import VOCAB, tiny_model

    model = tiny_model("qwen3_moe")
    input_ids = torch.randint(2, VOCAB, (16, 1), generator=torch.Generator().manual_seed(0))
    for options, expected in ((dict(policy="oea", k0=2), "k0=2"), (dict(policy="xshare", budget=6), "budget=6")):
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", **options})
        with torch.no_grad(), lynx_compile.capture_routing() as cap:
            compiled(input_ids=input_ids, use_cache=False)
        report = lynx_compile.last_report()
        assert all(m.policy == options["policy"] and m.knobs == expected for m in report.matched)
        for event in cap.routing:
            assert event.rerouted and event.policy == options["policy"]
            _, ids = select_experts(event.logits, 4, renormalize=event.rule.renormalize, **options)
            assert torch.equal(event.ids, ids)

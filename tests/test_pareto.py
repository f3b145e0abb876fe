"""examples/pareto.py: the frontier, the matched-saving verdict, and the shared-prefill cache copy."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import pareto  # noqa: E402
from demo_model import load_model  # noqa: E402
from evaluate import _decode, _prefill, make_cache  # noqa: E402

from lynx_compile.calibrate import budget_grid  # noqa: E402


def row(policy: str, knob: str, saved: float, kl: float, acc_lost: float = 0.0, batch: int = 16) -> pareto.Row:
    return pareto.Row(batch, policy, knob, 100, 10.0, saved, 70.0, acc_lost=acc_lost, kl=kl)


def test_pareto_mask_keeps_only_undominated_points():
    saved = [0, 10, 20, 20, 30, 25]
    loss = [0, 1, 2, 3, 5, 6]
    # (20, 3) loses to (20, 2); (25, 6) to (30, 5); equal points do not dominate each other
    assert pareto.pareto_mask(saved, loss) == [True, True, True, False, True, False]
    assert pareto.pareto_mask([5, 5], [1, 1]) == [True, True]


def test_best_at_is_the_least_loss_among_points_saving_enough():
    points = [row("oea", "a", 10, 0.1), row("oea", "b", 30, 0.05), row("oea", "c", 50, 0.3)]
    assert pareto.best_at(points, 20, "kl").knob == "b"  # a saves too little; b beats c
    assert pareto.best_at(points, 40, "kl").knob == "c"
    assert pareto.best_at(points, 60, "kl") is None


def test_matched_levels_winners_crossover_and_ties():
    rows = [row("exact", "plain top-k", 0, 0.0),
            row("lynx", "(3, 2)", 45, 0.01), row("lynx", "(6, 2)", 55, 0.05),
            row("oea", "k0=2", 40, 0.02), row("oea", "k0=1", 70, 0.10),
            row("xshare", "budget=4", 70, 0.10), row("xshare", "budget=32", 15, 0.001)]
    levels = {lv.level: lv for lv in pareto.matched_levels(rows, None, 16, "kl")}
    assert sorted(levels) == [10, 20, 30, 40, 50, 60, 70]
    assert levels[10].winners == ("xshare",)  # budget=32 saves 15% at KL 0.001
    assert levels[20].winners == ("lynx",) and levels[20].runner_up == "oea"
    assert abs(levels[20].margin - 0.01) < 1e-12
    assert levels[50].winners == ("lynx",)  # (6, 2) at 55% beats the 70% points
    # above lynx's reach, OEA k0=1 and XShare budget=4 tie exactly: no runner-up, margin 0
    assert levels[60].winners == ("oea", "xshare") and levels[60].runner_up is None and levels[60].margin == 0
    verdict = pareto.verdict_lines(rows, list(levels.values()), [16])[0]
    assert "crossover" in verdict and "OEA = XShare at 60-70%" in verdict


def test_dominance_is_reported_when_one_policy_wins_every_level():
    rows = [row("lynx", "(3, 2)", 50, 0.01), row("oea", "k0=2", 50, 0.02), row("xshare", "budget=8", 50, 0.03)]
    levels = pareto.matched_levels(rows, None, 16, "kl") + pareto.matched_levels(rows, None, 16, "acc")
    assert [lv.level for lv in levels if lv.metric == "kl"] == [10, 20, 30, 40, 50]
    text = pareto.verdict_lines(rows, levels, [16])[0]
    assert "KL: **lynx (AffinityBinning) dominates**" in text
    assert "accuracy lost: **lynx (AffinityBinning) = OEA = XShare dominates (tied)**" in text  # all lose 0 points


def test_dominated_counts_compare_against_other_policies_only():
    rows = [row("lynx", "a", 40, 0.02), row("lynx", "b", 60, 0.08), row("oea", "k0=2", 45, 0.01)]
    for r in rows:
        r.front_kl = True
    counts = pareto.dominated_counts(rows, 16, "kl")
    assert counts["lynx"] == (1, 2)  # a: OEA saves more at less KL; b saves more than any OEA point
    assert counts["oea"] == (0, 1)


def test_ranges_and_budgets():
    assert pareto._ranges([10, 20, 30, 60, 80, 90]) == "10-30%, 60%, 80-90%"
    budgets = pareto.geometric_budgets(4, 64, 8)
    assert budgets[0] == 4 and 64 not in budgets and set(budgets) <= set(budget_grid(4, 64))
    assert budgets == sorted(budgets) and len(budgets) == 8


def test_setting_options_match_the_backend_keys():
    assert pareto.Setting("exact").options == {"policy": "off"}
    assert pareto.Setting("lynx", (("alpha", 3.0), ("beta", None))).options == {"policy": "lynx", "alpha": 3.0,
                                                                                 "beta": "none"}
    assert pareto.Setting("xshare", (("budget", 24),)).options == {"policy": "xshare", "budget": 24}


@torch.no_grad()
def test_restored_prefill_state_decodes_exactly_like_a_fresh_prefill():
    """What makes sharing one prefill across settings honest: a cache that decoded another batch,
    restored from a snapshot, gives bit-identical decode logits to a fresh prefill."""
    model, _, _ = load_model("tiny-config")
    torch.manual_seed(0)
    x, other = torch.randint(3, 259, (2, 4, 12))
    cache = make_cache(model, 4, 16)
    _prefill(model.forward, cache, x[:, :8])
    state = pareto.snapshot(cache)
    fresh = [_decode(model.forward, cache, x[:, p:p + 1], p).logits for p in range(8, 11)]
    _prefill(model.forward, cache, other[:, :10])  # dirty the cache: other tokens, other length
    _decode(model.forward, cache, other[:, 10:11], 10)
    pareto.restore(cache, state)
    assert pareto.max_state_diff(pareto.snapshot(cache), state) == 0
    restored = [_decode(model.forward, cache, x[:, p:p + 1], p).logits for p in range(8, 11)]
    for a, b in zip(fresh, restored):
        assert torch.equal(a, b)

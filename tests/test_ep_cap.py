"""The expert-parallel cap (``ep_ranks``) against a plain reference written here with loops."""

from __future__ import annotations

import math

import pytest
import torch

import lynx_compile
from lynx_compile import select_experts
from lynx_compile.policies.affinity_binning import kept_experts
from lynx_compile.policies.rules import RouterRule, router_scores


def skewed(num_tokens, num_experts, seed=0, spread=1.2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, generator=g) + torch.randn(num_tokens, num_experts, generator=g)) * spread


def order(row: list[float]) -> list[int]:
    return sorted(range(len(row)), key=lambda e: (-row[e], e))  # best first, ties to the lower index


def capped_reference(logits, top_k, alpha, beta, ranks):
    """lynx's kept set (held to the two-sort oracle in test_selector.py), capped per rank with
    loops, then each token's best k: inside the capped set first, then its best others.
    Returns (ids, the set before the cap, the set after it)."""
    rank, affinity = router_scores(logits.float(), RouterRule(), None)
    voters = torch.ones(logits.shape[0], dtype=torch.bool)
    kept = set(torch.nonzero(kept_experts(rank, affinity, voters, top_k, alpha, beta)).reshape(-1).tolist())
    before = set(kept)
    rows = rank.tolist()
    plain = [order(row)[:top_k] for row in rows]
    demand = [sum(e in p for p in plain) for e in range(logits.shape[1])]
    top1 = {p[0] for p in plain}
    per_rank = logits.shape[1] // ranks
    cap = math.ceil(len(kept) / ranks)
    for r in range(ranks):
        mine = [e for e in kept if e // per_rank == r]
        droppable = sorted((e for e in mine if e not in top1), key=lambda e: (demand[e], -e))  # least demanded first
        for e in droppable[:max(0, len(mine) - cap)]:
            kept.discard(e)
    ids = [[e for e in order(row) if e in kept][:top_k] for row in rows]
    ids = [mine + [e for e in order(row) if e not in mine][:top_k - len(mine)] for mine, row in zip(ids, rows)]
    return torch.tensor(ids), before, kept


@pytest.mark.parametrize("num_tokens,num_experts,top_k,ranks", [(16, 64, 4, 8), (16, 64, 4, 2), (4, 32, 8, 4),
                                                                 (32, 128, 8, 16), (3, 16, 2, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference(num_tokens, num_experts, top_k, ranks, seed):
    logits = skewed(num_tokens, num_experts, seed)
    _, ids = select_experts(logits, top_k, alpha=3.0, beta=2, ep_ranks=ranks)
    expected, before, kept = capped_reference(logits, top_k, 3.0, 2, ranks)
    assert torch.equal(ids, expected)
    top1 = torch.topk(logits, 1).indices.reshape(-1)
    assert torch.equal(ids[:, 0], top1)  # every token keeps its top-1 expert
    per_rank, cap = num_experts // ranks, math.ceil(len(before) / ranks)
    for r in range(ranks):  # the capped set: at most the cap per rank, top-1 experts aside
        assert len([e for e in kept if e // per_rank == r and e not in set(top1.tolist())]) <= cap


def test_lowers_the_busiest_rank():
    logits = skewed(16, 64, seed=3, spread=0.8)
    busiest = []
    for ranks in (None, 8):
        _, ids = select_experts(logits, 4, alpha=3.0, beta=2, ep_ranks=ranks)
        busiest.append(int(torch.bincount(ids.unique() // 8, minlength=8).max()))
    assert busiest[1] < busiest[0]


def test_one_rank_is_no_cap_and_every_token_keeps_k_experts():
    logits = skewed(16, 64)
    assert torch.equal(select_experts(logits, 4, alpha=3.0, beta=2, ep_ranks=1)[1],
                       select_experts(logits, 4, alpha=3.0, beta=2)[1])
    weights, ids = select_experts(logits, 4, alpha=3.0, beta=2, ep_ranks=16)
    assert all(len(set(row)) == 4 for row in ids.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))


def test_rows_that_are_not_live_change_nothing():
    logits = skewed(12, 64, seed=5)
    live = torch.tensor([True] * 8 + [False] * 4)
    _, alone = select_experts(logits[:8], 4, alpha=3.0, beta=2, ep_ranks=4)
    _, padded = select_experts(logits, 4, alpha=3.0, beta=2, ep_ranks=4, live=live)
    assert torch.equal(padded[:8], alone)


@pytest.mark.parametrize("ep_ranks", [0, 3, 2.0, True])
def test_bad_rank_counts_raise(ep_ranks):
    with pytest.raises(ValueError, match="ep_ranks"):
        select_experts(skewed(4, 64), 4, alpha=3.0, beta=2, ep_ranks=ep_ranks)


def test_option_reaches_the_graph():
    from moe_models import VOCAB, tiny_model

    model = tiny_model("qwen3_moe")
    experts = next(m for m in model.modules() if hasattr(m, "num_experts") and hasattr(m, "gate_up_proj")).num_experts
    input_ids = torch.randint(2, VOCAB, (16, 1), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", "ep_ranks": 2})
    with torch.no_grad(), lynx_compile.capture_routing() as cap:
        compiled(input_ids=input_ids, use_cache=False)
    assert all("ep_ranks=2" in m.knobs for m in lynx_compile.last_report().matched)
    assert cap.routing
    for event in cap.routing:
        _, ids = select_experts(event.logits, event.ids.shape[1], renormalize=event.rule.renormalize,
                                ep_ranks=2, **event.knobs)
        assert torch.equal(event.ids, ids)
    torch._dynamo.reset()
    odd = torch.compile(model.forward, backend="lynx", options={"compiler": "eager", "ep_ranks": experts + 1})
    with pytest.raises(Exception, match="does not divide"):
        with torch.no_grad():
            odd(input_ids=input_ids, use_cache=False)

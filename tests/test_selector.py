"""select_experts against ALGORITHM.md, checked with a plain exact reference written here."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lynx_compile import select_experts
from lynx_compile.kernels import select_cpu
from lynx_compile.policies.affinity_binning import vote_depth


@pytest.fixture(params=["cpu kernels", "torch form"])
def form(request, monkeypatch):
    """The selector's choice steps as the CPU kernels run them, and as other devices run them."""
    monkeypatch.setattr(select_cpu, "enabled", request.param == "cpu kernels")
    return request.param


def reference_ids(logits: torch.Tensor, k: int, alpha: float, beta: int | None) -> list[list[int]]:
    """ALGORITHM.md steps 1-6 token by token, in exact rational arithmetic."""
    rows = logits.float().tolist()
    num_tokens, num_experts = len(rows), len(rows[0])
    alpha32 = torch.tensor(alpha, dtype=torch.float32)
    bins = []
    for row in rows:
        best = max(row)
        # The same fp32 product the selector computes, then exact from there on.
        q = [math.ceil((torch.tensor(v - best, dtype=torch.float32) * alpha32).item()) for v in row]
        bins.append([q_e if beta is None else max(q_e, -beta) for q_e in q])
    votes = [[Fraction(num_tokens) ** q_e for q_e in row] for row in bins]
    score = [sum(votes[t][e] for t in range(num_tokens)) for e in range(num_experts)]
    kept = set()
    for t in range(num_tokens):
        m = [bins[t][e] + (score[e] - votes[t][e]) / num_tokens for e in range(num_experts)]
        order = sorted(range(num_experts), key=lambda e: (-m[e], -rows[t][e], e))
        kept.update(order[:k])
    return [
        sorted(kept, key=lambda e: (-rows[t][e], e))[:k]
        for t in range(num_tokens)
    ]


def skewed_logits(num_tokens: int, num_experts: int, seed: int, spread: float = 2.0) -> torch.Tensor:
    """Router-like logits: a shared expert popularity plus per-token noise."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.randn(num_experts, generator=g) * spread
    return popularity + torch.randn(num_tokens, num_experts, generator=g) * spread


CASES = [  # (T, E, k, alpha, beta)
    (2, 8, 2, 0.7, 1), (4, 8, 2, 1.0, 1), (7, 16, 4, 3.0, 2), (16, 64, 8, 3.0, 4),
    (16, 32, 4, 1.0, None), (32, 128, 8, 3.0, 2), (5, 6, 6, 2.0, 2), (9, 10, 1, 1.0, None),
]


@pytest.mark.parametrize("num_tokens,num_experts,k,alpha,beta", CASES)
def test_matches_exact_reference(num_tokens, num_experts, k, alpha, beta, form):
    for seed in range(3):
        logits = skewed_logits(num_tokens, num_experts, seed)
        _, ids = select_experts(logits, k, alpha=alpha, beta=beta)
        assert ids.tolist() == reference_ids(logits, k, alpha, beta)


def test_more_experts_than_the_packed_key_holds(form):
    # The torch form packs its ranking into one int64 and refuses what does not fit; the CPU
    # kernels compare the parts one by one and still choose exactly.
    logits = skewed_logits(3, 8192, seed=4)
    if form == "torch form":
        with pytest.raises(ValueError, match="E=8192"):
            select_experts(logits, 2, alpha=3.0, beta=None)
    else:
        _, ids = select_experts(logits, 2, alpha=3.0, beta=None)
        assert ids.tolist() == reference_ids(logits, 2, 3.0, None)


def test_ties_broken_by_own_logit_then_index():
    # Quantised logits produce many exact ties in bins and in votes.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randint(-3, 1, (8, 12), generator=g).float()
        _, ids = select_experts(logits, 3, alpha=1.0, beta=2)
        assert ids.tolist() == reference_ids(logits, 3, 1.0, 2)


def test_single_token_is_plain_topk():
    logits = skewed_logits(1, 64, seed=1)
    weights, ids = select_experts(logits, 8, alpha=3.0, beta=2)
    plain = torch.softmax(logits, -1).topk(8)
    assert ids.tolist() == plain.indices.tolist()
    torch.testing.assert_close(weights, plain.values / plain.values.sum(-1, keepdim=True))


def test_shapes_dtypes_and_distinct_experts():
    logits = skewed_logits(16, 32, seed=2).to(torch.bfloat16)
    weights, ids = select_experts(logits, 4, alpha=3.0, beta=2)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (16, 4)
    assert all(len(set(row)) == 4 for row in ids.tolist())


def test_confident_tokens_keep_their_bin0_experts():
    alpha, k = 3.0, 4
    for seed in range(5):
        logits = skewed_logits(16, 32, seed)
        _, ids = select_experts(logits, k, alpha=alpha, beta=2)
        gap = logits - logits.max(-1, keepdim=True).values
        bin0 = torch.ceil(gap * alpha) == 0
        for t in range(16):
            mine = set(torch.nonzero(bin0[t]).flatten().tolist())
            if len(mine) <= k:
                assert mine <= set(ids[t].tolist())
                assert logits[t].argmax().item() in ids[t].tolist()


def test_final_experts_are_best_logits_within_kept_set():
    logits = skewed_logits(16, 64, seed=3)
    _, ids = select_experts(logits, 8, alpha=3.0, beta=2)
    kept = set(ids.flatten().tolist())
    mask = torch.full((64,), float("-inf"))
    mask[list(kept)] = 0
    best = (logits + mask).topk(8).indices
    assert [set(r) for r in ids.tolist()] == [set(r) for r in best.tolist()]


def test_invariant_to_token_order():
    logits = skewed_logits(24, 32, seed=4)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    w, ids = select_experts(logits, 4, alpha=3.0, beta=2)
    w_p, ids_p = select_experts(logits[perm], 4, alpha=3.0, beta=2)
    assert torch.equal(ids[perm], ids_p)
    torch.testing.assert_close(w[perm], w_p, rtol=0, atol=0)


def test_renormalised_weights_sum_to_one():
    logits = skewed_logits(16, 32, seed=5)
    weights, ids = select_experts(logits, 4, alpha=3.0, beta=2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))
    probs = torch.softmax(logits, -1).gather(-1, ids)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))


def test_mass_rule_without_renormalising(form):
    logits = skewed_logits(16, 32, seed=6)
    weights, ids = select_experts(logits, 4, alpha=3.0, beta=2, renormalize=False)
    probs = torch.softmax(logits, -1)
    plain_mass = probs.topk(4).values.sum(-1)
    torch.testing.assert_close(weights.sum(-1), plain_mass)
    # Proportions among the chosen experts are the router's own.
    chosen = probs.gather(-1, ids)
    torch.testing.assert_close(weights / weights.sum(-1, keepdim=True), chosen / chosen.sum(-1, keepdim=True))
    # A token whose choice did not change gets exactly its plain weights.
    plain = probs.topk(4)
    same = (ids == plain.indices).all(-1)
    assert same.any()
    assert torch.equal(weights[same], plain.values[same])


def test_kept_set_smaller_than_plain_union_on_skewed_logits():
    # A tendency, not an invariant: checked on average over many batches.
    ratios = []
    for seed in range(20):
        logits = skewed_logits(16, 64, seed, spread=1.5)
        _, ids = select_experts(logits, 8, alpha=3.0, beta=2)
        plain = logits.topk(8).indices
        ratios.append(ids.unique().numel() / plain.unique().numel())
    assert sum(ratios) / len(ratios) < 0.85


def test_vote_depth_fits_int64():
    for num_tokens in (2, 16, 64, 1024, 4096):
        depth = vote_depth(num_tokens, None)
        assert (depth + 1) * num_tokens ** (depth + 1) < 2**62
        assert (depth + 2) * num_tokens ** (depth + 2) >= 2**62
        assert vote_depth(num_tokens, 2) == min(2, depth)


def test_device_side_depth_equals_vote_depth():
    # kept_experts counts voters on the device and looks the depth up in a table: it must be
    # exactly vote_depth, at the boundaries too.
    from lynx_compile.policies.affinity_binning import _depth_limits

    for beta in (1, 2, 4, None):
        limits = torch.tensor(_depth_limits(beta))
        boundaries = {b + d for b in _depth_limits(beta) for d in (-1, 0, 1)} | {2, 3, 16, 64, 1000, 5000}
        for voters in sorted(b for b in boundaries if 2 <= b < 2**40):
            assert int((voters <= limits).sum()) == vote_depth(voters, beta), (beta, voters)


def test_traces_without_host_sync():
    # Symbolic tracing fails on any data-dependent host read (.item(), nonzero, unique...).
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(logits):
        return select_experts(logits, 4, alpha=3.0, beta=2)

    gm = make_fx(fn, tracing_mode="symbolic")(skewed_logits(16, 32, seed=7))
    logits = skewed_logits(8, 32, seed=8)
    assert torch.equal(gm(logits)[1], fn(logits)[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(router_logits=torch.zeros(4), top_k=1, alpha=1.0), "2-D"),
        (dict(router_logits=torch.zeros(4, 8, dtype=torch.int64), top_k=1, alpha=1.0), "floating point"),
        (dict(router_logits=torch.zeros(4, 8), top_k=9, alpha=1.0), "top_k"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=0.0), "alpha"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, beta=0), "beta"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, beta=1.5), "beta"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, scoring="tanh"), "scoring must be one of"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, score_bias=torch.zeros(7)), r"shape \[8\]"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, bias_on_logits=1, score_bias=torch.zeros(8)),
         "must be bools"),
        (dict(router_logits=torch.zeros(4, 8), top_k=2, alpha=1.0, softmax_after_topk=True,
              score_bias=torch.zeros(8)), "not supported with softmax_after_topk"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    logits = kwargs.pop("router_logits")
    top_k = kwargs.pop("top_k")
    with pytest.raises(ValueError, match=match):
        select_experts(logits, top_k, **kwargs)

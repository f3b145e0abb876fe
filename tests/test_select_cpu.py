"""The selector's CPU kernels (kernels/select_cpu.cpp) against the torch form they replace:
the same kept set and the same choice (apart, and in one op), bit for bit, on the inputs that
stress the tie rules."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from lynx_compile.kernels import select_cpu
from lynx_compile.policies import affinity_binning, rules


@pytest.fixture(scope="module", autouse=True)
def built():
    if not select_cpu.available():
        if any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            pytest.fail(f"a C++ compiler is present but the selector kernels did not build: {select_cpu.build_error}")
        pytest.skip(f"no C++ compiler: {select_cpu.build_error}")


def router_rows(g, num_tokens, num_experts, case):
    """Rank and affinity [T, E] with ties (rounded values), -inf (group masks), -0.0, a NaN row,
    and an affinity on another scale than the rank (a biased router)."""
    rank = (torch.randn(num_tokens, num_experts, generator=g) * 2).round(decimals=case % 3)
    if case % 3 == 0:
        rank[torch.rand(num_tokens, num_experts, generator=g) < 0.3] = float("-inf")
    if case % 5 == 0:
        rank[rank == 0] = -0.0
    if case % 7 == 0:
        rank[0, 0] = float("nan")
    affinity = rank if case % 2 else torch.where(rank > float("-inf"), rank * 0.7 + torch.randn(num_experts, generator=g), rank)
    return rank, affinity


def sizes(g, case):
    if case % 50 == 0:  # rows past the kernel's one-thread grain, many experts, deep clamp-free bins
        return 600, 300, 8
    num_tokens, num_experts = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 70, (1,), generator=g))
    return num_tokens, num_experts, int(torch.randint(1, min(num_experts, 9) + 1, (1,), generator=g))


@pytest.mark.parametrize("chunk", range(4))
def test_kernels_equal_the_torch_form(chunk):
    g = torch.Generator().manual_seed(chunk)
    for case in range(chunk * 100, chunk * 100 + 100):
        num_tokens, num_experts, top_k = sizes(g, case)
        rank, affinity = router_rows(g, num_tokens, num_experts, case)
        healthy = rules.healthy_rows(rank)
        voters = healthy & (torch.rand(num_tokens, generator=g) < 0.8)
        alpha, beta = float(torch.rand(1, generator=g)) * 4 + 0.3, (None, 1, 2, 4)[case % 4]
        limits = list(affinity_binning._depth_limits(beta))
        kept = affinity_binning.kept_experts_torch(rank, affinity, voters, top_k, alpha, beta)
        assert torch.equal(torch.ops.lynx.affinity_kept(rank, affinity, voters, top_k, alpha, limits), kept), case
        confined = healthy & (torch.rand(num_tokens, generator=g) < 0.8)
        for with_plain in (False, True):
            together = torch.ops.lynx.affinity_choose(rank, affinity, voters, confined, healthy, top_k, alpha, limits,
                                                      with_plain)
            apart = rules.choose_in_kept(rank, kept, confined, healthy, top_k, False, with_plain)
            assert all(torch.equal(a, b) for a, b in zip(together, apart)), (case, with_plain)
        for refill, with_plain in itertools.product((False, True), (False, True)):
            want = rules.choose_in_kept(rank, kept, confined, healthy, top_k, refill, with_plain)
            got = torch.ops.lynx.choose_in_kept(rank, kept, confined, healthy, top_k, refill, with_plain)
            for name, a, b in zip(("ids", "valid", "plain"), got, want):
                assert torch.equal(a, b), (case, refill, with_plain, name)


def test_nobody_votes_keeps_every_expert():
    rank = torch.randn(5, 12)
    kept = torch.ops.lynx.affinity_kept(rank, rank, torch.zeros(5, dtype=torch.bool), 3, 2.0, [10, 5])
    assert kept.all()


def test_selector_runs_the_kernels_on_cpu():
    # The selector's traced graph calls the kernels on CPU (and the torch form when switched off).
    from torch.fx.experimental.proxy_tensor import make_fx

    from lynx_compile import select_experts

    def targets(enabled, **kw):
        select_cpu.enabled = enabled
        try:
            gm = make_fx(lambda x: select_experts(x, 4, alpha=3.0, beta=2, **kw))(torch.randn(8, 32))
        finally:
            select_cpu.enabled = True
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    lynx_ops = lambda names: {t for t in names if t.startswith("lynx.")}  # noqa: E731
    assert lynx_ops(targets(True)) == {"lynx.affinity_choose.default"}
    # with an expert-parallel cap between the kept set and the choice: the two steps
    assert lynx_ops(targets(True, ep_ranks=2)) == {"lynx.affinity_kept.default", "lynx.choose_in_kept.default"}
    assert not lynx_ops(targets(False))

"""The Triton kernels against the torch references.

On CPU they run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
costs milliseconds per program step: shapes stay small and blocks large. With
LYNX_TEST_CUDA=1 the same tests run compiled on the GPU (benchmarks/gpu_check.sh).
Every scratch buffer and output starts as NaN (or garbage integers), so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

from lynx_compile.kernels import triton_experts, triton_select
from lynx_compile.kernels import triton_experts_config
from lynx_compile.kernels.experts_ref import grouped_experts_reference
from lynx_compile.kernels.triton_experts_config import ExpertsConfig, default_config
from lynx_compile.kernels.triton_kernels import grouped_experts_triton, select_experts_triton
from lynx_compile.kernels.triton_moe_align import align_routing, max_tiles
from lynx_compile.policies.rules import RouterRule
from lynx_compile.selector import reference_route

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if os.environ.get("LYNX_TEST_CUDA") == "1" else "cpu")
# max |out - ref| / max |ref|: the 16-bit paths store the intermediate in the weights' dtype
# and the interpreter truncates fp32 -> bf16 (about 1 ulp = 2**-8 relative).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def poisoned(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -7, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    # Integer scratch of the experts op holds indices the kernels dereference; garbage there
    # would crash the interpreter, so test_align_routing poisons those separately.
    def experts_workspace(shape, dtype, device):
        return poisoned(shape, dtype, device) if dtype.is_floating_point else torch.empty(shape, dtype=dtype, device=device)

    monkeypatch.setattr(triton_experts, "_workspace", experts_workspace)
    monkeypatch.setattr(triton_select, "_workspace", poisoned)


# ---------------------------------------------------------------- experts

def make_experts(layout, num_tokens, hidden, inter, num_experts, k, dtype, *, bias=False, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = randn(num_tokens, hidden)
    if ids is None:
        ids = torch.rand(num_tokens, num_experts, generator=g).argsort(dim=-1)[:, :k]
    weights = torch.rand(ids.shape, generator=g) + 0.1
    w_in, w_out = hidden ** -0.5, inter ** -0.5
    w_up = b_gate_up = b_down = None
    if layout == "gate_up_concat":
        w_gate_up, w_down = randn(num_experts, 2 * inter, hidden, scale=w_in), randn(num_experts, hidden, inter, scale=w_out)
    elif layout == "gate_up_split":
        w_gate_up, w_down = randn(num_experts, inter, hidden, scale=w_in), randn(num_experts, hidden, inter, scale=w_out)
        w_up = randn(num_experts, inter, hidden, scale=w_in)
    elif layout == "up_only":
        w_gate_up, w_down = randn(num_experts, inter, hidden, scale=w_in), randn(num_experts, hidden, inter, scale=w_out)
    else:
        w_gate_up, w_down = randn(num_experts, hidden, 2 * inter, scale=w_in), randn(num_experts, inter, hidden, scale=w_out)
    if bias:
        b_gate_up, b_down = randn(num_experts, 2 * inter, scale=0.5), randn(num_experts, hidden, scale=0.5)
    return x, ids.to(DEVICE), weights.to(DEVICE), w_gate_up, w_down, w_up, b_gate_up, b_down


# Gate and up are about N(0, 1): low limits and softcaps, so the clamps and caps bite.
ACTIVATION_ARGS = {"swiglu_oai": [1.702, 1.5], "silu_clamped": [0.8], "swiglu_softcapped": [1.0, 0.7]}


def check_experts(args, activation, layout, *, config=None, dtype=None, norm=(None, "none", [])):
    dtype = dtype or args[3].dtype
    out = poisoned(args[0].shape, args[0].dtype, DEVICE)
    act_args = ACTIVATION_ARGS.get(activation, [])
    got = grouped_experts_triton(*args, activation, layout, act_args, *norm, out=out, config=config)
    assert got is out
    ref = grouped_experts_reference(*args, activation, layout, act_args, *norm).float()
    assert torch.isfinite(got).all(), "an output element was never written"
    scale = ref.abs().max()
    err = (got.float() - ref).abs().max()
    assert err <= TOLERANCE[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g}"


LAYOUT_CASES = [
    *[("gate_up_concat", act, False) for act in ("silu", "gelu", "gelu_tanh", "relu")],
    ("gate_up_split", "silu", False),
    ("gate_up_concat_t", "silu", False),
    ("gate_up_interleaved_t", "swiglu_oai", True),
    ("gate_up_interleaved_t", "silu", True),
    *[("gate_up_concat", act, False) for act in ("swiglu_oai", "silu_clamped", "swiglu_softcapped")],
    ("up_only", "relu2", False),
    ("up_only", "gelu_tanh", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,activation,bias", LAYOUT_CASES)
def test_experts_match_reference(layout, activation, bias, dtype):
    # H and I not powers of two; 8 experts, 5 tokens x 2 slots: some experts get none.
    args = make_experts(layout, 5, 48, 40, 8, 2, dtype, bias=bias)
    check_experts(args, activation, layout)


def ids_of(rows):
    return torch.tensor(rows, dtype=torch.int64)


ROUTING_CASES = {
    "one_token": dict(num_tokens=1, num_experts=8, k=2),
    "k_is_1": dict(num_tokens=6, num_experts=8, k=1),
    "k_is_E": dict(num_tokens=3, num_experts=4, k=4),
    "most_experts_idle": dict(num_tokens=2, num_experts=32, k=2),
    # Expert 3 takes all 20 tokens.
    "one_expert_takes_all": dict(num_tokens=20, num_experts=6, k=2, ids=ids_of([[3, t % 3] for t in range(20)])),
    "int32_ids": dict(num_tokens=4, num_experts=8, k=3, ids=ids_of([[0, 1, 2], [2, 1, 0], [7, 0, 5], [5, 7, 0]]).int()),
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_experts_routing_edge_cases(case):
    spec = dict(ROUTING_CASES[case])
    args = make_experts("gate_up_concat", spec.pop("num_tokens"), 40, 24, spec.pop("num_experts"), spec.pop("k"),
                        torch.float32, ids=spec.pop("ids", None))
    check_experts(args, "silu", "gate_up_concat")


SMALL_BLOCKS = ExpertsConfig(block_m=16, gate_up_block_n=16, gate_up_block_k=16, down_block_n=16,
                             down_block_k=16, split_k=2, num_warps=4, num_stages=2)


@pytest.mark.parametrize("layout,activation,bias", [LAYOUT_CASES[0], LAYOUT_CASES[4], LAYOUT_CASES[5], LAYOUT_CASES[-2]])
def test_experts_small_blocks_split_k_and_multi_tile(layout, activation, bias):
    # 30 tokens on 3 experts: 20 rows each, two 16-row tiles; I = 40 is 3 N-tiles and
    # 2 K-splits of 32 (the last one ragged); H = 48 is 3 K-steps.
    ids = ids_of([[t % 3, (t + 1) % 3] for t in range(30)])
    args = make_experts(layout, 30, 48, 40, 3, 2, torch.bfloat16, bias=bias, ids=ids)
    check_experts(args, activation, layout, config=SMALL_BLOCKS)


def test_experts_mixed_dtypes():
    # fp32 activations into bf16 weights (cast like transformers' grouped_mm), bf16 router weights.
    x, ids, weights, *rest = make_experts("gate_up_concat", 3, 40, 24, 8, 2, torch.bfloat16)
    check_experts((x.float(), ids, weights.bfloat16(), *rest), "gelu", "gate_up_concat", dtype=torch.bfloat16)


def post_norm(hidden, dtype, eps=1e-3):
    """(post_norm_weight, post_norm, post_norm_args): MuseSpark's input-scaled RMS norm, a random weight."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(hidden, generator=g) * 0.5).to(dtype).to(DEVICE), "input_scaled_rms", [eps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default", "split_k"])
def test_experts_post_norm(dtype, config):
    # 30 tokens on 6 experts (some with two 16-row tiles under SMALL_BLOCKS, whose down
    # projection splits K in 2: the norm reads the whole row); one slot on another rank.
    ids = ids_of([[t % 6, (t + 1 + t // 6) % 6] for t in range(30)])
    ids[3, 1] = 6
    args = make_experts("gate_up_concat", 30, 48, 40, 6, 2, dtype, ids=ids)
    check_experts(args, "silu", "gate_up_concat", config=config, norm=post_norm(48, dtype))


@pytest.fixture
def h200_sm_count(monkeypatch):
    """default_config as on an H200 (132 SMs), without a cached answer from elsewhere."""
    monkeypatch.setattr(triton_experts_config, "_sm_count", lambda index: 132)
    default_config.cache_clear()
    yield
    default_config.cache_clear()


def test_experts_with_gpu_default_config(h200_sm_count):
    """The config the GPU would pick (narrow tiles, deep K blocks) is valid and correct."""
    config = default_config(4, 2, 8, 48, 40, 2, torch.device("cuda", 0), interpreted=False)
    args = make_experts("gate_up_concat", 4, 48, 40, 8, 2, torch.bfloat16)
    check_experts(args, "silu", "gate_up_concat", config=config)


MODEL_SHAPES = [(4096, 14336, 8, 2), (2048, 768, 128, 8), (2048, 1024, 64, 8), (2880, 2880, 32, 4)]


@pytest.mark.parametrize("hidden,inter,num_experts,k", MODEL_SHAPES)
def test_gpu_default_config_is_sane(h200_sm_count, hidden, inter, num_experts, k):
    for num_tokens in (1, 2, 4, 8, 16, 32, 64, 256):
        config = default_config(num_tokens, k, num_experts, hidden, inter, 2, torch.device("cuda", 0), interpreted=False)
        config.check()
        assert config.block_m >= min(num_tokens, 64)  # each expert is one tile at decode
        assert 2 <= config.num_stages <= 4
        assert config.split_k >= 1 and config.split_k <= inter // config.down_block_k


def test_experts_no_tokens():
    args = make_experts("gate_up_concat", 0, 40, 24, 8, 2, torch.float32)
    assert grouped_experts_triton(*args, "silu", "gate_up_concat", []).shape == (0, 40)


def test_experts_reject_bad_arguments():
    args = make_experts("gate_up_concat", 2, 40, 24, 8, 2, torch.float32)
    x, ids, weights, w_gate_up, w_down, w_up, _, _ = args
    with pytest.raises(ValueError, match="layout"):
        grouped_experts_triton(*args, "silu", "gate_up_fancy", [])
    with pytest.raises(ValueError, match="activation"):
        grouped_experts_triton(*args, "swish", "gate_up_concat", [])
    with pytest.raises(ValueError, match="activation_args"):
        grouped_experts_triton(*args, "swiglu_oai", "gate_up_concat", [])
    with pytest.raises(ValueError, match="biases"):
        grouped_experts_triton(x, ids, weights, w_gate_up, w_down, None, None, w_down[:, :, 0], "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="dtype"):
        grouped_experts_triton(x, ids, weights, w_gate_up, w_down.half(), None, None, None, "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="w_down"):
        grouped_experts_triton(x, ids, weights, w_gate_up, w_down[:, :, :-1], None, None, None, "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="3-D"):
        grouped_experts_triton(x, ids, weights, w_gate_up[0], w_down, None, None, None, "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="hidden"):
        grouped_experts_triton(x[:, :-1], ids, weights, w_gate_up, w_down, None, None, None, "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="out"):
        grouped_experts_triton(*args, "silu", "gate_up_concat", [], out=torch.empty(2, 40, dtype=torch.float16, device=DEVICE))


def test_align_routing():
    ids = ids_of([[3, 0], [3, 5], [0, 3], [5, 3], [3, 1]]).to(DEVICE)  # expert 3: 5 rows
    num_tiles = max_tiles(5, 2, 8, 4)
    routing = align_routing(ids, 8, 4, workspace=poisoned)
    flat = ids.view(-1).cpu()
    expected_pairs = torch.sort(flat, stable=True).indices
    assert routing.sorted_pairs.cpu().tolist() == expected_pairs.tolist()
    # experts 0 (2 rows), 1 (1), 3 (5 rows: 2 tiles of 4), 5 (2); unused tail tiles are -1
    expected_tiles = [(0, 0, 2), (1, 2, 3), (3, 3, 7), (3, 7, 8), (5, 8, 10)]
    expected_tiles += [(-1, 0, 0)] * (num_tiles - len(expected_tiles))
    got = list(zip(routing.tile_expert.tolist(), routing.tile_start.tolist(), routing.tile_end.tolist()))
    assert [t[0] for t in got] == [t[0] for t in expected_tiles]
    assert [t for t in got if t[0] >= 0] == expected_tiles[:5]


def test_max_tiles_is_an_upper_bound():
    g = torch.Generator().manual_seed(0)
    for num_tokens, k, num_experts, block_m in [(1, 8, 128, 16), (64, 8, 128, 64), (300, 2, 8, 64), (100, 4, 16, 16)]:
        bound = max_tiles(num_tokens, k, num_experts, block_m)
        for skew in (0.0, 3.0):
            logits = torch.randn(num_tokens, num_experts, generator=g) + skew * torch.arange(num_experts)
            counts = torch.bincount(logits.topk(k).indices.view(-1), minlength=num_experts)
            assert int(((counts + block_m - 1) // block_m).sum()) <= bound


# ---------------------------------------------------------------- selector

def skewed_logits(num_tokens, num_experts, seed, spread=2.0):
    """A shared expert popularity plus per-token noise, like real routers."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.randn(num_experts, generator=g) * spread
    return popularity + torch.randn(num_tokens, num_experts, generator=g) * spread


def tied_logits(num_tokens, num_experts, seed):
    """Logits on a coarse grid: many exact ties in logits, bins and batch scores."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 1, (num_tokens, num_experts), generator=g).float() / 2
    logits[0] = 0.0  # a token indifferent between all experts
    if num_tokens > 2:
        logits[2] = logits[1]  # duplicate tokens
    return logits


def check_selector(logits, k, alpha, beta, renormalize=True):
    weights, ids = select_experts_triton(logits.to(DEVICE), k, alpha, beta, renormalize)
    ref_weights, ref_ids = reference_route(logits, k, RouterRule(renormalize=renormalize), "lynx",
                                           {"alpha": alpha, "beta": beta})
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.cpu().tolist() == ref_ids.tolist()
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)


SELECTOR_CASES = [  # (T, E, k, alpha, beta)
    (2, 8, 2, 0.7, 1), (4, 8, 2, 1.0, 1), (7, 16, 4, 3.0, 2), (16, 64, 8, 3.0, 4),
    (16, 32, 4, 1.0, None), (12, 128, 8, 3.0, 2), (5, 6, 6, 2.0, 2), (9, 10, 1, 1.0, None),
    (3, 256, 8, 3.0, 2), (8, 8, 8, 0.5, None),
]


@pytest.mark.parametrize("num_tokens,num_experts,k,alpha,beta", SELECTOR_CASES)
def test_selector_skewed(num_tokens, num_experts, k, alpha, beta):
    for seed in range(2):
        check_selector(skewed_logits(num_tokens, num_experts, seed), k, alpha, beta, renormalize=bool(seed))


@pytest.mark.parametrize("num_tokens,num_experts,k,alpha,beta",
                         [(6, 8, 2, 1.0, 1), (5, 16, 4, 2.0, 2), (11, 32, 8, 1.0, None), (4, 8, 3, 3.0, 4)])
def test_selector_ties(num_tokens, num_experts, k, alpha, beta):
    for seed in range(2):
        check_selector(tied_logits(num_tokens, num_experts, seed), k, alpha, beta, renormalize=bool(seed))


def test_selector_many_small_batches():
    """Random shapes and settings; the selection must also move experts, not only copy top-k."""
    g = torch.Generator().manual_seed(11)
    shrank = 0
    for case in range(16):
        num_tokens = int(torch.randint(2, 11, (1,), generator=g))
        num_experts = (8, 16, 32)[case % 3]
        k = int(torch.randint(1, min(num_experts, 6) + 1, (1,), generator=g))
        alpha = (0.5, 0.7, 1.0, 2.0, 3.0)[case % 5]
        beta = (None, 1, 2)[case % 3 - 1]
        logits = skewed_logits(num_tokens, num_experts, seed=100 + case, spread=float(torch.rand(1, generator=g)) * 3)
        check_selector(logits, k, alpha, beta, renormalize=case % 2 == 0)
        plain = logits.topk(k).indices.unique().numel()
        ids = reference_route(logits, k, RouterRule(), "lynx", {"alpha": alpha, "beta": beta})[1]
        shrank += ids.unique().numel() < plain
    assert shrank >= 4, f"only {shrank} of 16 batches used fewer experts than plain top-k"


def test_selector_uniform_random_and_large_batch():
    g = torch.Generator().manual_seed(7)
    check_selector(torch.randn(64, 128, generator=g), 8, 3.0, 2)
    check_selector(torch.randn(33, 64, generator=g) * 4, 6, 1.0, None, renormalize=False)


@pytest.mark.parametrize("beta", [None, 1, 2])
def test_selector_batch_of_one_is_plain_topk(beta):
    logits = skewed_logits(1, 64, seed=3)
    weights, ids = select_experts_triton(logits.to(DEVICE), 8, 3.0, beta, True)
    probs = logits.softmax(-1)
    assert ids.cpu().tolist() == probs.topk(8).indices.tolist()
    check_selector(logits, 8, 3.0, beta)


def test_selector_rejects_bad_arguments():
    logits = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        select_experts_triton(logits, 9, 1.0, 1, True)
    with pytest.raises(ValueError, match="alpha"):
        select_experts_triton(logits, 2, 0.0, 1, True)
    with pytest.raises(ValueError, match="beta"):
        select_experts_triton(logits, 2, 1.0, 0, True)

"""The lynx custom ops: opcheck, decode gating, and the CPU experts path vs the reference."""

from __future__ import annotations

import pytest
import torch

import lynx_compile  # noqa: F401  (registers torch.ops.lynx)
from lynx_compile import capture_routing, select_experts
from lynx_compile.step import step_buffers
from lynx_compile.kernels.experts_cpu import grouped_experts_cpu
from lynx_compile.kernels.experts_ref import grouped_experts_reference, post_norm_rows, post_norm_scale

select_op = torch.ops.lynx.select_experts.default
experts_op = torch.ops.lynx.grouped_experts.default


def softmax_select_args(logits, top_k, seq_len, alpha, beta, renormalize, decode_only, state=None, mask=None):
    """lynx::select_experts arguments for an ungrouped softmax router, policy lynx."""
    return (logits, None, state, mask, top_k, seq_len, "lynx", [alpha, beta or 0.0], decode_only, "softmax",
            renormalize, False, 1, 1, "max", 1.0)


def select(*args):
    return select_op(*softmax_select_args(*args))


def logits(num_tokens=8, num_experts=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, generator=g) * 2 + torch.randn(num_tokens, num_experts, generator=g) * 2


def experts(layout, num_experts=6, hidden=20, inter=12, dtype=torch.float32, seed=0):
    """(w_gate_up, w_down, w_up, b_gate_up, b_down) for ``layout``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(dtype)

    if layout == "gate_up_concat":
        return rand(num_experts, 2 * inter, hidden), rand(num_experts, hidden, inter), None, None, None
    if layout == "gate_up_split":
        return rand(num_experts, inter, hidden), rand(num_experts, hidden, inter), rand(num_experts, inter, hidden), None, None
    if layout == "gate_up_concat_t":
        return rand(num_experts, hidden, 2 * inter), rand(num_experts, inter, hidden), None, None, None
    if layout == "up_only":
        return rand(num_experts, inter, hidden), rand(num_experts, hidden, inter), None, None, None
    return (rand(num_experts, hidden, 2 * inter), rand(num_experts, inter, hidden), None,
            rand(num_experts, 2 * inter), rand(num_experts, hidden))


def routing(num_tokens, num_experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, k, generator=g)
    return ids, weights


LAYOUT_CASES = [
    ("gate_up_concat", "silu", []), ("gate_up_concat", "gelu_tanh", []),
    ("gate_up_split", "silu", []), ("gate_up_concat_t", "relu", []),
    ("gate_up_interleaved_t", "swiglu_oai", [1.702, 7.0]),
    # low limits and softcaps: gate and up are about N(0, 1), so the clamps and caps bite
    ("gate_up_concat", "swiglu_oai", [1.702, 0.5]), ("gate_up_concat", "silu_clamped", [0.5]),
    ("gate_up_concat", "swiglu_softcapped", [0.5, 0.3]), ("up_only", "relu2", []), ("up_only", "gelu", []),
]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("seq_len,num_tokens", [(1, 8), (4, 8), (1, 1), (-1, 8)])
def test_opcheck_select(seq_len, num_tokens, renormalize):
    torch.library.opcheck(select_op, softmax_select_args(logits(num_tokens), 4, seq_len, 3.0, 2, renormalize, True))


def test_opcheck_select_with_step_context():
    state, mask = step_buffers("cpu")
    args = softmax_select_args(logits(8), 4, 1, 3.0, 2, True, True, state, mask)
    torch.library.opcheck(select_op, args)


@pytest.mark.parametrize("layout,activation,args", LAYOUT_CASES)
def test_opcheck_experts(layout, activation, args):
    w = experts(layout)
    ids, weights = routing(5, 6, 2)
    torch.library.opcheck(experts_op, (torch.randn(5, 20), ids, weights, *w, activation, layout, args))


def test_decode_step_is_rerouted():
    x = logits(8)
    weights, ids = select(x, 4, 1, 3.0, 2, True, True)
    ref_w, ref_ids = select_experts(x, 4, alpha=3.0, beta=2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=0)


@pytest.mark.parametrize("seq_len,num_tokens,decode_only", [(4, 8, True), (1, 1, True), (1, 1, False), (-1, 8, True)])
def test_prefill_and_single_token_use_plain_topk(seq_len, num_tokens, decode_only):
    x = logits(num_tokens)
    with capture_routing() as cap:
        weights, ids = select(x, 4, seq_len, 3.0, 2, False, decode_only)
    plain = torch.softmax(x, -1).topk(4)
    assert torch.equal(ids, plain.indices)
    assert torch.equal(weights, plain.values)
    assert cap.routing[0].rerouted is False


def test_decode_only_false_reroutes_prefill():
    x = logits(8)
    _, ids = select(x, 4, 4, 3.0, 2, True, False)
    assert torch.equal(ids, select_experts(x, 4, alpha=3.0, beta=2)[1])


def test_seq_len_not_token_count_decides():
    # 8 tokens either way: one 8-token prefill, or a decode step of 8 sequences.
    x = logits(8, 64, seed=3)
    _, prefill_ids = select(x, 8, 8, 3.0, 2, True, True)
    _, decode_ids = select(x, 8, 1, 3.0, 2, True, True)
    assert torch.equal(prefill_ids, torch.softmax(x, -1).topk(8).indices)
    assert not torch.equal(prefill_ids, decode_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,activation,args", LAYOUT_CASES)
def test_cpu_experts_match_reference(layout, activation, args, dtype):
    w = experts(layout, dtype=dtype)
    ids, weights = routing(9, 6, 3, seed=1)
    ids[:4] = torch.tensor([5, 0, 1])  # one expert shared by many tokens; expert 2+ may be idle
    hidden = torch.randn(9, 20).to(dtype)
    out = grouped_experts_cpu(hidden, ids, weights, *w, activation, layout, args)
    ref = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_cpu_experts_reads_only_used_experts():
    w_gate_up, w_down, *_ = experts("gate_up_concat")
    w_gate_up[3] = float("nan")  # expert 3 receives no token: its weights must not be touched
    w_down[3] = float("nan")
    ids = torch.tensor([[0, 1], [1, 2], [5, 0]])
    out = experts_op(torch.randn(3, 20), ids, torch.rand(3, 2), w_gate_up, w_down, None, None, None,
                     "silu", "gate_up_concat", [])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "layout,activation,args,w_up,match",
    [
        ("packed", "silu", [], False, "unknown experts layout"),
        ("gate_up_concat", "tanh", [], False, "unknown activation"),
        ("gate_up_concat", "swiglu_oai", [], False, "activation_args"),
        ("gate_up_split", "silu", [], False, "needs w_up"),
        ("gate_up_concat", "silu_clamped", [], False, r"takes \[limit\] activation_args"),
        ("gate_up_concat", "swiglu_softcapped", [1.0, 0.0], False, "positive softcaps"),
        ("gate_up_concat", "relu2", [], False, "unknown activation 'relu2' for a gated layout"),
        ("up_only", "swiglu_oai", [1.702, 7.0], False, "unknown activation 'swiglu_oai' for an ungated layout"),
    ],
)
def test_experts_bad_arguments(layout, activation, args, w_up, match):
    w_gate_up, w_down, *_ = experts("gate_up_concat")
    ids, weights = routing(3, 6, 2)
    with pytest.raises(ValueError, match=match):
        experts_op(torch.randn(3, 20), ids, weights, w_gate_up, w_down, None, None, None, activation, layout, args)


# --- the post-expert norm (MuseSpark) --------------------------------------------------------

def post_norm(hidden=20, dtype=torch.float32, eps=0.05, seed=0):
    """(post_norm_weight, post_norm, post_norm_args): an input-scaled RMS norm with a random weight."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hidden, generator=g) * 0.5).to(dtype), "input_scaled_rms", [eps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_post_norm_rows_are_transformers_norm(dtype):
    from transformers.models.muse_spark.modeling_muse_spark import MuseSparkTextInputScaledRMSNorm

    weight, name, args = post_norm(20, dtype)
    norm = MuseSparkTextInputScaledRMSNorm(20, eps=args[0]).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        rows = torch.randn(7, 20).to(dtype)
        expected = norm(rows).float()
    got = post_norm_rows(rows.float(), name, post_norm_scale(weight), args, dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layout,activation,args", [LAYOUT_CASES[0], LAYOUT_CASES[4]])
def test_opcheck_experts_with_post_norm(layout, activation, args):
    w = experts(layout)
    ids, weights = routing(5, 6, 2)
    torch.library.opcheck(experts_op, (torch.randn(5, 20), ids, weights, *w, activation, layout, args, *post_norm()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,activation,args", [LAYOUT_CASES[0], LAYOUT_CASES[4], LAYOUT_CASES[-2]])
def test_cpu_experts_with_post_norm_match_reference(layout, activation, args, dtype):
    w = experts(layout, dtype=dtype)
    ids, weights = routing(9, 6, 3, seed=1)
    hidden = torch.randn(9, 20).to(dtype)
    norm = post_norm(20, dtype)
    out = experts_op(hidden, ids, weights, *w, activation, layout, args, *norm)
    ref = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args, *norm)
    unnormed = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args)
    assert out.dtype == dtype and not torch.allclose(ref, unnormed, rtol=0.1, atol=0.1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda n: (n[0], "layer_norm", n[2]), "unknown post-expert norm"),
        (lambda n: (n[0], n[1], []), r"takes \[eps\] post_norm_args"),
        (lambda n: (None, n[1], n[2]), "needs a float \\[20\\] post_norm_weight"),
        (lambda n: (n[0][:-1], n[1], n[2]), "needs a float \\[20\\] post_norm_weight"),
        (lambda n: (n[0], n[1], [-1.0]), "eps >= 0"),
        (lambda n: (n[0], "none", []), "without a post-expert norm"),
    ],
)
def test_experts_bad_post_norm(change, match):
    w_gate_up, w_down, *_ = experts("gate_up_concat")
    ids, weights = routing(3, 6, 2)
    with pytest.raises(ValueError, match=match):
        experts_op(torch.randn(3, 20), ids, weights, w_gate_up, w_down, None, None, None, "silu", "gate_up_concat", [],
                   *change(post_norm()))

"""The CPU experts paths (fused C++ kernel, grouped_mm) against the fp32 reference, and the
choice between them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import lynx_compile  # noqa: F401  (registers torch.ops.lynx)
from lynx_compile.kernels import experts_cpu, experts_cpu_fused
from lynx_compile.kernels.experts_cpu import choose_path, grouped_experts_cpu
from test_ops import experts as make_experts  # (w_gate_up, w_down, w_up, b_gate_up, b_down) for a layout
from test_ops import post_norm  # (post_norm_weight, post_norm, post_norm_args)
from lynx_compile.kernels.experts_ref import grouped_experts_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [  # layout, activation, activation_args
    ("gate_up_concat", "silu", []), ("gate_up_concat", "gelu", []), ("gate_up_concat", "gelu_tanh", []),
    ("gate_up_concat", "relu", []), ("gate_up_split", "silu", []), ("gate_up_concat_t", "silu", []),
    ("gate_up_interleaved_t", "swiglu_oai", [1.702, 7.0]),
    # gate and up are about N(0, 1): these limits and softcaps bite
    ("gate_up_concat", "swiglu_oai", [1.702, 0.5]), ("gate_up_concat", "silu_clamped", [0.5]),
    ("gate_up_concat", "swiglu_softcapped", [0.5, 0.3]), ("up_only", "relu2", []), ("up_only", "silu", []),
]
NEW_FORMS = CASES[7:]
# H not a multiple of the vector width or of 4 weight rows, and past one K chunk (512) of the dot kernel; I not a
# multiple of the gate block (16), of 4 weight rows or of 32 / 8 output columns.
SHAPES = [(45, 20), (600, 37)]


@pytest.fixture(scope="module")
def fused():
    if experts_cpu_fused.kernel() is None:
        if any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            pytest.fail(f"a C++ compiler is present but the fused kernel did not build: {experts_cpu_fused.build_error}")
        pytest.skip(f"no C++ compiler: {experts_cpu_fused.build_error}")
    return experts_cpu_fused.kernel()


def routing(num_tokens, num_experts, top_k, seed=0):
    """Distinct experts per token, as top-k gives, skewed so some experts get many rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_experts, generator=g) * 2 + torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k)
    return ids, weights


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def check(path, hidden, ids, weights, w, activation, layout, args, norm=(None, "none", []), **kw):
    out = grouped_experts_cpu(hidden, ids, weights, *w, activation, layout, args, *norm, path=path)
    ref = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args, *norm)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    torch.testing.assert_close(out, ref, **(kw or tolerance(hidden.dtype)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,activation,args", CASES)
@pytest.mark.parametrize("hidden_size,inter_size", SHAPES)
def test_fused_matches_reference(fused, layout, activation, args, dtype, hidden_size, inter_size):
    w = make_experts(layout, 8, hidden_size, inter_size, dtype)
    ids, weights = routing(11, 8, 3, seed=1)  # experts with 0, 1 and several rows
    check("fused", torch.randn(11, hidden_size).to(dtype), ids, weights, w, activation, layout, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,activation,args", [CASES[0], CASES[4], CASES[5], CASES[6], *NEW_FORMS])
def test_grouped_mm_matches_reference(layout, activation, args, dtype):
    w = make_experts(layout, 8, 44, 20, dtype)
    ids, weights = routing(11, 8, 3, seed=1)
    check("grouped_mm", torch.randn(11, 44).to(dtype), ids, weights, w, activation, layout, args)


@pytest.mark.parametrize("path", ["fused", "grouped_mm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,activation,args", [CASES[0], CASES[6], CASES[-2]])
@pytest.mark.parametrize("hidden_size,inter_size", SHAPES)
def test_post_norm_matches_reference(fused, path, layout, activation, args, dtype, hidden_size, inter_size):
    w = make_experts(layout, 8, hidden_size, inter_size, dtype)
    ids, weights = routing(11, 8, 3, seed=1)
    ids[0, 1] = 8  # one slot on another rank
    norm = post_norm(hidden_size, dtype, eps=1e-3)
    check(path, torch.randn(11, hidden_size).to(dtype), ids, weights, w, activation, layout, args, norm)


@pytest.mark.parametrize("layout,activation,args", [CASES[0], CASES[5], CASES[6], CASES[-2]])
@pytest.mark.parametrize(
    "num_tokens,top_k,ids",
    [
        (1, 2, None),  # T = 1
        (13, 1, "one expert"),  # one expert takes every token: 13 rows of one expert
        (9, 4, "all experts"),  # every expert active
        (0, 2, None),  # no tokens
    ],
)
def test_fused_row_counts(fused, layout, activation, args, num_tokens, top_k, ids):
    w = make_experts(layout, 6, 44, 20, torch.float32)
    route, weights = routing(num_tokens, 6, top_k, seed=2)
    if ids == "one expert":
        route = torch.full((num_tokens, 1), 4)
    elif ids == "all experts":
        route = torch.stack([torch.roll(torch.arange(6), -t)[:top_k] for t in range(num_tokens)])
    check("fused", torch.randn(num_tokens, 44), route, weights, w, activation, layout, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_strided_and_unaligned_inputs(fused, dtype):
    w_gate_up, w_down, *_ = make_experts("gate_up_concat", 6, 44, 20, dtype)
    ids, weights = routing(7, 6, 2, seed=3)
    base = torch.randn(7, 47).to(dtype)
    hidden = base[:, 1:45]  # row stride 47, data pointer off by one element
    assert hidden.data_ptr() % 16 and not hidden.is_contiguous()
    # weights one element off alignment, and the nn.Linear layout stored transposed (in-dim not
    # contiguous: the other kernel streams it)
    flat = torch.empty(w_gate_up.numel() + 1, dtype=dtype)[1:]
    unaligned = flat.view_as(w_gate_up).copy_(w_gate_up)
    transposed_store = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    w = (unaligned, transposed_store, None, None, None)
    out = check("fused", hidden, ids.int(), weights.to(dtype), w, "silu", "gate_up_concat", [])
    column_major = hidden.t().contiguous().t()  # element stride != 1: copied
    torch.testing.assert_close(grouped_experts_cpu(column_major, ids, weights.to(dtype), *w, "silu", "gate_up_concat", [],
                                                   path="fused"), out, rtol=0, atol=0)


def test_fused_reads_only_used_experts(fused):
    for layout in ("gate_up_concat", "gate_up_interleaved_t", "up_only"):
        w = make_experts(layout, 6, 44, 20, torch.float32)
        for t in w:
            if t is not None:
                t[3] = float("nan")  # expert 3 receives no token
        ids = torch.tensor([[0, 1], [1, 2], [5, 0]])
        args = [1.702, 7.0] if layout == "gate_up_interleaved_t" else []
        act = "swiglu_oai" if args else "silu"
        out = grouped_experts_cpu(torch.randn(3, 44), ids, torch.rand(3, 2), *w, act, layout, args, path="fused")
        assert torch.isfinite(out).all()


needs_bf16_dot = pytest.mark.skipif(not experts_cpu_fused.bf16_dot_available(),
                                    reason="this CPU has no AVX512-BF16 (or LYNX_CPU_BF16_DOT=0)")


@needs_bf16_dot
@pytest.mark.parametrize("layout,activation,args", CASES)
@pytest.mark.parametrize("hidden_size,inter_size", SHAPES)
def test_bf16_dot_kernel_and_the_widened_path_match_reference(fused, monkeypatch, layout, activation, args,
                                                              hidden_size, inter_size):
    w = make_experts(layout, 8, hidden_size, inter_size, torch.bfloat16)
    ids, weights = routing(11, 8, 3, seed=1)
    hidden = torch.randn(11, hidden_size).to(torch.bfloat16)
    outs = {}
    for setting in ("1", "0"):  # vdpbf16ps, then bf16 widened to fp32
        monkeypatch.setenv(experts_cpu_fused.BF16_DOT_ENV, setting)
        outs[setting] = check("fused", hidden, ids, weights, w, activation, layout, args)
    if layout in ("gate_up_concat", "gate_up_split", "up_only"):  # nn.Linear layouts: the dot kernels ran
        assert not torch.equal(outs["1"], outs["0"])  # the bf16 kernel rounds the activations to bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter_size", [64, 37])
def test_fused_rows_do_not_depend_on_other_rows_or_threads(fused, inter_size, dtype):
    w = make_experts("gate_up_concat", 8, 600, inter_size, dtype)
    ids, weights = routing(16, 8, 4, seed=4)
    hidden = torch.randn(16, 600).to(dtype)
    run = experts_cpu_fused.kernel()
    geometry = experts_cpu_fused.weight_geometry(*w, "gate_up_concat", inter_size)
    args = (geometry, "silu", [], inter_size)
    for norm in (("none", None, []), ("input_scaled_rms", torch.rand(600) + 0.5, [1e-3])):
        full = experts_cpu_fused.fused_experts(run, hidden, ids, weights, *w, *args, threads=2, norm=norm)
        alone = experts_cpu_fused.fused_experts(run, hidden[5:6], ids[5:6], weights[5:6], *w, *args, threads=1,
                                                norm=norm)
        one_thread = experts_cpu_fused.fused_experts(run, hidden, ids, weights, *w, *args, threads=1, norm=norm)
        assert torch.equal(full[5:6], alone)
        assert torch.equal(full, one_thread)


def test_fused_bad_expert_id(fused):
    w_gate_up, w_down, *_ = make_experts("gate_up_concat", 6, 44, 20, torch.float32)
    for bad in (7, -1):  # 6 is the expert-parallel sentinel
        with pytest.raises(ValueError, match=r"expert ids must be in \[0, 6\]"):
            grouped_experts_cpu(torch.randn(2, 44), torch.tensor([[0, 1], [bad, 2]]), torch.rand(2, 2), w_gate_up, w_down,
                                None, None, None, "silu", "gate_up_concat", [], path="fused")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h, w, d: (h[:, :-1], w, d), "hidden must be"),
        (lambda h, w, d: (h, w, d[:, :, :-1]), "w_down must be"),
        (lambda h, w, d: (h, w[:, :-1], d), "even gate_up width"),
    ],
)
def test_bad_shapes(change, match):
    w_gate_up, w_down, *_ = make_experts("gate_up_concat", 6, 44, 20, torch.float32)
    hidden, w_gate_up, w_down = change(torch.randn(3, 44), w_gate_up, w_down)
    ids, weights = routing(3, 6, 2)
    with pytest.raises(ValueError, match=match):
        grouped_experts_cpu(hidden, ids, weights, w_gate_up, w_down, None, None, None, "silu", "gate_up_concat", [])


# --- path selection -------------------------------------------------------------------------

DECODE_SHAPES = [  # E, k: OLMoE-1B-7B, Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-20b, the shipped model
    (64, 8), (128, 8), (8, 2), (32, 4), (64, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts,top_k", DECODE_SHAPES)
def test_decode_shapes_take_the_fused_kernel(fused, num_experts, top_k, dtype):
    for num_tokens in (1, 2, 4, 8, 16, 32):
        assert choose_path(num_tokens, top_k, num_experts, dtype) == "fused", (num_tokens, num_experts, top_k, dtype)


def test_shipped_model_takes_the_fused_kernel_at_every_batch(fused):
    for num_tokens in range(1, 65):
        assert choose_path(num_tokens, 4, 64, torch.float32) == "fused"


def test_prefill_takes_grouped_mm(fused):
    assert choose_path(2048, 8, 64, torch.float32) == "grouped_mm"
    assert choose_path(4096, 8, 64, torch.bfloat16) == "grouped_mm"


def test_unsupported_tensors_take_grouped_mm(fused):
    _, w_down, *_ = make_experts("gate_up_concat", 6, 44, 20, torch.float32)
    no_unit_stride = torch.randn(6, 40, 88)[:, :, ::2]  # neither matrix dimension contiguous
    hidden, ids, weights = torch.randn(2, 44), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    reason = experts_cpu_fused.weight_geometry(no_unit_stride, w_down, None, None, None, "gate_up_concat", 20)
    assert isinstance(reason, str) and choose_path(1, 2, 6, torch.float32, reason) == "grouped_mm"
    check(None, hidden, ids, weights, (no_unit_stride, w_down, None, None, None), "silu", "gate_up_concat", [])
    with pytest.raises(ValueError, match="cannot run here"):
        grouped_experts_cpu(hidden, ids, weights, no_unit_stride, w_down, None, None, None, "silu", "gate_up_concat", [],
                            path="fused")


def test_op_runs_decode_through_the_fused_kernel(fused, monkeypatch):
    def fail(*args):
        raise AssertionError("decode shape routed to the grouped_mm path")

    monkeypatch.setattr(experts_cpu, "grouped_mm_experts", fail)
    w_gate_up, w_down, *_ = make_experts("gate_up_concat", 64, 192, 64, torch.float32)
    ids, weights = routing(4, 64, 4)
    hidden = torch.randn(4, 192)
    out = torch.ops.lynx.grouped_experts(hidden, ids, weights, w_gate_up, w_down, None, None, None, "silu", "gate_up_concat", [])
    ref = grouped_experts_reference(hidden, ids, weights, w_gate_up, w_down)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


def test_no_compiler_falls_back(tmp_path):
    """A machine without a working C++ compiler: a warning, the torch path, the same result."""
    code = (
        "import warnings, torch\n"
        "from lynx_compile.kernels import experts_cpu_fused\n"
        "from lynx_compile.kernels.experts_cpu import choose_path, grouped_experts_cpu\n"
        "from lynx_compile.kernels.experts_ref import grouped_experts_reference\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert choose_path(4, 8, 64, torch.float32) == 'grouped_mm'\n"
        "assert any('could not be built' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
        "w = torch.randn(6, 40, 44), torch.randn(6, 44, 20)\n"
        "ids, x = torch.tensor([[0, 1], [1, 2]]), torch.randn(2, 44)\n"
        "out = grouped_experts_cpu(x, ids, torch.rand(2, 2), *w, None, None, None, 'silu', 'gate_up_concat', [])\n"
        "assert torch.isfinite(out).all()\n"
        "print('fallback ok:', experts_cpu_fused.build_error)\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fallback ok" in done.stdout

"""The expert forms beyond ``act(gate) * up``, in the transformers families that use them:
GPT-OSS's clamped SwiGLU on the concat layout (MiniMax-M3), clamped SiLU (HY-V4), softcapped
SwiGLU (Inkling2) and experts without a gate (NemotronH, relu2).

Each family's first MoE block is compiled by lynx with its constants set low enough that the
clamps and caps bite: the op must receive the model's activation and constants, and the output
must equal eager. A variant of each formula (one constant or op changed) must be left unchanged
with a reason. The kernels on their own (fused, grouped_mm, Triton) are tested against the
reference in test_experts_cpu.py / test_triton_kernels.py; here also with the expert-parallel
sentinel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import family_zoo
import lynx_compile.ops
from lynx_compile import collect_reports
from lynx_compile.kernels.experts_cpu import grouped_experts_cpu
from lynx_compile.kernels.experts_ref import grouped_experts_reference
from test_ops import experts as make_experts


def first_block(family: str, implementation: str = "grouped_mm"):
    entry = family_zoo.build(family)
    if entry.model is None:
        pytest.skip(entry.skip_reason)
    entry.model.set_experts_implementation(implementation)
    block = entry.model.get_submodule(entry.moe_blocks[0])
    hidden = torch.randn(2, 5, block.experts.hidden_dim, generator=torch.Generator().manual_seed(0))
    return block, hidden


def typical_magnitude(block, hidden) -> float:
    """The median |first-GEMM output| of expert 0 on ``hidden``: a limit that clamps about half."""
    weights = block.experts.gate_up_proj if block.experts.has_gate else block.experts.up_proj
    with torch.no_grad():
        return float((hidden.reshape(-1, hidden.shape[-1]) @ weights[0].T).abs().median())


def run_lynx(block, hidden, monkeypatch):
    """(lynx's output, eager's output, the report, the (activation, layout, args) of each op call,
    followed by (post_norm, post_norm_args) where the op is given a post-expert norm)."""
    calls = []

    def recording(*args):
        post_norm = (args[12], list(args[13])) if len(args) > 11 and args[12] != "none" else ()
        calls.append((args[8], args[9], list(args[10]), *post_norm))
        return grouped_experts_cpu(*args)

    monkeypatch.setattr(lynx_compile.ops, "grouped_experts_cpu", recording)
    torch._dynamo.reset()
    compiled = torch.compile(block.forward, backend="lynx", options={"compiler": "eager"})
    with torch.no_grad(), collect_reports() as reports:
        out = compiled(hidden)
        expected = block(hidden)
    (report,) = reports
    return out, expected, report, calls


def softcaps(block, gate, up):
    act = block.experts.act_fn
    act.gate_softcap.softcap, act.up_softcap.softcap = gate, up


def low_limit(block, hidden):
    block.experts.swiglu_limit = typical_magnitude(block, hidden)
    return block.experts.swiglu_limit


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family,setup,activation,layout", [
    ("minimax_m3_vl", low_limit, "swiglu_oai", "gate_up_concat"),
    ("hy_v4", low_limit, "silu_clamped", "gate_up_concat"),
    ("inkling2", lambda block, hidden: softcaps(block, 0.5, 0.25) or None, "swiglu_softcapped", "gate_up_concat"),
    ("nemotron_h", lambda block, hidden: None, "relu2", "up_only"),
])
def test_family_form_matches_with_its_constants(family, setup, activation, layout, implementation, monkeypatch):
    block, hidden = first_block(family, implementation)
    limit = setup(block, hidden)
    out, expected, report, calls = run_lynx(block, hidden, monkeypatch)
    assert [(m.layout, m.activation) for m in report.matched] == [(layout, activation)], report.unmatched
    expected_args = {"swiglu_oai": [getattr(block.experts, "swiglu_alpha", None), limit], "silu_clamped": [limit],
                     "swiglu_softcapped": [0.5, 0.25], "relu2": []}[activation]
    assert calls and all(call == (activation, layout, pytest.approx(expected_args)) for call in calls)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _plus_two(self, gate_up):  # MiniMax-M3's gate with (up + 2) in place of (up + 1)
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=self.swiglu_limit)
    up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
    return (up + 2.0) * (gate * torch.sigmoid(gate * self.swiglu_alpha))


def _asymmetric_clamp(self, gate_up):  # HY-V4's gate with up clamped to [-l, 2l]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.clamp(max=self.swiglu_limit)) * up.clamp(min=-self.swiglu_limit, max=2 * self.swiglu_limit)


def _mismatched_softcap(self, gate_up):  # Inkling2's gate with tanh(g / 4) * 5
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.tanh(gate / 4.0) * 5.0 * torch.sigmoid(gate) * (torch.tanh(up / 25.0) * 25.0)


class ReluCubed(torch.nn.Module):  # NemotronH's experts with relu(x) ** 3 in place of relu2
    def forward(self, x):
        return F.relu(x) ** 3


@pytest.mark.parametrize("family,variant,reason", [
    ("minimax_m3_vl", _plus_two, "the activation of gate and up is none of"),
    ("hy_v4", _asymmetric_clamp, "the activation of gate and up is none of"),
    ("inkling2", _mismatched_softcap, "the activation of gate and up is none of"),
    ("nemotron_h", ReluCubed(), "the second GEMM does not read the activation matched (relu, up_only)"),
])
def test_variant_left_unchanged_with_reason(family, variant, reason, monkeypatch):
    block, hidden = first_block(family)
    if family == "nemotron_h":
        monkeypatch.setattr(block.experts, "act_fn", variant)
    else:
        monkeypatch.setattr(type(block.experts), "_apply_gate", variant)
    out, expected, report, calls = run_lynx(block, hidden, monkeypatch)
    assert report.matched == [] and calls == []
    assert any("experts dispatch not recognised" in u.reason and reason in u.reason for u in report.unmatched), \
        [u.reason for u in report.unmatched]
    assert torch.equal(out, expected)


# --- the kernels with the expert-parallel sentinel -------------------------------------------

NEW_FORMS = [
    ("gate_up_concat", "swiglu_oai", [1.702, 0.5]), ("gate_up_concat", "silu_clamped", [0.5]),
    ("gate_up_concat", "swiglu_softcapped", [0.5, 0.3]), ("up_only", "relu2", []),
]


def sentinel_routing(num_tokens=7, num_experts=6, k=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(num_experts + 1, generator=g)[:k] for _ in range(num_tokens)])
    ids[0] = num_experts  # every slot of token 0 on another rank
    return ids, torch.rand(num_tokens, k, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["fused", "grouped_mm"])
@pytest.mark.parametrize("layout,activation,args", NEW_FORMS)
def test_cpu_kernels_skip_the_sentinel(layout, activation, args, path, dtype):
    w = make_experts(layout, 6, 44, 20, dtype)
    ids, weights = sentinel_routing()
    hidden = torch.randn(7, 44).to(dtype)
    ref = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args)
    assert ref[0].abs().max() == 0
    out = grouped_experts_cpu(hidden, ids, weights.masked_fill(ids == 6, float("nan")), *w, activation, layout, args,
                              path=path)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.triton
@pytest.mark.parametrize("layout,activation,args", NEW_FORMS)
def test_triton_skips_the_sentinel(layout, activation, args):
    from lynx_compile.kernels.triton_kernels import grouped_experts_triton

    w = make_experts(layout, 6, 44, 20, torch.float32)
    ids, weights = sentinel_routing()
    hidden = torch.randn(7, 44)
    ref = grouped_experts_reference(hidden, ids, weights, *w, activation, layout, args)
    out = grouped_experts_triton(hidden, ids, weights, *w, activation, layout, args,
                                 out=torch.full_like(hidden, float("nan")))
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


# --- a post-expert norm: MuseSpark ---------------------------------------------------------

def muse_spark_block(implementation, dtype):
    """MuseSpark's first MoE block in ``dtype``, its post-expert norm with a random weight and an
    eps of about the expert rows' mean square (so that it matters); and an input for it."""
    block, _ = first_block("muse_spark", implementation)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, block.config.hidden_size, generator=g)
    experts, norm = block.experts, block.experts.post_expert_norm
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g) * 0.5)
        x = block.pre_expert_norm(block.pre_expert_proj(hidden.view(-1, hidden.shape[-1])))
        gate, up = (x @ experts.gate_up_proj[0].T).chunk(2, dim=-1)
        rows = (experts.act_fn(gate) * up) @ experts.down_proj[0].T  # expert 0's rows
    norm.eps = float(rows.pow(2).mean(-1).median())
    return block.to(dtype), hidden.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_post_expert_norm_matches_eager(implementation, dtype, monkeypatch):
    block, hidden = muse_spark_block(implementation, dtype)
    out, expected, report, calls = run_lynx(block, hidden, monkeypatch)
    assert [(m.layout, m.activation) for m in report.matched] == [("gate_up_concat", "silu")], report.unmatched
    assert "post-expert norm input_scaled_rms" in report.matched[0].dispatch
    eps = block.experts.post_expert_norm.eps
    assert calls and all(call == ("silu", "gate_up_concat", [], "input_scaled_rms", [eps]) for call in calls)
    err, scale = (out.float() - expected.float()).abs().max(), expected.float().abs().max()
    assert err <= (1e-5 if dtype == torch.float32 else 2e-2) * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def _norm_then_scale(self, x):  # MuseSpark's centered RMS norm order: normalise, then scale
    return (self._norm(x.float()) * (1.0 + self.weight).float()).type_as(x)


def _pow_root(self, x):  # the input-scaled norm with pow(-0.5) in place of rsqrt
    z = (x.float() * (1.0 + self.weight).float()).type_as(x).float()
    return (z * (z.pow(2).mean(-1, keepdim=True) + self.eps).pow(-0.5)).type_as(x)


def _unrounded(self, x):  # the input-scaled norm without rounding the scaled rows to x's dtype
    return self._norm(x.float() * (1.0 + self.weight).float()).type_as(x)


@pytest.mark.parametrize("dtype,variant,reason", [
    (torch.float32, _norm_then_scale, "nor normed first by a known post-expert norm: input_scaled_rms"),
    (torch.float32, _pow_root, "input_scaled_rms: the shifted mean square is not taken to rsqrt"),
    (torch.bfloat16, _unrounded, "input_scaled_rms: the scaled rows are not rounded to torch.bfloat16"),
])
def test_post_expert_norm_variant_left_unchanged_with_reason(dtype, variant, reason, monkeypatch):
    block, hidden = muse_spark_block("grouped_mm", dtype)
    monkeypatch.setattr(type(block.experts.post_expert_norm), "forward", variant)
    out, expected, report, calls = run_lynx(block, hidden, monkeypatch)
    assert report.matched == [] and calls == []
    assert any("experts dispatch not recognised" in u.reason and reason in u.reason for u in report.unmatched), \
        [u.reason for u in report.unmatched]
    assert torch.equal(out, expected)

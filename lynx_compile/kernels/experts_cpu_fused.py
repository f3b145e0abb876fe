"""The fused C++ experts kernel (``experts_cpu.cpp``): build at first use, and call it.

Built by Inductor's C++ code cache (the compiler, flags and vector ISA Inductor itself uses on
this machine, its on-disk cache under ``TORCHINDUCTOR_CACHE_DIR``), so a second process loads
the built library in milliseconds. Where it cannot be built (no C++ compiler, an Inductor
without this API) ``kernel()`` returns None once, with a warning, and callers use the torch
path. ``LYNX_CPU_FUSED_EXPERTS=0`` turns it off; ``LYNX_CPU_BF16_DOT=0`` keeps bf16 experts off
the AVX512-BF16 dot products.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from .experts_ref import ACTIVATIONS, POST_NORMS

DISABLE_ENV = "LYNX_CPU_FUSED_EXPERTS"
BF16_DOT_ENV = "LYNX_CPU_BF16_DOT"
SOURCE = Path(__file__).with_name("experts_cpu.cpp")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATION_CODES = {  # experts_cpu.cpp's enum Act
    name: i for i, name in enumerate(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai", "silu_clamped",
                                      "swiglu_softcapped", "relu2"))
}
GATE_FORMS = {"gate_up_interleaved_t": 1, "up_only": 2}  # enum GateForm; the others: 0 (two halves or matrices)
POST_NORM_CODES = {"none": 0, "input_scaled_rms": 1}  # enum PostNorm
assert set(ACTIVATION_CODES) == set(ACTIVATIONS) and set(POST_NORM_CODES) == set(POST_NORMS)

_ARGTYPES = (
    ["const void*", "const int64_t*", "const float*", "const void*", "const void*", "const void*", "const void*",
     "const void*", "void*"]
    + ["int64_t"] * 27 + ["float", "float", "int64_t"]
    + ["const float*", "int64_t", "float"]  # the post-expert norm: fp32 scale 1 + w, its code, eps
    + ["int64_t"]  # bf16 experts on vdpbf16ps
)
_lock = threading.Lock()
_UNBUILT = object()
_kernel: Callable | None | object = _UNBUILT
build_error: str | None = None  # why the kernel is unavailable, once a build was tried
TRANSPOSED = ("gate_up_concat_t", "gate_up_interleaved_t")


def _build() -> Callable | None:
    global build_error
    if os.environ.get(DISABLE_ENV, "1") == "0":
        build_error = f"disabled by {DISABLE_ENV}=0"
        return None
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, SOURCE.read_text())
    except Exception as e:  # no compiler, a compile error, an Inductor without this API
        message = str(e).strip()
        build_error = f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"
        warnings.warn(f"lynx: the fused CPU experts kernel could not be built ({build_error}); "
                      "using the slower torch path", RuntimeWarning, stacklevel=4)
        return None


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def bf16_dot_available() -> bool:
    """Whether bf16 experts take the kernel's vdpbf16ps path: the CPU has AVX512-BF16 (torch's own
    check) and ``LYNX_CPU_BF16_DOT=0`` does not turn it off. Elsewhere bf16 weights are widened to
    fp32 in registers."""
    return os.environ.get(BF16_DOT_ENV, "1") != "0" and _cpu_has_bf16_dot()


def kernel() -> Callable | None:
    """The built kernel (built on the first call), or None where it cannot be built (reason in
    ``build_error``)."""
    global _kernel
    if _kernel is _UNBUILT:
        with _lock:
            if _kernel is _UNBUILT:
                _kernel = _build()
    return _kernel  # type: ignore[return-value]


def _matrix(w: torch.Tensor, transposed: bool) -> tuple[int, int, int] | None:
    """(stride per expert, stride along in, stride along out) of ``y = x @ M`` for expert weights
    ``w`` ([E, in, out] if ``transposed`` else nn.Linear [E, out, in]); None where neither the in
    nor the out dimension is contiguous (the kernel streams one of them)."""
    se, s1, s2 = w.stride()
    si, so = (s1, s2) if transposed else (s2, s1)
    return (se, si, so) if si == 1 or so == 1 else None


def weight_geometry(w_gate_up, w_down, w_up, b_gate_up, b_down, layout: str, inter_size: int) -> tuple[int, ...] | str:
    """The kernel's weight arguments (dtype code, strides, offsets), or why it cannot take
    these weights. Shapes must already be checked."""
    dtype = w_gate_up.dtype
    code = DTYPE_CODES.get(dtype)
    if code is None or w_down.dtype != dtype or (w_up is not None and w_up.dtype != dtype):
        return f"weight dtypes {w_gate_up.dtype}, {w_down.dtype}{', ' + str(w_up.dtype) if w_up is not None else ''}"
    if w_gate_up.device.type != "cpu":
        return "weights not on the CPU"
    transposed = layout in TRANSPOSED
    gate = _matrix(w_gate_up, transposed)
    up = gate if w_up is None else _matrix(w_up, transposed)
    down = _matrix(w_down, transposed)
    if gate is None or up is None or down is None:
        return "a weight with neither matrix dimension contiguous"
    if (b_gate_up is not None and b_gate_up.dtype != dtype) or (b_down is not None and b_down.dtype != dtype):
        return "bias dtype differs from the weights'"
    gate_form = GATE_FORMS.get(layout, 0)
    halves = layout in ("gate_up_concat", "gate_up_concat_t")  # up: the columns after the gate's
    up_off = inter_size if halves else (1 if layout == "gate_up_interleaved_t" else 0)
    bias_gate_up = (1, *b_gate_up.stride()) if b_gate_up is not None else (0, 0, 0)
    bias_down = (1, *b_down.stride()) if b_down is not None else (0, 0, 0)
    return (code, *gate, 0, *up, up_off, gate_form, *down, *bias_gate_up, *bias_down)


def fused_experts(
    run: Callable, hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    geometry: tuple[int, ...], activation: str, activation_args, inter_size: int, threads: int,
    norm=("none", None, []),
) -> torch.Tensor:
    """One call of the kernel: shapes checked, ``geometry`` from ``weight_geometry``; ``hidden``
    fp32, bf16 or fp16 on the CPU; ``norm``: the post-expert norm's (name, fp32 scale 1 + w [H],
    post_norm_args)."""
    num_tokens, hidden_size = hidden.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    ids = topk_ids if topk_ids.dtype == torch.int64 and topk_ids.is_contiguous() else topk_ids.long().contiguous()
    routed = topk_weights
    if routed.dtype != torch.float32 or not routed.is_contiguous():
        routed = routed.float().contiguous()
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype)
    p0, p1 = (*activation_args, 0.0, 0.0)[:2]  # the kernel's two activation constants
    post_norm, scale, post_norm_args = norm
    scale = routed if scale is None else scale.float().contiguous()  # (unread without a norm)
    try:
        run(
            hidden, ids, routed, w_gate_up, w_gate_up if w_up is None else w_up, w_down,
            w_gate_up if b_gate_up is None else b_gate_up, w_gate_up if b_down is None else b_down, out,
            num_tokens, hidden_size, inter_size, ids.shape[1], w_gate_up.shape[0], hidden.stride(0),
            DTYPE_CODES[hidden.dtype], *geometry, ACTIVATION_CODES[activation], float(p0), float(p1), threads,
            scale, POST_NORM_CODES[post_norm], float((*post_norm_args, 0.0)[0]),
            int(hidden.dtype == torch.bfloat16 and bf16_dot_available()),
        )
    except RuntimeError as e:  # the kernel's own checks (expert ids in range)
        raise ValueError(f"lynx::grouped_experts: {e}") from None
    return out

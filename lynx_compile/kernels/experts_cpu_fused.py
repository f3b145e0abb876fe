"""The fused C++ experts kernel (``experts_cpu.cpp``): build at first use, and call it.

Built by Inductor's C++ code cache (the compiler, flags and vector ISA Inductor itself uses on
this machine, its on-disk cache under ``TORCHINDUCTOR_CACHE_DIR``), so a second process loads
the built library in milliseconds. Where it cannot be built (no C++ compiler, an Inductor
without this API) ``kernel()`` returns None once, with a warning, and callers use the torch
path. ``LYNX_CPU_FUSED_EXPERTS=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

from .experts_ref import ACTIVATIONS

DISABLE_ENV = "LYNX_CPU_FUSED_EXPERTS"
SOURCE = Path(__file__).with_name("experts_cpu.cpp")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ACTIVATION_CODES = {name: i for i, name in enumerate(("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"))}
assert set(ACTIVATION_CODES) == set(ACTIVATIONS)

_ARGTYPES = (
    ["const void*", "const int64_t*", "const float*", "const void*", "const void*", "const void*", "const void*",
     "const void*", "void*"]
    + ["int64_t"] * 27 + ["float", "float", "int64_t"]
)
_lock = threading.Lock()
build_error: str | None = None  # why the kernel is unavailable, once a build was tried


@functools.cache
def _build() -> Callable | None:
    global build_error
    if os.environ.get(DISABLE_ENV, "1") == "0":
        build_error = f"disabled by {DISABLE_ENV}=0"
        return None
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        return CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, SOURCE.read_text())
    except Exception as e:  # no compiler, a compile error, an Inductor without this API
        build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        warnings.warn(f"lynx: the fused CPU experts kernel could not be built ({build_error}); "
                      "using the slower torch path", RuntimeWarning, stacklevel=3)
        return None


def kernel() -> Callable | None:
    """The built kernel, or None where it cannot be built (reason in ``build_error``)."""
    with _lock:
        return _build()


def matrix(w: torch.Tensor, transposed: bool) -> tuple[int, int, int] | None:
    """(stride per expert, stride along in, stride along out) of ``y = x @ M`` for expert weights
    ``w`` ([E, in, out] if ``transposed`` else nn.Linear [E, out, in]); None where neither the in
    nor the out dimension is contiguous (the kernel streams one of them)."""
    se, s1, s2 = w.stride()
    si, so = (s1, s2) if transposed else (s2, s1)
    return (se, si, so) if 1 in (si, so) else None


def supported(hidden, w_gate_up, w_down, w_up, b_gate_up, b_down, layout) -> str | None:
    """Why the fused kernel cannot take these tensors, or None if it can."""
    transposed = layout in ("gate_up_concat_t", "gate_up_interleaved_t")
    weights = [w for w in (w_gate_up, w_down, w_up) if w is not None]
    if w_gate_up.dtype not in DTYPE_CODES or any(w.dtype != w_gate_up.dtype for w in weights):
        return f"weight dtypes {[w.dtype for w in weights]}"
    if hidden.dtype not in DTYPE_CODES:
        return f"hidden dtype {hidden.dtype}"
    if any(b is not None and b.dtype != w_gate_up.dtype for b in (b_gate_up, b_down)):
        return "bias dtype differs from the weights'"
    if any(w.dim() != 3 or matrix(w, transposed) is None for w in weights):
        return "a weight with neither matrix dimension contiguous"
    if any(t.device.type != "cpu" for t in (hidden, *weights)):
        return "not on the CPU"
    return None


def fused_experts(
    run: Callable, hidden, topk_ids, topk_weights, w_gate_up, w_down, w_up, b_gate_up, b_down,
    activation, layout, activation_args, inter_size: int, threads: int,
) -> torch.Tensor:
    """One call of the kernel; arguments already checked (``supported``, shapes)."""
    num_tokens, hidden_size = hidden.shape
    num_experts = w_gate_up.shape[0]
    transposed = layout in ("gate_up_concat_t", "gate_up_interleaved_t")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    ids = topk_ids if topk_ids.dtype == torch.int64 and topk_ids.is_contiguous() else topk_ids.long().contiguous()
    routed = topk_weights
    if routed.dtype != torch.float32 or not routed.is_contiguous():
        routed = routed.float().contiguous()
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype)
    gate = matrix(w_gate_up, transposed)
    up = matrix(w_up, transposed) if w_up is not None else gate
    down = matrix(w_down, transposed)
    up_off = 0 if layout == "gate_up_split" else (1 if layout == "gate_up_interleaved_t" else inter_size)
    bg = b_gate_up.stride() if b_gate_up is not None else (0, 0)
    bd = b_down.stride() if b_down is not None else (0, 0)
    alpha, limit = activation_args if activation == "swiglu_oai" else (0.0, 0.0)
    try:
        run(
            hidden, ids, routed, w_gate_up, w_up if w_up is not None else w_gate_up, w_down,
            b_gate_up if b_gate_up is not None else w_gate_up, b_down if b_down is not None else w_gate_up, out,
            num_tokens, hidden_size, inter_size, ids.shape[1], num_experts, hidden.stride(0), DTYPE_CODES[hidden.dtype],
            DTYPE_CODES[w_gate_up.dtype], *gate, 0, *up, up_off, int(layout == "gate_up_interleaved_t"), *down,
            int(b_gate_up is not None), *bg, int(b_down is not None), *bd, ACTIVATION_CODES[activation],
            float(alpha), float(limit), threads,
        )
    except RuntimeError as e:  # the kernel's own checks (expert ids in range)
        raise ValueError(f"lynx::grouped_experts: {e}") from None
    return out

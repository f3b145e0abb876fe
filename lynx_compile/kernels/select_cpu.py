"""The selector's choice steps as CPU ops (``select_cpu.cpp``): schemas, fakes, build.

``lynx::affinity_kept`` is ``policies.affinity_binning.kept_experts`` and ``lynx::choose_in_kept``
the choice of ``policies.rules.finish`` (plus the plain top-k the plain-mass weights need);
``lynx::affinity_choose`` is both in one call (policy lynx without an expert-parallel cap). Each
is one ATen op with a C++ CPU kernel: a compiled graph calls them as it calls ``aten.topk``, where
the torch form costs two top-k calls, an ``index_put`` and several fused kernels with barriers
(``benchmarks/selector.py``). The torch form stays for other devices and as the definition the
tests hold these kernels to.

Built at first use by Inductor's C++ code cache (its compiler, flags and on-disk cache under
``TORCHINDUCTOR_CACHE_DIR``; ~25 s cold, milliseconds after). Where it cannot be built, or with
``LYNX_CPU_SELECTOR=0``, ``available()`` is False (with one warning when a build failed) and the
selector uses the torch form.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

DISABLE_ENV = "LYNX_CPU_SELECTOR"
SOURCE = Path(__file__).with_name("select_cpu.cpp")

_lib = torch.library.Library("lynx", "FRAGMENT")
_lib.define("affinity_kept(Tensor rank, Tensor affinity, Tensor voters, int top_k, float alpha, "
            "int[] depth_limits) -> Tensor")
_lib.define("choose_in_kept(Tensor rank, Tensor kept, Tensor confined, Tensor healthy, int top_k, bool refill, "
            "bool with_plain) -> (Tensor, Tensor, Tensor)")
_lib.define("affinity_choose(Tensor rank, Tensor affinity, Tensor voters, Tensor confined, Tensor healthy, "
            "int top_k, float alpha, int[] depth_limits, bool with_plain) -> (Tensor, Tensor, Tensor)")


@torch.library.register_fake("lynx::affinity_kept", lib=_lib)
def _(rank, affinity, voters, top_k, alpha, depth_limits):
    return rank.new_empty((rank.shape[1],), dtype=torch.bool)


def _choice_like(rank, top_k, with_plain):
    num_tokens = rank.shape[0]
    return (rank.new_empty((num_tokens, top_k), dtype=torch.int64),
            rank.new_empty((num_tokens, top_k), dtype=torch.bool),
            rank.new_empty((num_tokens, top_k if with_plain else 0), dtype=torch.int64))


@torch.library.register_fake("lynx::choose_in_kept", lib=_lib)
def _(rank, kept, confined, healthy, top_k, refill, with_plain):
    return _choice_like(rank, top_k, with_plain)


@torch.library.register_fake("lynx::affinity_choose", lib=_lib)
def _(rank, affinity, voters, confined, healthy, top_k, alpha, depth_limits, with_plain):
    return _choice_like(rank, top_k, with_plain)


enabled = True  # tests switch it off to run the torch form on CPU
_lock = threading.Lock()
_built: bool | None = None
build_error: str | None = None  # why the kernels are unavailable, once a build was tried


def _build() -> bool:
    global build_error
    if os.environ.get(DISABLE_ENV, "1") == "0":
        build_error = f"disabled by {DISABLE_ENV}=0"
        return False
    try:
        from torch._inductor.codecache import CppCodeCache

        CppCodeCache.load(SOURCE.read_text())  # loading the library registers the CPU kernels
    except Exception as e:  # no compiler, a compile error, an Inductor without this API
        message = str(e).strip()
        build_error = f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"
        warnings.warn(f"lynx: the CPU selector kernels could not be built ({build_error}); using the torch form",
                      RuntimeWarning, stacklevel=4)
        return False
    return True


def available() -> bool:
    """Whether the CPU kernels are registered (built on the first call)."""
    global _built
    if _built is None:
        with _lock:
            if _built is None:
                _built = _build()
    return _built


def use_for(tensor: torch.Tensor) -> bool:
    """Whether the selector should run its choice steps with these kernels for ``tensor``."""
    return enabled and tensor.device.type == "cpu" and available()

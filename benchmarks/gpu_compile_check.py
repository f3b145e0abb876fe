"""Compile every Triton kernel variant the GPU benchmark and tests launch, for sm_90, on a
machine with no GPU: catches compile errors, shared-memory overflows and register spills
before any device time is spent.

Triton is pointed at a fake CUDA driver that names an H100/H200 target, and each launch is
turned into a compile-only warmup. Launch arguments are real CPU tensors (allocated, never
touched), so Triton specialises them as it would on the GPU.

Run: PYTHONPATH=$PWD python benchmarks/gpu_compile_check.py   (TRITON_INTERPRET unset)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles real GPU code")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lynx_compile.kernels import triton_experts, triton_experts_config  # noqa: E402
from lynx_compile.kernels.triton_experts_config import ExpertsConfig, default_config  # noqa: E402
from lynx_compile.kernels.triton_select import select_experts_triton  # noqa: E402
from moe_layer_shapes import BATCHES, MODELS  # noqa: E402

SMEM_LIMIT = 227 * 1024  # bytes per block on Hopper
ARCH = 90


class FakeDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED = []  # (launch label, kernel name, compiled kernel)
LABEL = [""]
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((LABEL[0], self.__name__, kernel))
    return kernel


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas reports for the kernel."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    result = subprocess.run([get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", f.name, "-o", os.devnull],
                            capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def experts_launches():
    """(label, args, kwargs) of grouped_experts_triton as the benchmark and GPU tests call it."""
    for m in MODELS:
        e, h, i = m.experts, m.hidden, m.inter
        if m.layout == "gate_up_interleaved_t":
            w1, w2 = torch.empty(e, h, 2 * i, dtype=torch.bfloat16), torch.empty(e, i, h, dtype=torch.bfloat16)
        else:
            w1, w2 = torch.empty(e, 2 * i, h, dtype=torch.bfloat16), torch.empty(e, h, i, dtype=torch.bfloat16)
        b1 = torch.empty(e, 2 * i, dtype=torch.bfloat16) if m.bias else None
        b2 = torch.empty(e, h, dtype=torch.bfloat16) if m.bias else None
        for t in BATCHES:
            config = default_config(t, m.top_k, e, h, i, 2, torch.device("cuda", 0), interpreted=False)
            ids = torch.zeros(t, m.top_k, dtype=torch.int64)
            yield (f"{m.name} T={t} {config}",
                   (torch.empty(t, h, dtype=torch.bfloat16), ids, torch.empty(t, m.top_k), w1, w2, None, b1, b2,
                    m.activation, m.layout, list(m.activation_args)), dict(config=config))
    # The test suite's small shapes: every dtype, activation and layout.
    small = ExpertsConfig(16, 16, 16, 16, 16, 2, 4, 2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout, act, bias in [("gate_up_concat", "silu", False), ("gate_up_concat", "gelu", False),
                                  ("gate_up_concat", "gelu_tanh", False), ("gate_up_concat", "relu", False),
                                  ("gate_up_split", "silu", False), ("gate_up_interleaved_t", "swiglu_oai", True)]:
            e, h, i, t, k = 8, 48, 40, 5, 2
            shape1, shape2 = ((e, h, 2 * i), (e, i, h)) if layout == "gate_up_interleaved_t" else ((e, 2 * i, h), (e, h, i))
            if layout == "gate_up_split":
                shape1 = (e, i, h)
            w_up = torch.empty(e, i, h, dtype=dtype) if layout == "gate_up_split" else None
            b1, b2 = (torch.empty(e, 2 * i, dtype=dtype), torch.empty(e, h, dtype=dtype)) if bias else (None, None)
            args = (torch.empty(t, h, dtype=dtype), torch.zeros(t, k, dtype=torch.int64), torch.empty(t, k),
                    torch.empty(shape1, dtype=dtype), torch.empty(shape2, dtype=dtype), w_up, b1, b2, act, layout,
                    [1.702, 1.5] if act == "swiglu_oai" else [])
            for config in (default_config(t, k, e, h, i, dtype.itemsize, torch.device("cuda", 0), interpreted=False), small):
                yield f"test {dtype} {layout} {act}", args, dict(config=config)
    # The post-expert norm (MuseSpark): the down GEMM weighing by 1, then the per-row norm kernel, at the
    # tests' shape in every dtype and at MuseSpark's hidden size (4096: one 4096-wide block per row) in bf16.
    for dtype, (e, h, i, t, k) in [*((d, (8, 48, 40, 5, 2)) for d in (torch.float32, torch.float16, torch.bfloat16)),
                                   (torch.bfloat16, (8, 4096, 1024, 16, 8))]:
        args = (torch.empty(t, h, dtype=dtype), torch.zeros(t, k, dtype=torch.int64), torch.empty(t, k),
                torch.empty(e, 2 * i, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype), None, None, None, "silu",
                "gate_up_concat", [], torch.empty(h, dtype=dtype), "input_scaled_rms", [1e-8])
        for config in (default_config(t, k, e, h, i, dtype.itemsize, torch.device("cuda", 0), interpreted=False), small):
            yield f"test {dtype} post norm H={h}", args, dict(config=config)


def main():
    triton.runtime.driver.set_active(FakeDriver())
    triton_experts_config._sm_count = lambda index: 132
    triton_experts._check_tensors = lambda *args: None  # its device check wants CUDA tensors
    JITFunction.run = _compile_only

    for label, args, kwargs in experts_launches():
        LABEL[0] = label
        triton_experts.grouped_experts_triton(*args, **kwargs)
    for e in (8, 32, 64, 128, 256):
        for renormalize in (True, False):
            LABEL[0] = f"selector E={e} renormalize={renormalize}"
            select_experts_triton(torch.empty(16, e), min(8, e), 3.0, 2, renormalize)

    seen, failures = set(), 0
    print(f"{'kernel':16s} {'shared B':>9s} {'regs':>5s} {'spill B':>8s}  first launched by")
    for label, name, kernel in COMPILED:
        if id(kernel) in seen:
            continue
        seen.add(id(kernel))
        regs, spills = ptxas_usage(kernel.asm["ptx"])
        shared = kernel.metadata.shared
        flag = "  <-- over the shared-memory limit" if shared > SMEM_LIMIT else ("  <-- spills" if spills else "")
        failures += shared > SMEM_LIMIT
        print(f"{name:16s} {shared:9d} {regs:5d} {spills:8d}  {label}{flag}")
    print(f"\n{len(seen)} distinct kernels compiled for sm_{ARCH}; {failures} over the shared-memory limit")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

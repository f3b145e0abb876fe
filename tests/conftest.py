"""Test environment, set before torch, triton or any kernel module is imported.

- Triton kernels run for real on CPU through the interpreter (TRITON_INTERPRET=1), unless
  LYNX_TEST_CUDA=1 asks for the CUDA device (benchmarks/gpu_check.sh).
- One Inductor cache for the whole suite: Inductor compiles are the slow part.
- No hub downloads.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("LYNX_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

"""Entry points of the Triton CUDA kernels (issue: Triton kernels for CUDA).

Imported lazily by ``lynx_compile.ops`` for CUDA tensors; raises ImportError without Triton.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here means: use the torch fallback)

from .triton_experts import grouped_experts_triton  # noqa: F401
from .triton_select import select_experts_triton  # noqa: F401

"""lynx in vLLM: batch-aware expert selection for the MoE layers vLLM builds.

``pip install lynx-compile[vllm]`` registers the ``vllm.general_plugins`` entry point
``lynx`` (``register``). It does nothing until ``LYNX_VLLM_POLICY`` is set; see
``config.py`` for the environment variables and README "Serving with vLLM".
"""

from __future__ import annotations

from .plugin import register

__all__ = ["register"]

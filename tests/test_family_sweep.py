"""Every transformers family with @use_experts_implementation: rewritten and correct, or left
unchanged with a reason; never a wrong output (see family_sweep.py). Each family's first MoE
block is compiled alone to keep the suite fast (``python tests/family_sweep.py`` runs whole
models); families covered in depth by test_families.py are skipped."""

from __future__ import annotations

import pytest
from family_sweep import sweep_family
from family_zoo import DENSE_EXPERTS, families

IN_DEPTH = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}

# Families rewritten end to end with transformers 5.24 (constraints.txt): a regression guard.
REWRITTEN = {
    "afmoe", "aria", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2", "deepseek_v32",
    "dots1", "dots3_note", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo", "flint", "gemma4", "glm4_moe",
    "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
    "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "hy_v4_vl", "inkling", "inkling2", "inkling2_loop", "jamba",
    "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2_moe", "llama4", "mellum", "mimo_v2_flash", "minimax",
    "minimax_m2", "minimax_m3_vl", "mistral4", "mistral_large4", "muse_spark", "nemotron_h", "phimoe", "qwen3_5_moe",
    "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe", "qwen4_exp", "solar_open", "unlimited_ocr", "zaya",
}


# Llama-4 has no @use_experts_implementation class (its experts run densely); the zoo builds it too.
@pytest.mark.parametrize("family", [f for f in [*families(), *DENSE_EXPERTS] if f not in IN_DEPTH])
def test_family(family):
    result = sweep_family(family, scope="block")
    assert result.problems == []
    if result.status == "not built":
        assert result.reasons and result.reasons[0]
        return
    if result.status != "rewritten":  # whatever lynx left alone, it says why
        assert result.reasons, f"{family}: blocks left unchanged without a reason"
    assert (result.status == "rewritten") == (family in REWRITTEN), result.reasons[:2]

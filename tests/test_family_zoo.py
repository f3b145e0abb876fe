"""The family zoo (tests/family_zoo.py): every transformers family with an @use_experts_implementation
experts class either builds into a tiny MoE causal LM or says why not."""

from __future__ import annotations

import functools

import pytest
import torch
from family_zoo import NUM_EXPERTS, TOP_K, build, families

CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "glm4_moe"]
ALL = families()


@functools.cache
def entry_of(family):
    """One build per family for the whole module (the tests only read the models)."""
    return build(family)


def test_families_found():
    assert len(ALL) >= 60
    assert set(CORE) <= set(ALL)
    assert ALL == sorted(ALL)


def _experts_of(model, block_path, experts_class):
    block = model.get_submodule(block_path)
    return [m for m in block.children() if type(m).__name__ == experts_class]


@pytest.mark.parametrize("family", CORE)
def test_core_family_builds(family):
    entry = entry_of(family)
    assert entry.model is not None, entry.skip_reason
    assert entry.skip_reason is None
    assert entry.moe_blocks
    assert (entry.top_k, entry.num_experts) == (TOP_K, NUM_EXPERTS)
    assert entry.router_class is not None
    assert entry.vocab_size is not None and entry.vocab_size <= 128
    model = entry.model
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    text = model.config.get_text_config(decoder=True)
    assert text._experts_implementation == "grouped_mm"
    for path in entry.moe_blocks:
        (experts,) = _experts_of(model, path, entry.experts_class)
        assert {p.shape[0] for p in experts.parameters()} == {NUM_EXPERTS}
        # the router's own top-k agrees with the reported one
        block = model.get_submodule(path)
        ks = {m.top_k for m in block.modules() if isinstance(getattr(m, "top_k", None), int)}
        assert ks <= {TOP_K}
    with torch.no_grad():
        logits = model(input_ids=torch.randint(2, entry.vocab_size, (2, 5)), use_cache=False).logits
    assert logits.shape == (2, 5, entry.vocab_size)


@pytest.mark.parametrize("family", ALL)
def test_family_builds_or_says_why(family):
    entry = entry_of(family)
    assert entry.family == family
    if entry.model is None:
        assert isinstance(entry.skip_reason, str) and entry.skip_reason.strip()
        return
    assert entry.skip_reason is None
    assert entry.moe_blocks, "a built model reports its MoE blocks"
    assert entry.experts_class is not None
    for path in entry.moe_blocks:
        assert len(_experts_of(entry.model, path, entry.experts_class)) == 1, path
    assert entry.top_k is not None and entry.num_experts is not None
    assert entry.top_k >= 1 and entry.top_k <= entry.num_experts <= 16


def test_build_is_seeded():
    a, b, c = entry_of("qwen3_moe"), build("qwen3_moe", seed=0), build("qwen3_moe", seed=1)
    ids = torch.randint(2, a.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb, lc = (e.model(input_ids=ids, use_cache=False).logits for e in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.equal(la, lc)

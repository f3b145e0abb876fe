"""LynxRouter on vLLM's own router classes, under vLLM's forward context, without an engine.

What the engine tests cannot reach on CPU lives here: padded rows (vLLM's CPU runner never
pads), CUDA-graph modes and the V2 runner's capture context.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.forward_context import BatchDescriptor, ForwardContext, override_forward_context  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import FusedTopKBiasRouter  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter  # noqa: E402

from lynx_compile.integrations.vllm.router import LynxRouter  # noqa: E402
from lynx_compile.integrations.vllm.rules import RouterSpec, router_spec  # noqa: E402
from lynx_compile.integrations.vllm.runner import wrap_router  # noqa: E402
from lynx_compile.policies.rules import RouterRule, route_plain  # noqa: E402
from lynx_compile.selector import reference_route, select_experts  # noqa: E402

E = 32
BIAS = torch.linspace(-0.2, 0.2, E)

# (name, CPURouter keywords, top_k): the CPU router families of Mixtral/Qwen3/GPT-OSS,
# Qwen2-MoE/OLMoE, DeepSeek-V2 and DeepSeek-V3.
FAMILIES = [
    ("softmax renormalised", dict(renormalize=True), 4),
    ("softmax not renormalised", dict(renormalize=False), 4),
    ("softmax grouped", dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, renormalize=False,
                             routed_scaling_factor=1.5), 4),
    ("sigmoid + bias grouped", dict(use_grouped_topk=True, num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                                    e_score_correction_bias=BIAS, renormalize=True, routed_scaling_factor=2.5), 4),
    ("sigmoid grouped, no bias", dict(use_grouped_topk=True, num_expert_group=4, topk_group=2,
                                      scoring_func="sigmoid", renormalize=True), 4),
]


def cpu_router(keywords: dict, top_k: int) -> CPURouter:
    return CPURouter(top_k=top_k, global_num_experts=E, **keywords)


def moe_config(top_k: int) -> SimpleNamespace:
    return SimpleNamespace(experts_per_token=top_k, num_logical_experts=E, hidden_dim=64, hidden_dim_unpadded=None)


@pytest.fixture
def lynx_env(monkeypatch):
    monkeypatch.setenv("LYNX_VLLM_POLICY", "lynx")
    monkeypatch.delenv("LYNX_VLLM_OPTIONS", raising=False)
    monkeypatch.delenv("LYNX_VLLM_STATS", raising=False)


@contextmanager
def step(max_query_len: int | None = 1, padding: torch.Tensor | None = None,
         mode: CUDAGraphMode = CUDAGraphMode.NONE, descriptor: BatchDescriptor | None = None):
    metadata = {} if max_query_len is None else {"layers.0.attn": SimpleNamespace(max_query_len=max_query_len)}
    context = ForwardContext(no_compile_layers={}, attn_metadata=metadata, slot_mapping={},
                             cudagraph_runtime_mode=mode, batch_descriptor=descriptor, is_padding=padding)
    with override_forward_context(context):
        yield


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, E, generator=torch.Generator().manual_seed(seed))


def reference(router: CPURouter, spec: RouterSpec, scores: torch.Tensor, top_k: int, knobs: dict):
    """The selector's oracle (two stable sorts, every row votes) under the rule read off the router."""
    rule = RouterRule(**spec.keywords())
    return reference_route(scores, top_k, rule, "lynx", knobs, router.e_score_correction_bias)


def sorted_rows(ids: torch.Tensor) -> torch.Tensor:
    return ids.sort(dim=-1).values


@pytest.mark.parametrize("name, keywords, top_k", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_spec_reproduces_the_router(name, keywords, top_k):
    """lynx's plain top-k under the spec read off the router is the router's own choice and weights."""
    router = cpu_router(keywords, top_k)
    spec = router_spec(router, E)
    assert isinstance(spec, RouterSpec), spec
    scores = logits(64)
    weights, ids = router._compute_routing(None, scores, None)
    plain_weights, plain_ids = route_plain(scores, top_k, RouterRule(**spec.keywords()), router.e_score_correction_bias)
    order, plain_order = ids.long().sort(-1).indices, plain_ids.sort(-1).indices
    assert torch.equal(sorted_rows(ids.long()), sorted_rows(plain_ids))
    torch.testing.assert_close(weights.gather(-1, order), plain_weights.gather(-1, plain_order))


def test_specs_of_the_gpu_routers():
    """The CUDA routers' attributes give the same rules (their kernels need a GPU)."""
    assert router_spec(FusedTopKRouter(top_k=2, global_num_experts=E, renormalize=True), E) == RouterSpec()
    assert router_spec(FusedTopKRouter(top_k=2, global_num_experts=E, scoring_func="sigmoid", renormalize=False),
                       E) == RouterSpec(scoring="sigmoid", renormalize=False)
    grouped = GroupedTopKRouter(top_k=8, global_num_experts=E, num_expert_group=8, topk_group=4, renormalize=True,
                                scoring_func="sigmoid", routed_scaling_factor=2.5, e_score_correction_bias=BIAS)
    assert router_spec(grouped, E) == RouterSpec(scoring="sigmoid", num_groups=8, topk_groups=4,
                                                 group_score="top2_sum", scaling_factor=2.5, has_bias=True)
    biased = FusedTopKBiasRouter(top_k=8, global_num_experts=E, e_score_correction_bias=BIAS, renormalize=True,
                                 routed_scaling_factor=1.8, scoring_func="sigmoid")
    assert router_spec(biased, E) == RouterSpec(scoring="sigmoid", scaling_factor=1.8, has_bias=True)


def test_routers_lynx_cannot_reproduce_are_named():
    custom = CustomRoutingRouter(top_k=1, global_num_experts=E, custom_routing_function=lambda **kw: None,
                                 renormalize=False)
    softmax_bias = FusedTopKBiasRouter(top_k=2, global_num_experts=E, e_score_correction_bias=BIAS,
                                       scoring_func="softmax")
    v4 = CPURouter(top_k=2, global_num_experts=E, scoring_func="sqrtsoftplus", e_score_correction_bias=BIAS)
    cpu_custom = CPURouter(top_k=2, global_num_experts=E, custom_routing_function=lambda **kw: None)
    reasons = [router_spec(r, E) for r in (custom, softmax_bias, v4, cpu_custom)]
    assert all(isinstance(reason, str) for reason in reasons), reasons
    assert "CustomRoutingRouter" in reasons[0] and "softmax" in reasons[1]
    assert "sqrtsoftplus" in reasons[2] and "custom routing function" in reasons[3]


def test_unsupported_router_is_returned_unwrapped(lynx_env):
    router = CPURouter(top_k=2, global_num_experts=E, scoring_func="sqrtsoftplus", e_score_correction_bias=BIAS)
    assert wrap_router("model.layers.0.mlp.experts", moe_config(2), router) is router


def test_off_and_unset_leave_the_router(monkeypatch):
    router = cpu_router({}, 4)
    monkeypatch.delenv("LYNX_VLLM_POLICY", raising=False)
    assert wrap_router("layer", moe_config(4), router) is router
    monkeypatch.setenv("LYNX_VLLM_POLICY", "off")
    assert wrap_router("layer", moe_config(4), router) is router


@pytest.mark.parametrize("name, keywords, top_k", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_decode_is_the_reference_choice_prefill_is_vllms(lynx_env, name, keywords, top_k):
    inner = cpu_router(keywords, top_k)
    router = wrap_router(f"test.{name}.experts", moe_config(top_k), inner)
    assert isinstance(router, LynxRouter)
    plan, scores = router.plan, logits(16, seed=1)
    with step(max_query_len=1):
        weights, ids = router.select_experts(None, scores)
    ref_weights, ref_ids = reference(inner, plan.spec, scores, top_k, plan.knobs)
    assert ids.dtype == torch.int32
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    plain_weights, plain_ids = inner._compute_routing(None, scores, None)
    assert not torch.equal(sorted_rows(ids.long()), sorted_rows(plain_ids.long())), "the test batch must re-route"
    with step(max_query_len=7):  # a prefill or mixed step: vLLM's own routing, bit for bit
        weights, ids = router.select_experts(None, scores)
    assert torch.equal(ids, plain_ids) and torch.equal(weights, plain_weights)


@pytest.mark.parametrize("name, keywords, top_k", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_padded_rows_never_vote(lynx_env, name, keywords, top_k):
    inner = cpu_router(keywords, top_k)
    router = wrap_router(f"pad.{name}.experts", moe_config(top_k), inner)
    plan, live_rows = router.plan, 12
    padding = torch.arange(16) >= live_rows
    scores = logits(16, seed=2)
    with step(padding=padding):
        weights, ids = router.select_experts(None, scores)
    ref_weights, ref_ids = reference(inner, plan.spec, scores[:live_rows], top_k, plan.knobs)
    assert torch.equal(ids[:live_rows].long(), ref_ids)
    torch.testing.assert_close(weights[:live_rows], ref_weights)
    assert torch.isfinite(weights).all() and ((ids >= 0) & (ids < E)).all()
    other = scores.clone()
    other[live_rows:] = logits(4, seed=3) * 10  # whatever the padded rows hold
    with step(padding=padding):
        _, other_ids = router.select_experts(None, other)
    assert torch.equal(other_ids[:live_rows], ids[:live_rows])


def test_rows_vllm_skips_stay_skipped(lynx_env):
    """Where vLLM's router marks padding rows -1 (VLLM_MOE_SKIP_PADDING on GPU), lynx keeps them so."""
    inner = cpu_router({}, 4)
    router = wrap_router("skip.experts", moe_config(4), inner)
    scores = logits(8, seed=4)
    weights, ids = inner._compute_routing(None, scores, None)
    ids[6:] = -1
    weights[6:] = 0.0
    with step(padding=torch.arange(8) >= 6):
        new_weights, new_ids = torch.ops.lynx_vllm.reroute(scores, weights, ids, router.plan.name)
    assert (new_ids[6:] == -1).all() and (new_weights[6:] == 0).all()
    assert (new_ids[:6] >= 0).all()


@pytest.mark.parametrize("mode, descriptor, max_query_len, rerouted", [
    (CUDAGraphMode.PIECEWISE, BatchDescriptor(16), 1, False),  # one graph for every step kind
    (CUDAGraphMode.FULL, BatchDescriptor(16, 16, uniform=True), 1, True),  # V1 decode graph
    (CUDAGraphMode.FULL, BatchDescriptor(16, 16, uniform=False), 1, False),  # V1 mixed graph (1 token per dummy request)
    (CUDAGraphMode.FULL, BatchDescriptor(16, 8, uniform=True), 2, False),  # speculative verification
    (CUDAGraphMode.FULL, None, 1, True),  # V2 decode graph capture
    (CUDAGraphMode.FULL, None, 16, False),  # V2 mixed graph capture (max_query_len = tokens)
    (CUDAGraphMode.NONE, BatchDescriptor(16), 1, True),  # eager decode
    (CUDAGraphMode.NONE, BatchDescriptor(16), None, False),  # metadata says nothing (profile run)
], ids=["piecewise", "v1-full-uniform", "v1-full-mixed", "v1-full-spec", "v2-full-decode", "v2-full-mixed",
        "eager-decode", "no-metadata"])
def test_cuda_graph_modes(lynx_env, mode, descriptor, max_query_len, rerouted):
    inner = cpu_router({}, 4)
    router = wrap_router("graphs.experts", moe_config(4), inner)
    scores = logits(16, seed=1)
    plain_weights, plain_ids = inner._compute_routing(None, scores, None)
    with step(max_query_len=max_query_len, mode=mode, descriptor=descriptor):
        weights, ids = router.select_experts(None, scores)
    assert torch.equal(ids, plain_ids) != rerouted


def test_padding_mask_of_other_rows_disables(lynx_env):
    """Rows gathered from other ranks (data parallel) or split (sequence parallel): no re-routing."""
    inner = cpu_router({}, 4)
    router = wrap_router("dp.experts", moe_config(4), inner)
    scores = logits(16, seed=1)
    plain_weights, plain_ids = inner._compute_routing(None, scores, None)
    with step(padding=torch.zeros(8, dtype=torch.bool)):
        _, ids = router.select_experts(None, scores)
    assert torch.equal(ids, plain_ids)


def test_options_and_layer_settings(monkeypatch, lynx_env):
    monkeypatch.setenv("LYNX_VLLM_OPTIONS", '{"alpha": 0.5, "beta": "none", '
                                            '"layer_settings": {"model.layers.1.mlp": [4, 3]}}')
    inner = cpu_router({}, 4)
    first = wrap_router("model.layers.0.mlp.experts", moe_config(4), inner)
    second = wrap_router("model.layers.1.mlp.experts", moe_config(4), inner)
    assert first.plan.knobs == {"alpha": 0.5, "beta": None}
    assert second.plan.knobs == {"alpha": 4.0, "beta": 3}


def test_decode_only_false_reroutes_prefill(monkeypatch, lynx_env):
    monkeypatch.setenv("LYNX_VLLM_OPTIONS", '{"decode_only": false}')
    inner = cpu_router({}, 4)
    router = wrap_router("all.experts", moe_config(4), inner)
    scores = logits(16, seed=1)
    with step(max_query_len=9):
        _, ids = router.select_experts(None, scores)
    ref = reference(inner, router.plan.spec, scores, 4, router.plan.knobs)[1]
    assert torch.equal(ids.long(), ref)
    with step(max_query_len=9, mode=CUDAGraphMode.PIECEWISE, descriptor=BatchDescriptor(16)):
        _, ids = router.select_experts(None, scores)
    assert torch.equal(ids, inner._compute_routing(None, scores, None)[1])


def test_all_rows_padding_as_at_capture(lynx_env):
    """CUDA-graph capture runs a batch of padding rows only: the ids must still be valid experts."""
    inner = cpu_router(FAMILIES[3][1], 4)
    router = wrap_router("capture.experts", moe_config(4), inner)
    with step(padding=torch.ones(16, dtype=torch.bool)):
        weights, ids = router.select_experts(None, logits(16, seed=5))
    assert torch.isfinite(weights).all() and ((ids >= 0) & (ids < E)).all()


@pytest.mark.parametrize("policy, knobs", [("oea", {"k0": 2}), ("xshare", {"budget": 12})])
def test_peer_policies_reach_the_router(monkeypatch, policy, knobs):
    """The peers' policies go through the same router with their own knobs (LYNX_VLLM_OPTIONS)."""
    monkeypatch.setenv("LYNX_VLLM_POLICY", policy)
    monkeypatch.setenv("LYNX_VLLM_OPTIONS", json.dumps(knobs))
    inner = cpu_router(FAMILIES[0][1], 4)
    router = wrap_router(f"{policy}.experts", moe_config(4), inner)
    assert router.plan.policy == policy and router.plan.knobs == knobs
    scores = logits(16, seed=1)
    with step(max_query_len=1):
        weights, ids = router.select_experts(None, scores)
    expected_weights, expected_ids = select_experts(scores, 4, policy=policy, **knobs, **router.plan.spec.keywords())
    assert torch.equal(ids.long(), expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    with step(max_query_len=3):
        _, ids = router.select_experts(None, scores)
    assert torch.equal(ids, inner._compute_routing(None, scores, None)[1])

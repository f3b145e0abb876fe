"""Router rules beyond Mixtral's and DeepSeek-V3's: a selection bias on softmax probabilities
(ERNIE-4.5), a bias on the logits (Kolibri), sqrt-softplus scores (DeepSeek-V4), softmax group
limits with gathered weights (Mistral-4); and the router patterns that read them from a graph
(logit transforms before the score function, normalised router inputs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lynx_compile import select_experts
from lynx_compile.passes.graph_utils import op_kind, shape
from lynx_compile.passes.routers import Refusal, RouterMatch, match_router, router_candidates
from lynx_compile.policies.rules import RouterRule, route_plain, router_scores, rule_weights
from lynx_compile.selector import reference_route

NUM_EXPERTS, TOP_K, ALPHA, BETA = 16, 4, 3.0, 2


# --- the routers' own op sequences (transformers 5.24), written out ----------------------

def ernie_router(logits, bias, top_k, norm_min=1e-12):
    probs = F.softmax(logits, dim=1, dtype=torch.float)
    _, ids = torch.topk(probs + bias, top_k, dim=-1)
    weights = torch.gather(probs, dim=-1, index=ids)
    return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=norm_min), ids


def kolibri_router(logits, bias, top_k, norm_topk_prob):
    ids = torch.topk(logits + bias, top_k, dim=-1)[1]
    weights = logits.gather(1, ids).sigmoid()
    return (weights / weights.sum(dim=-1, keepdim=True) if norm_topk_prob else weights), ids


def deepseek_v4_router(logits, bias, top_k, scale):
    scores = F.softplus(logits).sqrt()
    ids = torch.topk(scores + bias, top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale, ids


def mistral4_router(logits, top_k, num_group, topk_group, scale):
    num_experts = logits.shape[1]
    scores = logits.softmax(-1)
    group_scores = scores.view(-1, num_group, num_experts // num_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_group, num_experts // num_group).reshape(-1, num_experts)
    ids = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale, ids


def phimoe_router(logits, jitter_eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer(logits, jitter_eps=jitter_eps, training=False, top_k=2)


# (name, select_experts rule keywords, whether it has a bias, the router's own code or None)
RULES = [
    ("ernie", dict(), True, lambda x, b: ernie_router(x, b, TOP_K)),
    ("softmax_bias_mass", dict(renormalize=False), True, None),
    ("kolibri", dict(scoring="sigmoid", renormalize=False, bias_on_logits=True), True,
     lambda x, b: kolibri_router(x, b, TOP_K, False)),
    ("kolibri_norm", dict(scoring="sigmoid", bias_on_logits=True), True,
     lambda x, b: kolibri_router(x, b, TOP_K, True)),
    ("deepseek_v4", dict(scoring="sqrtsoftplus", scaling_factor=1.5), True,
     lambda x, b: deepseek_v4_router(x, b, TOP_K, 1.5)),
    ("sqrtsoftplus", dict(scoring="sqrtsoftplus", renormalize=False), False, None),
    ("sqrtsoftplus_grouped", dict(scoring="sqrtsoftplus", num_groups=4, topk_groups=2, group_score="top2_sum"),
     True, None),
    ("mistral4", dict(num_groups=4, topk_groups=2, group_score="top2_sum", scaling_factor=2.0), False,
     lambda x, b: mistral4_router(x, TOP_K, 4, 2, 2.0)),
    ("softmax_bias_grouped", dict(num_groups=4, topk_groups=2, group_score="top2_sum"), True, None),
    ("phimoe", dict(scoring="sparsemixer", renormalize=False, jitter_eps=0.01), False,
     lambda x, b: phimoe_router(x, 0.01)),
    ("phimoe_wide", dict(scoring="sparsemixer", renormalize=False, jitter_eps=0.2), False,
     lambda x, b: phimoe_router(x, 0.2)),
]
IDS = [name for name, *_ in RULES]


def router_logits(num_tokens: int, seed: int, num_experts: int = NUM_EXPERTS) -> torch.Tensor:
    """Skewed router logits (a shared popularity plus per-token noise), dyadic so that sums
    with a dyadic bias are exact."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.randn(num_experts, generator=g) * 2
    return ((popularity + torch.randn(num_tokens, num_experts, generator=g) * 2) * 2**16).round() / 2**16


def bias_for(seed: int, num_experts: int = NUM_EXPERTS, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(num_experts, generator=g) * scale * 256).round() / 256


def rule_of(keywords: dict) -> RouterRule:
    return RouterRule(**{k: v for k, v in keywords.items()})


def top_k_of(keywords: dict) -> int:
    return 2 if keywords.get("scoring") == "sparsemixer" else TOP_K  # sparsemixer chooses two


def run(logits, keywords, bias, **extra):
    return select_experts(logits, top_k_of(keywords), alpha=ALPHA, beta=BETA, score_bias=bias, **keywords, **extra)


# --- plain routing is the router's -------------------------------------------------------

@pytest.mark.parametrize("name,keywords,biased,router", RULES, ids=IDS)
def test_plain_routing_is_the_routers_own(name, keywords, biased, router):
    for seed in range(3):
        logits = router_logits(24, seed)
        bias = bias_for(seed) if biased else None
        plain_weights, plain_ids = route_plain(logits, top_k_of(keywords), rule_of(keywords), bias)
        if router is not None:  # route_plain is the router's code
            own_weights, own_ids = router(logits, bias)
            assert torch.equal(own_ids.sort(-1).values, plain_ids.sort(-1).values)
            torch.testing.assert_close(own_weights.gather(-1, own_ids.argsort(-1)),
                                       plain_weights.gather(-1, plain_ids.argsort(-1)))
        weights, ids = run(logits, keywords, bias, decode=False)
        assert torch.equal(ids, plain_ids)
        torch.testing.assert_close(weights, plain_weights)
        one_weights, one_ids = run(logits[:1], keywords, bias)  # B = 1 re-routes to plain top-k
        assert torch.equal(one_ids, plain_ids[:1])
        torch.testing.assert_close(one_weights, plain_weights[:1])


WITH_ROUTER = [r for r in RULES if r[3] is not None]


@pytest.mark.parametrize("name,keywords,biased,router", WITH_ROUTER, ids=[r[0] for r in WITH_ROUTER])
def test_a_mutated_rule_is_not_the_router(name, keywords, biased, router):
    # the equality above can fail: each field of the rule changes the plain routing
    logits = router_logits(64, 0)
    bias = bias_for(0, scale=0.5) if biased else None
    own_weights, own_ids = router(logits, bias)
    own = own_weights.gather(-1, own_ids.argsort(-1)), own_ids.sort(-1).values
    rule = rule_of(keywords)
    other_scoring = {"softmax": "sigmoid", "sigmoid": "softmax", "sqrtsoftplus": "sigmoid",
                     "sparsemixer": "softmax"}[rule.scoring]
    mutants = [(dataclasses.replace(rule, scoring=other_scoring, jitter_eps=0.0), bias),
               (dataclasses.replace(rule, scaling_factor=rule.scaling_factor * 2), bias)]
    if rule.scoring == "sparsemixer":
        mutants += [(dataclasses.replace(rule, jitter_eps=rule.jitter_eps * 4), bias)]
    else:
        mutants += [(dataclasses.replace(rule, renormalize=not rule.renormalize), bias)]
    if biased:
        mutants += [(dataclasses.replace(rule, bias_on_logits=not rule.bias_on_logits), bias),
                    (dataclasses.replace(rule, bias_on_logits=False), None)]
    if rule.grouped:
        mutants += [(dataclasses.replace(rule, num_groups=1, topk_groups=1, group_score="max"), bias),
                    (dataclasses.replace(rule, group_score="max"), bias)]
    for mutant, mutant_bias in mutants:
        weights, ids = route_plain(logits, top_k_of(keywords), mutant, mutant_bias)
        same_ids = torch.equal(ids.sort(-1).values, own[1])
        assert not (same_ids and torch.allclose(weights.gather(-1, ids.argsort(-1)), own[0])), mutant


# --- the selector under each rule --------------------------------------------------------

@pytest.mark.parametrize("name,keywords,biased,router", RULES, ids=IDS)
def test_route_equals_the_reference(name, keywords, biased, router):
    for seed in range(4):
        logits = router_logits(16, seed)
        bias = bias_for(seed) if biased else None
        weights, ids = run(logits, keywords, bias)
        ref_weights, ref_ids = reference_route(logits, top_k_of(keywords), rule_of(keywords), "lynx",
                                               {"alpha": ALPHA, "beta": BETA}, bias)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize("name,keywords,biased,router", RULES, ids=IDS)
def test_algorithm_properties(name, keywords, biased, router):
    rule = rule_of(keywords)
    for seed in range(4):
        logits = router_logits(16, seed)
        bias = bias_for(seed) if biased else None
        weights, ids = run(logits, keywords, bias)
        rank, affinity = router_scores(logits, rule, bias)
        kept = torch.zeros(NUM_EXPERTS, dtype=torch.bool).scatter(0, ids.reshape(-1), True)
        # k distinct experts, all allowed, each token's best-ranked inside the kept set
        assert (ids.sort(-1).values.diff(dim=-1) > 0).all()
        assert (rank.gather(-1, ids) > float("-inf")).all()
        top_k = top_k_of(keywords)
        best_kept = rank.masked_fill(~kept, float("-inf")).topk(top_k, dim=-1).indices
        assert torch.equal(ids.sort(-1).values, best_kept.sort(-1).values)
        # a token whose bin 0 holds at most k experts keeps them all (confident tokens keep top-1)
        bins = torch.ceil((affinity - affinity.amax(-1, keepdim=True)) * ALPHA)
        bin0 = bins == 0
        for t in range(logits.shape[0]):
            if bin0[t].sum() <= top_k:
                assert set(bin0[t].nonzero().flatten().tolist()) <= set(ids[t].tolist())
        top1 = rank.argmax(-1, keepdim=True)
        confident = bin0.sum(-1) <= top_k
        assert (ids == top1).any(-1)[confident].all()
        if rule.renormalize:
            torch.testing.assert_close(weights.sum(-1), torch.full((16,), rule.scaling_factor))


@pytest.mark.parametrize("name,keywords,biased,router", [r for r in RULES if r[2]], ids=[r[0] for r in RULES if r[2]])
def test_a_constant_bias_shift_leaves_the_choice_unchanged(name, keywords, biased, router):
    # the router's ranking is invariant to adding a constant to its bias; so are lynx's bins
    for seed in range(3):
        logits, bias = router_logits(16, seed), bias_for(seed, scale=0.25)
        choices = [run(logits, keywords, bias + shift)[1] for shift in (0.0, 0.5, 1.0, -1.0, 4.0)]
        assert all(torch.equal(c, choices[0]) for c in choices[1:]), name


def test_sparsemixer_weighs_each_chosen_expert_by_its_window():
    # the router's masked softmax around each chosen expert, on all logits: a better expert the
    # batch dropped still counts in the softmax
    logits = torch.tensor([[4.0, 3.9, 3.0, 0.0], [1.0, 2.0, 1.95, 1.9]])
    ids = torch.tensor([[1, 2], [2, 3]])  # neither token's plain top-2
    weights = rule_weights(logits, logits, ids, torch.ones_like(ids, dtype=torch.bool), 2,
                           RouterRule("sparsemixer", False, jitter_eps=0.05))
    e = math.exp
    want = torch.tensor([
        [e(3.9) / (e(4.0) + e(3.9)), e(3.0) / (e(4.0) + e(3.0))],  # windows: >= 3.9 * 0.9 and >= 3.0 * 0.9
        [e(1.95) / (e(2.0) + e(1.95) + e(1.9)), e(1.9) / (e(2.0) + e(1.9))],
    ])
    torch.testing.assert_close(weights, want)


def orders_alike(rank: torch.Tensor, affinity: torch.Tensor) -> bool:
    """Per row, a higher rank never has a lower affinity (clamped affinities may tie)."""
    by_rank = rank.argsort(-1, descending=True)
    return bool((affinity.gather(-1, by_rank).diff(dim=-1) <= 0).all())


def test_the_softmax_bias_affinity_is_the_log_probability_shifted_to_the_best():
    logits, bias = router_logits(8, 0), bias_for(0, scale=0.3)
    rank, affinity = router_scores(logits, RouterRule(), bias)
    probs = logits.softmax(-1)
    best = rank.argmax(-1, keepdim=True)
    torch.testing.assert_close(rank, probs + bias)
    torch.testing.assert_close(affinity.gather(-1, best), probs.log().gather(-1, best))
    assert orders_alike(rank, affinity)
    # without a bias the gaps are the logits' gaps
    _, plain = router_scores(logits, RouterRule(), torch.zeros(NUM_EXPERTS))
    torch.testing.assert_close(plain - plain.amax(-1, keepdim=True), logits - logits.amax(-1, keepdim=True))


def test_the_sqrtsoftplus_affinity_inverts_the_score():
    logits = router_logits(8, 1) * 4  # up to large logits: no overflow in the inverse
    rule = RouterRule(scoring="sqrtsoftplus")
    _, affinity = router_scores(logits, rule, torch.zeros(NUM_EXPERTS))
    finite = F.softplus(logits).sqrt() ** 2 > 1e-6
    torch.testing.assert_close(affinity[finite], logits[finite], rtol=1e-4, atol=1e-3)
    rank, affinity = router_scores(logits, rule, bias_for(1, scale=0.5))
    assert torch.isfinite(affinity).all()
    assert orders_alike(rank, affinity)


def test_the_logit_bias_affinity_is_on_the_logit_scale():
    logits, bias = router_logits(8, 2), bias_for(2)
    rank, affinity = router_scores(logits, RouterRule(scoring="sigmoid", bias_on_logits=True), bias)
    assert torch.equal(rank, logits + bias) and torch.equal(affinity, logits + bias)


# --- the patterns, on the routers' graphs ------------------------------------------------

def router_matches(fn, *args) -> list:
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=keep_graph, fullgraph=True)(*args)
    (gm,) = graphs
    found = [(n, match_router(n)) for n in router_candidates(gm.graph.nodes)]
    # as rewrite_moe_layers reads them: other roots than a top-k count only when recognised
    return [f for n, f in found if op_kind(n) == "topk" or isinstance(f, (RouterMatch, Refusal))]


class SoftcapRouter(torch.nn.Module):
    """Laguna's router with its optional tanh softcap, MuseSpark's output multiplier."""

    def __init__(self, softcap: float = 0.0, multiplier: float = 1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(NUM_EXPERTS, 32))
        self.e_score_correction_bias = torch.nn.Parameter(torch.randn(NUM_EXPERTS) * 0.1, requires_grad=False)
        self.softcap, self.multiplier = softcap, multiplier

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, 32), self.weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits * self.multiplier
        scores = torch.sigmoid(logits)
        ids = torch.topk(scores + self.e_score_correction_bias.to(scores.dtype), TOP_K, dim=-1)[1]
        weights = scores.gather(-1, ids)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-15) * 2.5, ids


@pytest.mark.parametrize("softcap,multiplier", [(2.0, 1.0), (0.0, 0.7), (2.0, 3.0)])
def test_logit_transforms_before_the_scores(softcap, multiplier):
    (match,) = router_matches(SoftcapRouter(softcap, multiplier), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert match.rule == RouterRule("sigmoid", True, scaling_factor=2.5) and match.score_bias is not None
    assert op_kind(match.logits) == "mul"  # the transformed logits, right before the sigmoid
    assert shape(match.layer_input) == (2, 3, 32)


def test_an_unknown_logit_transform_is_refused():
    class Squared(SoftcapRouter):
        def forward(self, hidden):
            scores = torch.sigmoid(F.linear(hidden.reshape(-1, 32), self.weight) ** 2)
            ids = torch.topk(scores + self.e_score_correction_bias, TOP_K, dim=-1)[1]
            return scores.gather(-1, ids), ids

    (reason,) = router_matches(Squared(), torch.randn(2, 3, 32))
    assert isinstance(reason, str) and "not a linear layer" in reason


class NormalisedRouter(torch.nn.Module):
    """Gemma-4's router: an RMSNorm without weight, a per-channel scale, hidden ** -0.5."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, NUM_EXPERTS, bias=False)
        self.scale = torch.nn.Parameter(torch.ones(32))

    def forward(self, hidden):
        flat = hidden.reshape(-1, 32)
        x = flat.float()
        normed = (x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)).type_as(flat)
        probs = F.softmax(self.proj(normed * self.scale * 32**-0.5), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=TOP_K, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        return weights, ids


def test_a_normalised_router_input_is_traced_to_the_layer_input():
    (match,) = router_matches(NormalisedRouter(), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert shape(match.layer_input) == (2, 3, 32) and match.layer_input.op == "placeholder"


class KolibriRouter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(NUM_EXPERTS, 32))
        self.register_buffer("e_score_correction_bias", torch.randn(NUM_EXPERTS) * 0.1)

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, 32).float(), self.weight.float())
        return kolibri_router(logits, self.e_score_correction_bias, TOP_K, True)


class Deepseek4Router(KolibriRouter):
    def forward(self, hidden):
        return deepseek_v4_router(F.linear(hidden.reshape(-1, 32), self.weight), self.e_score_correction_bias,
                                  TOP_K, 1.5)


class ErnieRouter(KolibriRouter):
    def __init__(self):
        super().__init__()
        self.statics = torch.nn.Parameter(torch.randn(1, NUM_EXPERTS) * 0.1, requires_grad=False)

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, 32).float(), self.weight.float())
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        _, ids = torch.topk(probs + self.statics.squeeze(), TOP_K, dim=-1)
        weights = torch.gather(probs, dim=-1, index=ids)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=1e-12), ids


@pytest.mark.parametrize("module,pattern,rule", [
    (KolibriRouter, "logit_bias_topk", RouterRule("sigmoid", True, bias_on_logits=True)),
    (Deepseek4Router, "sigmoid_topk", RouterRule("sqrtsoftplus", True, scaling_factor=1.5)),
    (ErnieRouter, "softmax_topk", RouterRule("softmax", True)),
], ids=["kolibri", "deepseek_v4", "ernie"])
def test_biased_routers_are_matched_with_their_rule(module, pattern, rule):
    (match,) = router_matches(module(), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert (match.pattern, match.rule) == (pattern, rule) and match.score_bias is not None
    assert op_kind(match.logits) == "linear"


def test_top_k_values_of_biased_softmax_scores_are_refused():
    class Values(ErnieRouter):
        def forward(self, hidden):
            probs = F.softmax(F.linear(hidden.reshape(-1, 32), self.weight), dim=-1)
            return torch.topk(probs + self.statics.squeeze(), TOP_K, dim=-1)

    (reason,) = router_matches(Values(), torch.randn(2, 3, 32))
    assert isinstance(reason, str) and "top-k values of biased scores" in reason


def test_a_zero_filled_group_limit_over_biased_scores_is_refused():
    class ZeroFilled(ErnieRouter):
        def forward(self, hidden):
            probs = F.softmax(F.linear(hidden.reshape(-1, 32), self.weight), dim=-1)
            choice = probs + self.statics.squeeze()
            group_scores = choice.view(-1, 4, 4).topk(2, dim=-1)[0].sum(dim=-1)
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, torch.topk(group_scores, k=2, dim=-1, sorted=False)[1], 1)
            mask = group_mask.unsqueeze(-1).expand(-1, 4, 4).reshape(-1, NUM_EXPERTS)
            ids = torch.topk(choice.masked_fill(~mask.bool(), 0.0), TOP_K, dim=-1)[1]
            return probs.gather(1, ids), ids

    reasons = router_matches(ZeroFilled(), torch.randn(2, 3, 32))
    assert any("fills the other groups with 0.0, not -inf" in r for r in reasons if isinstance(r, str)), reasons
    assert not any(isinstance(r, RouterMatch) for r in reasons)


def test_a_softcapped_laguna_block_is_rewritten_and_exact(monkeypatch):
    # The zoo's Laguna has no softcap (the default); with one the selector reads the capped logits.
    import family_sweep
    import family_zoo

    entry = family_zoo.build("laguna")
    routers = [m for m in entry.model.modules() if type(m).__name__ == "LagunaTopKRouter"]
    assert routers
    for router in routers:
        router.router_logit_softcapping = 3.0
    monkeypatch.setattr(family_zoo, "build", lambda family, seed=0: entry)
    result = family_sweep.sweep_family("laguna", scope="block")
    assert result.problems == [] and result.status == "rewritten", (result.problems, result.reasons[:2])
    assert result.rules == ["sigmoid+bias, renormalised; gate_up_concat, silu"]


def test_the_sparsemixer_router_is_matched_from_its_first_max():
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    config = PhimoeConfig(hidden_size=32, num_local_experts=NUM_EXPERTS, num_experts_per_tok=2,
                          router_jitter_noise=0.05)
    router = PhimoeTopKRouter(config).eval()
    found = router_matches(lambda x: router(x.reshape(-1, 32))[1:], torch.randn(2, 3, 32))
    (match,) = found
    rule = RouterRule("sparsemixer", False, jitter_eps=0.05)
    assert (match.pattern, match.rule, match.top_k) == ("sparsemixer", rule, 2)
    assert shape(match.layer_input) == (2, 3, 32) and op_kind(match.ids) == "fn:concat"
    assert op_kind(match.topk) == "method:max"


@pytest.mark.parametrize("name,keywords,biased", [
    ("ernie", dict(), True),
    ("kolibri", dict(scoring="sigmoid", bias_on_logits=True), True),
    ("deepseek_v4", dict(scoring="sqrtsoftplus", scaling_factor=1.5), True),
    ("phimoe", dict(scoring="sparsemixer", renormalize=False, jitter_eps=0.2), False),
])
def test_the_op_carries_the_rule_through_its_decomposition(name, keywords, biased):
    # what Inductor traces in place of the op (backend.py) routes as select_experts does
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    import lynx_compile
    from lynx_compile.ops import select_experts_decomposition
    from lynx_compile.step import step_buffers

    select_op = torch.ops.lynx.select_experts.default
    rule = rule_of(keywords)
    top_k = top_k_of(keywords)
    state, mask = step_buffers("cpu")
    logits, bias = router_logits(12, 3), bias_for(3) if biased else None

    def select(x, b):
        return select_op(x, b, state, mask, top_k, 1, "lynx", [ALPHA, float(BETA)], True, rule.scoring,
                         rule.renormalize, rule.softmax_after_topk, rule.num_groups, rule.topk_groups,
                         rule.group_score, rule.scaling_factor, rule.bias_on_logits, rule.jitter_eps)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           decompositions={**select_decomp_table(), select_op: select_experts_decomposition})
    torch._dynamo.reset()
    traced = torch.compile(select, backend=backend, fullgraph=True)
    with lynx_compile.step(decode=True, num_live=12):
        got, eager = traced(logits, bias), select(logits, bias)
    want = run(logits, keywords, bias)
    assert torch.equal(got[1], want[1]) and torch.equal(eager[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(eager[0], want[0])


def test_a_softmax_router_biased_on_its_logits_is_matched():
    class SoftmaxLogitBias(KolibriRouter):
        def forward(self, hidden):
            logits = F.linear(hidden.reshape(-1, 32), self.weight)
            ids = torch.topk(logits + self.e_score_correction_bias, TOP_K, dim=-1)[1]
            weights = logits.softmax(-1).gather(1, ids)
            return weights / weights.sum(dim=-1, keepdim=True), ids

    (match,) = router_matches(SoftmaxLogitBias(), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert match.rule == RouterRule("softmax", True, bias_on_logits=True)
    logits, bias = router_logits(16, 4), bias_for(4)
    weights, ids = route_plain(logits, TOP_K, match.rule, bias)
    own_ids = torch.topk(logits + bias, TOP_K).indices
    own_weights = logits.softmax(-1).gather(1, own_ids)
    assert torch.equal(ids.sort(-1).values, own_ids.sort(-1).values)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))
    torch.testing.assert_close(weights.gather(-1, ids.argsort(-1)),
                               (own_weights / own_weights.sum(-1, keepdim=True)).gather(-1, own_ids.argsort(-1)))


def test_hash_routed_layers_are_left_with_their_reason():
    class HashRouter(KolibriRouter):  # DeepSeek-V4's DeepseekV4HashRouter
        def __init__(self):
            super().__init__()
            self.register_buffer("tid2eid", torch.randint(0, NUM_EXPERTS, (96, 2)))

        def forward(self, hidden, input_ids):
            scores = F.softplus(F.linear(hidden.reshape(-1, 32), self.weight)).sqrt()
            weights = scores.gather(1, self.tid2eid[input_ids.reshape(-1)].long())
            return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)

    found = router_matches(HashRouter(), torch.randn(2, 3, 32), torch.randint(0, 96, (2, 3)))
    refusals = [f for f in found if isinstance(f, Refusal)]
    assert len(refusals) == 1 and "static [96, 2] token-id table" in refusals[0], found


def test_a_grouped_mistral4_router_is_matched_with_its_groups():
    class Mistral4Router(KolibriRouter):
        def forward(self, hidden):
            return mistral4_router(F.linear(hidden.reshape(-1, 32), self.weight), TOP_K, 4, 2, 2.0)

    found = router_matches(Mistral4Router(), torch.randn(2, 3, 32))  # (with the group top-ks)
    (match,) = [m for m in found if isinstance(m, RouterMatch)]
    assert (match.pattern, match.rule) == ("softmax_topk", RouterRule("softmax", True, False, 4, 2, "top2_sum", 2.0))

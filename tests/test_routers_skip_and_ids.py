"""Two router forms beyond a plain top-k: a free "skip" class (Zaya) and an ids-only rewrite
(Inkling). Zaya ranks E experts and a skip class over [batch, seq, E + 1] probabilities and masks a
chosen skip to (id 0, weight 0) before its experts: the selector replaces the top-k and the gather,
the mask stays. Inkling weighs its chosen experts by a formula of its own (normalised together with
its shared experts' gates): the selector replaces the top-k's indices alone and that formula reads
them. Each is checked against the eager block with its top-k (and, for Zaya, its gather) answered
by the selector's choice, so everything else runs as transformers wrote it; and variants lynx must
not read this way are left unchanged with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_zoo import build
from test_router_rules import router_matches  # a module's router matches, as the pass reads them
from torch import nn
from torch.overrides import TorchFunctionMode

import lynx_compile
from lynx_compile import capture_routing
from lynx_compile.passes.graph_utils import op_kind, shape
from lynx_compile.passes.routers import RouterMatch
from lynx_compile.policies.rules import RouterRule, route_plain
from lynx_compile.selector import reference_route

# Wide bins, so that tokens move (the zoo's settings derived from k and E move few)
ZAYA_KNOBS, INKLING_KNOBS = {"alpha": 0.5, "beta": 1}, {"alpha": 0.2, "beta": 1}
HIDDEN = 64


class ChoiceInjected(TorchFunctionMode):
    """Answers ``torch.topk`` with the given ids (and, if given, the ``torch.gather`` at them with
    the given weights), shaped as the router's top-k: the eager model with another choice."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor | None = None):
        super().__init__()
        self.ids, self.weights, self.chosen = ids, weights, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.topk:
            self.chosen = self.ids.view(out[1].shape)
            return out[0], self.chosen
        if func is torch.gather and self.weights is not None and kwargs.get("index", args[-1]) is self.chosen:
            return self.weights.view(out.shape).to(out.dtype)
        return out


def decode_batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(32, 1, HIDDEN, generator=torch.Generator().manual_seed(seed))


def run_block(block, x, tmp_path=None, **options):
    dump = {"dump_dir": str(tmp_path)} if tmp_path else {}
    compiled = torch.compile(block, backend="lynx", options={"compiler": "eager", **dump, **options})
    with torch.no_grad(), capture_routing() as cap:
        out = compiled(x)
    return out, cap, lynx_compile.last_report()


def moved_rows(event) -> torch.Tensor:
    _, plain = route_plain(event.logits, event.ids.shape[1], event.rule, event.score_bias)
    return (event.ids.sort(-1).values != plain.sort(-1).values).any(-1)


def graph_after(dump_dir) -> str:
    """The code of the one graph handed to Inductor (its source-line comments left out)."""
    (after,) = dump_dir.glob("*/graph_*.after.py")
    return "\n".join(line for line in after.read_text().splitlines() if not line.lstrip().startswith("#"))


def check_reference(event):
    weights, ids = reference_route(event.logits, event.ids.shape[1], event.rule, "lynx", event.knobs,
                                   event.score_bias)
    assert torch.equal(ids, event.ids) and torch.equal(weights, event.weights)


# --- Zaya: a skip class, the router's mask kept ----------------------------------------

@pytest.fixture(scope="module")
def zaya_block():
    entry = build("zaya")
    block = entry.model.get_submodule(entry.moe_blocks[0])
    with torch.no_grad():  # a skip prior that a good share of tokens choose
        block.gate.balancing_biases[-1] = 0.0
    return block


def test_zaya_block_routes_over_the_skip_class_and_keeps_its_mask(zaya_block, tmp_path):
    x = decode_batch()
    out, cap, report = run_block(zaya_block, x, tmp_path, **ZAYA_KNOBS)
    (layer,) = report.matched
    assert (layer.rule, layer.replaced, layer.num_experts, layer.top_k) == (
        "softmax+bias, a skip class, not renormalised", "ids, weights", 8, 1)
    assert "decode when seq is 1" in layer.step  # the shape rule reads the block's [batch, seq, hidden] input
    (event,) = cap.routing
    assert event.rerouted and event.logits.shape == (32, 9)
    check_reference(event)
    skip = event.ids[:, 0] == 8
    assert skip.any() and (~skip).any() and moved_rows(event).any()  # the test sees all three cases
    # the experts see what transformers feeds them for this choice: a skip is expert 0 at weight 0
    with torch.no_grad(), ChoiceInjected(event.ids, event.weights):
        want = zaya_block(x)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
    text = graph_after(tmp_path)
    assert "masked_fill" in text and " == 8" in text and "lynx.select_experts" in text


def test_zaya_block_with_the_selector_off_is_the_eager_block(zaya_block):
    x = decode_batch(2)
    out, cap, report = run_block(zaya_block, x, policy="off")
    assert len(report.matched) == 1 and cap.routing == [] and len(cap.dispatch) == 1
    with torch.no_grad():
        torch.testing.assert_close(out[0], zaya_block(x)[0], rtol=1e-5, atol=1e-5)


def test_zaya_expert_parallel_cap_must_divide_the_classes(zaya_block):
    with pytest.raises(Exception, match="does not divide the 9 classes its selector ranks .its experts and a skip"):
        run_block(zaya_block, decode_batch(), ep_ranks=2, **ZAYA_KNOBS)


# --- Inkling: the ids alone, the router's own weights ----------------------------------

@pytest.fixture(scope="module")
def inkling_block():
    entry = build("inkling")
    return entry.model.get_submodule(entry.moe_blocks[0])


def test_inkling_block_takes_the_ids_and_keeps_its_weight_formula(inkling_block, tmp_path):
    x = decode_batch()
    out, cap, report = run_block(inkling_block, x, tmp_path, **INKLING_KNOBS)
    (layer,) = report.matched
    assert (layer.router, layer.replaced, layer.rule) == (
        "scored_ids", "ids", "sigmoid+bias, weights by the router's own formula")
    (event,) = cap.routing
    assert event.rerouted and event.logits.shape == (32, 8)  # the routed experts' logits alone
    check_reference(event)
    assert moved_rows(event).any()
    with torch.no_grad(), ChoiceInjected(event.ids):  # the router computes the weights of this choice
        want = inkling_block(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    text = graph_after(tmp_path)
    assert "log_sigmoid" in text and "logsumexp" in text and "torch.topk" not in text


def test_inkling_block_with_the_selector_off_is_the_eager_block(inkling_block):
    x = decode_batch(2)
    out, cap, report = run_block(inkling_block, x, policy="off")
    assert len(report.matched) == 1 and cap.routing == []
    with torch.no_grad():
        torch.testing.assert_close(out, inkling_block(x), rtol=1e-5, atol=1e-5)


# --- the pieces, on small routers -----------------------------------------------------

class SkipGate(nn.Module):
    """Zaya's router in small: an MLP to E + 1 logits over [batch, seq], a skip prior."""

    def __init__(self, num_experts=6, fill_weight=0.0, compare_with=None):
        super().__init__()
        self.down = nn.Linear(32, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, num_experts + 1, bias=False))
        self.register_buffer("balancing_biases", torch.zeros(num_experts + 1))
        self.num_experts, self.fill_weight = num_experts, fill_weight
        self.compare_with = num_experts if compare_with is None else compare_with

    def forward(self, hidden):
        probs = torch.softmax(self.mlp(self.down(hidden)), dim=-1)
        _, ids = torch.topk(probs.detach().float() + self.balancing_biases, 1, dim=-1)
        weights = torch.gather(probs, dim=2, index=ids)
        skip = ids == self.compare_with
        return weights.masked_fill(skip, self.fill_weight).reshape(-1, 1), ids.masked_fill(skip, 0).reshape(-1, 1)


class IdsOnlyGate(nn.Module):
    """Inkling's router in small: E routed and S shared logits, sigmoid + bias over the routed ones,
    weights by its own formula over the chosen and the shared logits."""

    def __init__(self, routed=8, shared=2, scoring=torch.sigmoid, values_as_weights=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(routed + shared, 32))
        self.register_buffer("e_score_correction_bias", torch.randn(routed) * 0.1)
        self.shared, self.scoring, self.values_as_weights = shared, scoring, values_as_weights

    def forward(self, hidden):
        logits = F.linear(hidden.reshape(-1, 32), self.weight)
        values, ids = torch.topk(self.scoring(logits)[..., : -self.shared] + self.e_score_correction_bias, 2, dim=-1)
        chosen = values if self.values_as_weights else logits[..., : -self.shared].gather(-1, ids)
        gates = F.logsigmoid(torch.cat([chosen, logits[..., -self.shared:]], dim=-1)).softmax(-1)
        return gates[..., :2].contiguous(), ids, gates[..., 2:].contiguous()


class Scaled(nn.Module):
    def forward(self, weights, ids=None):
        return weights * (2.0 if ids is None else ids.float())


class Block(nn.Module):
    """A router and what reads its choice: the experts, and (Inkling) the shared experts' gates."""

    def __init__(self, gate):
        super().__init__()
        self.gate, self.experts, self.shared = gate, Scaled(), Scaled()

    def forward(self, hidden):
        weights, ids, *shared = self.gate(hidden)
        out = self.experts(weights, ids)
        return (out, self.shared(shared[0])) if shared else out


def test_a_router_network_is_traced_to_the_layer_input_and_its_skip_class_read():
    (match,) = router_matches(Block(SkipGate()), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert match.layer_input.op == "placeholder" and shape(match.layer_input) == (2, 3, 32)
    assert (match.skip_class, match.classes, match.num_experts) == (True, 7, 6)
    assert match.rule == RouterRule("softmax", False) and match.score_bias is not None
    assert op_kind(match.selected_weights) == "gather" and op_kind(match.selected_ids) == "getitem"
    assert shape(match.weights) == shape(match.ids) == (6, 1)  # the masked choice as the experts read it
    assert op_kind(match.weights.args[0]) == "masked_fill"


@pytest.mark.parametrize("gate,reason", [
    (SkipGate(fill_weight=0.5), "does not set exactly its weight and id to 0"),
    (SkipGate(compare_with=3), "compared with something other than the last class (6)"),
], ids=["skip-weight-not-zero", "not-the-last-class"])
def test_a_skip_mask_lynx_cannot_read_is_left_with_its_reason(gate, reason):
    (found,) = router_matches(Block(gate), torch.randn(2, 3, 32))
    assert isinstance(found, str) and reason in found, found


def test_a_three_dimensional_router_without_a_skip_class_is_left_with_its_reason():
    class NoSkip(SkipGate):
        def forward(self, hidden):
            probs = torch.softmax(self.mlp(self.down(hidden)), dim=-1)
            _, ids = torch.topk(probs + self.balancing_biases, 2, dim=-1)
            return torch.gather(probs, dim=2, index=ids).reshape(-1, 2), ids.reshape(-1, 2)

    (found,) = router_matches(Block(NoSkip()), torch.randn(2, 3, 32))
    assert isinstance(found, str) and "only a router with a skip class is read as [batch, seq, experts]" in found


def test_an_ids_only_match_replaces_the_indices_and_keeps_the_weight_formula():
    (match,) = router_matches(Block(IdsOnlyGate()), torch.randn(2, 3, 32))
    assert isinstance(match, RouterMatch), match
    assert (match.pattern, match.ids_only, match.logit_columns, match.num_experts) == ("scored_ids", True, 8, 8)
    assert match.rule == RouterRule("sigmoid", False) and match.score_bias is not None
    assert match.selected_weights is None and match.ids.args[1] == 1  # topk(...)[1]
    assert op_kind(match.weights) == "view" and op_kind(match.weights.args[0]) == "getitem"  # gates[..., :2]


@pytest.mark.parametrize("gate,block,reason", [
    (IdsOnlyGate(values_as_weights=True), Block, "the top-k values are used"),
    (IdsOnlyGate(scoring=lambda x: x.softmax(-1)), Block, "some columns of a softmax taken over more columns"),
    (IdsOnlyGate(), lambda gate: gate, "the router is not a module of its own"),
], ids=["values-used", "softmax-columns", "no-router-module"])
def test_an_ids_only_candidate_lynx_cannot_read_is_left_with_its_reason(gate, block, reason):
    (found,) = router_matches(block(gate), torch.randn(2, 3, 32))
    assert isinstance(found, str) and reason in found, found


def test_ids_only_weights_that_do_not_follow_the_ids_are_left_with_their_reason():
    class Uniform(IdsOnlyGate):  # weights the ids do not change: replacing the ids alone would be wrong
        def forward(self, hidden):
            logits = F.linear(hidden.reshape(-1, 32), self.weight)
            ids = torch.topk(torch.sigmoid(logits)[..., :-2] + self.e_score_correction_bias, 2, dim=-1)[1]
            return torch.full((logits.shape[0], 2), 0.5), ids

    (found,) = router_matches(Block(Uniform()), torch.randn(2, 3, 32))
    assert isinstance(found, str) and "0 [tokens, k] tensors made from the chosen ids" in found, found

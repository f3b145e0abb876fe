"""The step context and live rows: who votes, and that the others change nothing for them.

Also: non-finite router rows (one bad token must not take the batch down) and the selection
bias of sigmoid routers (a constant shift of it must not change the choice).
"""

from __future__ import annotations

import pytest
import torch

import lynx_compile
from lynx_compile import capture_routing, select_experts
from lynx_compile.step import MASK_CAPACITY, step_buffers

select_op = torch.ops.lynx.select_experts.default


def skewed(num_tokens, num_experts=32, seed=0, spread=1.5, quantise=False):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_experts, generator=g) + torch.randn(num_tokens, num_experts, generator=g)) * spread
    return (logits * 2).round() / 2 if quantise else logits  # quantised: many exact ties


def op(logits, seq_len, k=4, decode_only=True, context=True):
    state, mask = step_buffers(logits.device) if context else (None, None)
    return select_op(logits, None, state, mask, k, seq_len, "lynx", [3.0, 2.0], decode_only, "softmax", True,
                     False, 1, 1, "max", 1.0)


@pytest.fixture(autouse=True)
def no_step_context():
    lynx_compile.clear_step("cpu")
    yield
    lynx_compile.clear_step("cpu")


# --- the step kind --------------------------------------------------------------------

def test_shape_rule_without_context():
    x = skewed(8)
    with capture_routing() as cap:
        op(x, seq_len=1)
        op(x, seq_len=8)
        op(x, seq_len=-1)  # layout unknown: never a decode step without a context
    assert [e.rerouted for e in cap.routing] == [True, False, False]


def test_context_decides_where_the_shape_cannot():
    x = skewed(8)
    plain = torch.softmax(x, -1).topk(4).indices
    with capture_routing() as cap:
        with lynx_compile.step(decode=True):  # [1, 8, H]: a packed decode step of 8 sequences
            _, packed = op(x, seq_len=8)
            _, unknown = op(x, seq_len=-1)
        with lynx_compile.step(decode=False):  # [8, 1, H] that is a prefill (e.g. seq-first)
            _, seq_first = op(x, seq_len=1)
        _, after = op(x, seq_len=8)  # context cleared: the shape rule again
    assert [e.rerouted for e in cap.routing] == [True, True, False, False]
    assert torch.equal(packed, select_experts(x, 4, alpha=3.0, beta=2)[1]) and torch.equal(packed, unknown)
    assert torch.equal(seq_first, plain) and torch.equal(after, plain)


def test_decision_is_a_device_tensor_and_follows_updates():
    # The same call reads the context at run time: no host value is baked in.
    x = skewed(8)
    flag = torch.tensor(True)
    lynx_compile.set_step(decode=flag)
    _, first = op(x, seq_len=8)
    lynx_compile.set_step(decode=~flag)
    _, second = op(x, seq_len=8)
    assert torch.equal(first, select_experts(x, 4, alpha=3.0, beta=2)[1])
    assert torch.equal(second, torch.softmax(x, -1).topk(4).indices)


def test_decode_only_false_reroutes_every_step():
    x = skewed(8)
    with lynx_compile.step(decode=False):
        _, ids = op(x, seq_len=8, decode_only=False)
    assert torch.equal(ids, select_experts(x, 4, alpha=3.0, beta=2)[1])


# --- live rows ------------------------------------------------------------------------

@pytest.mark.parametrize("quantise", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_padding_rows_change_nothing_for_live_rows(seed, quantise):
    live_rows = skewed(12, seed=seed, quantise=quantise)
    padding = skewed(20, seed=100 + seed, spread=3.0, quantise=quantise)  # strong, different preferences
    batch = torch.cat([live_rows, padding])
    w_ref, ids_ref = select_experts(live_rows, 4, alpha=3.0, beta=2)
    with lynx_compile.step(decode=True, num_live=12):
        weights, ids = op(batch, seq_len=32)
    assert torch.equal(ids[:12], ids_ref) and torch.equal(weights[:12], w_ref)
    kept = set(ids_ref.flatten().tolist())
    assert set(ids[12:].flatten().tolist()) <= kept  # padding reads no extra experts
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("seed", range(4))
def test_finished_rows_change_nothing_for_live_rows(seed):
    x = skewed(16, seed=seed, quantise=seed % 2 == 1)
    live = torch.zeros(16, dtype=torch.bool)
    live[torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:9]] = True
    w_ref, ids_ref = select_experts(x[live], 4, alpha=3.0, beta=2)
    with lynx_compile.step(live=live):  # decode kind from the shape rule, rows from the mask
        weights, ids = op(x, seq_len=1)
    assert torch.equal(ids[live], ids_ref) and torch.equal(weights[live], w_ref)
    weights_fn, ids_fn = select_experts(x, 4, alpha=3.0, beta=2, live=live)  # the same through the API
    assert torch.equal(ids_fn, ids) and torch.equal(weights_fn, weights)


def test_mask_and_count_combine():
    x = skewed(10)
    live = torch.tensor([True, False] * 5)
    with lynx_compile.step(decode=True, live=live, num_live=6):  # rows 0, 2, 4 are live
        _, ids = op(x, seq_len=10)
    assert torch.equal(ids[[0, 2, 4]], select_experts(x[[0, 2, 4]], 4, alpha=3.0, beta=2)[1])


def test_no_live_rows_and_one_live_row():
    x = skewed(6)
    with lynx_compile.step(decode=True, num_live=0):
        w, ids = op(x, seq_len=6)
    assert torch.equal(ids, torch.softmax(x, -1).topk(4).indices) and torch.isfinite(w).all()
    with lynx_compile.step(decode=True, num_live=1):  # one voter: plain top-k for it, the rest inside it
        _, ids = op(x, seq_len=6)
    assert torch.equal(ids[0], torch.softmax(x[0], -1).topk(4).indices)
    assert set(ids[1:].flatten().tolist()) <= set(ids[0].tolist())


def test_step_context_traced_inside_a_compiled_region():
    # An engine may set the context from inside its compiled step (e.g. a forward pre-hook):
    # the writes are part of the graph, and the op in a later graph reads them.
    x = skewed(8)
    lynx_compile.reserve_step("cpu")

    def engine_step(logits, real_tokens):
        lynx_compile.set_step(decode=real_tokens.max() <= 1, num_live=real_tokens.sum())
        return logits + 0

    compiled = torch.compile(engine_step, backend="aot_eager", fullgraph=True)
    compiled(x, torch.tensor([1, 1, 1, 1, 1, 1, 0, 0]))
    _, ids = op(x, seq_len=8)
    assert torch.equal(ids[:6], select_experts(x[:6], 4, alpha=3.0, beta=2)[1])
    compiled(x, torch.tensor([3, 2, 1, 1, 1, 0, 0, 0]))  # a mixed prefill/decode step
    _, ids = op(x, seq_len=8)
    assert torch.equal(ids, torch.softmax(x, -1).topk(4).indices)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(decode=1), "decode must be"),
        (dict(decode=torch.tensor([True, False])), "0-dim"),
        (dict(live=torch.ones(4)), "1-D bool"),
        (dict(live=torch.ones(MASK_CAPACITY + 1, dtype=torch.bool)), "at most"),
        (dict(num_live=2.5), "num_live"),
        (dict(num_live=True), "num_live"),
    ],
)
def test_bad_step_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lynx_compile.set_step(**kwargs)


def test_bad_live_argument_to_select_experts():
    with pytest.raises(ValueError, match=r"live must be None or a bool tensor of shape \[8\]"):
        select_experts(skewed(8), 4, alpha=3.0, live=torch.ones(7, dtype=torch.bool))


# --- non-finite rows ------------------------------------------------------------------

@pytest.mark.parametrize("poison", ["nan", "inf", "all_neg_inf", "nan_row"])
def test_a_bad_row_never_takes_down_the_batch(poison):
    x = skewed(8, num_experts=8, seed=3)
    bad = x.clone()
    if poison == "nan":
        bad[0, 3] = float("nan")
    elif poison == "inf":
        bad[0, 3] = float("inf")
    elif poison == "all_neg_inf":
        bad[0] = float("-inf")
    else:
        bad[0] = float("nan")
    weights, ids = select_experts(bad, 2, alpha=3.0, beta=2)  # used to raise IndexError
    assert ids.min() >= 0 and ids.max() < 8 and (ids[0, 0] != ids[0, 1])
    # the bad row is routed as plain top-k routes it (where top-k is defined), and is no voter
    if poison in ("nan", "inf"):
        assert set(ids[0].tolist()) == set(torch.topk(bad[0], 2).indices.tolist())
    w_rest, ids_rest = select_experts(x[1:], 2, alpha=3.0, beta=2)
    assert torch.equal(ids[1:], ids_rest) and torch.equal(weights[1:], w_rest)


def test_bad_rows_under_a_grouped_sigmoid_router():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.1
    rule = dict(scoring="sigmoid", score_bias=bias, num_groups=4, topk_groups=2, group_score="top2_sum")
    bad = x.clone()
    bad[5] = float("nan")
    _, ids = select_experts(bad, 4, alpha=3.0, beta=2, **rule)
    _, ids_rest = select_experts(torch.cat([x[:5], x[6:]]), 4, alpha=3.0, beta=2, **rule)
    assert torch.equal(torch.cat([ids[:5], ids[6:]]), ids_rest)
    assert ids.min() >= 0 and ids.max() < 16


# --- sigmoid routers with a selection bias ----------------------------------------------

def test_a_constant_bias_shift_leaves_the_choice_unchanged():
    # The router's own top-k is invariant to adding a constant to its selection bias; so is
    # lynx's choice (the affinity is measured from the token's best expert). Dyadic values keep
    # sigmoid(L) + b exact under the shifts.
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 16, generator=g) * 3 * 64).round() / 64
    bias = (torch.randn(16, generator=g) * 0.25 * 64).round() / 64
    choices = []
    for shift in (0.0, 0.5, 1.0, -1.0, 4.0):
        _, ids = select_experts(logits, 4, alpha=3.0, beta=2, scoring="sigmoid", score_bias=bias + shift)
        choices.append(ids)
    assert all(torch.equal(c, choices[0]) for c in choices[1:])
    plain = (torch.sigmoid(logits) + bias).topk(4).indices
    assert (choices[0][:, :1] == plain[:, :1]).float().mean() >= 0.9  # confident tokens keep their top-1


# --- the decomposition Inductor traces ---------------------------------------------------

RULES = [
    dict(scoring="softmax", renormalize=True),
    dict(scoring="softmax", renormalize=False),
    dict(scoring="softmax", renormalize=True, softmax_after_topk=True),
    dict(scoring="softmax", renormalize=False, num_groups=4, topk_groups=2, group_score="max", scaling_factor=2.0),
    dict(scoring="sigmoid", renormalize=True, biased=True),
    dict(scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2, group_score="top2_sum", biased=True),
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
@pytest.mark.parametrize("beta,ep_ranks", [(2, None), (None, None), (2, 4)])
def test_decomposition_traces_functionally_and_matches_the_op(rule, beta, ep_ranks):
    # Inductor needs an entirely functional graph (AOTAutograd asserts it); aot_eager with the
    # backend's decomposition table checks that cheaply, and runs the traced graph.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from lynx_compile.ops import select_experts_decomposition

    rule = dict(rule)
    biased = rule.pop("biased", False)
    full = {**dict(softmax_after_topk=False, num_groups=1, topk_groups=1, group_score="max", scaling_factor=1.0), **rule}
    state, mask = step_buffers("cpu")
    x = skewed(12, num_experts=16, seed=5)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.1 if biased else None

    def select(logits, bias):
        args = [3.0, float(beta or 0)] + ([float(ep_ranks)] if ep_ranks else [])  # Policy.encode
        return select_op(logits, bias, state, mask, 4, 1, "lynx", args, True, full["scoring"],
                         full["renormalize"], full["softmax_after_topk"], full["num_groups"], full["topk_groups"],
                         full["group_score"], full["scaling_factor"])

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           decompositions={**select_decomp_table(), select_op: select_experts_decomposition})
    traced = torch.compile(select, backend=backend, fullgraph=True)
    with lynx_compile.step(decode=True, num_live=9):
        got, want = traced(x, bias), select(x, bias)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_step_hooks_raise_the_recompile_limit_in_the_engine_thread():
    # Continuous batching compiles in a worker thread, which has its own dynamo config (torch 2.13):
    # the hooks must raise the limit there, where the forward runs, and leave other threads alone.
    import threading

    from lynx_compile.integrations.transformers import RECOMPILE_LIMIT, disable_step_hooks, enable_step_hooks

    model = torch.nn.Linear(2, 2)
    enable_step_hooks(model)
    seen = {}

    def engine():
        seen["before"] = torch._dynamo.config.recompile_limit
        model(torch.ones(1, 2))
        seen["after"] = torch._dynamo.config.recompile_limit

    try:
        worker = threading.Thread(target=engine)
        worker.start()
        worker.join()
    finally:
        disable_step_hooks(model)
    assert seen["before"] < RECOMPILE_LIMIT <= seen["after"]

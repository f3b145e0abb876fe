"""transformers' serving paths on the shipped model: continuous batching and static generate().

The rewritten graphs run without Inductor (compiler="eager"): what is tested here is which steps
lynx re-routes and which rows vote, not Inductor (tests/test_inductor.py covers the hand-off).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig, ContinuousBatchingConfig, GenerationConfig, StoppingCriteriaList

import lynx_compile
from lynx_compile.integrations.transformers import FinishedRows, disable_step_hooks, enable_step_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from demo_model import SHIPPED, load_model, make_prompts  # noqa: E402

pytestmark = [pytest.mark.serving,
              pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="the shipped model is missing")]

EAGER = {"compiler": "eager"}
SMALL_CACHE = dict(num_blocks=16, max_batch_tokens=512)  # transformers sizes the CPU cache from RAM: slow


def cb_config(**kwargs):
    return ContinuousBatchingConfig(**SMALL_CACHE, **kwargs)


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer, _ = load_model(None)
    return model, tokenizer


@pytest.fixture
def model(shipped):
    model = shipped[0]
    yield model
    disable_step_hooks(model)
    model.__dict__.pop("forward", None)  # undo model.forward = torch.compile(...)
    lynx_compile.clear_step("cpu")


def generate_batch(model, prompts, new_tokens, options=None, config=None):
    """Tokens per request and the lynx routing calls (all threads: CB runs a worker thread)."""
    if options is not None:
        enable_step_hooks(model)
        if config is None:  # the user way: compile the forward
            model.forward = torch.compile(model.forward, backend="lynx", options=options)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad(), lynx_compile.capture_routing(all_threads=True) as cap:
        out = model.generate_batch(inputs=[p.tolist() for p in prompts], generation_config=generation,
                                   continuous_batching_config=config or cb_config(), progress_bar=False)
    tokens = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    return tokens, cap


def test_generate_batch_reroutes_decode_steps_only(model, shipped):
    prompts, _ = make_prompts(model, shipped[1], 16, 24)
    eager_tokens, _ = generate_batch(model, prompts, 6)
    torch._dynamo.reset()
    off_tokens, off = generate_batch(model, prompts, 6, {**EAGER, "policy": "off"})
    assert off_tokens == eager_tokens  # selector off: the tokens of eager generate_batch (fp32)
    assert off.routing == [] and off.dispatch  # lynx's experts op ran, the routers are untouched
    disable_step_hooks(model)
    model.__dict__.pop("forward")
    torch._dynamo.reset()
    _, cap = generate_batch(model, prompts, 6, EAGER)
    layers = 4
    prefill = [e for e in cap.routing if e.logits.shape[0] > len(prompts)]
    decode = [e for e in cap.routing if e.logits.shape[0] == len(prompts)]
    assert len(prefill) >= layers and len(decode) >= 5 * layers and len(prefill) + len(decode) == len(cap.routing)
    assert not any(e.rerouted for e in prefill)
    assert sum(e.rerouted for e in decode) >= 0.9 * len(decode)
    plain = sum(e.logits.topk(4).indices.unique().numel() for e in decode)
    assert sum(d.distinct_experts for d in cap.dispatch[-len(decode):]) < plain


def test_padded_rows_change_nothing_for_live_rows(model, shipped):
    # A compiled CB config pads the token count (here 16 decode tokens -> 64 rows); padded rows
    # hold token 0 and run through the MoE layers. The live rows must route exactly as without them.
    prompts, _ = make_prompts(model, shipped[1], 16, 24)
    _, unpadded = generate_batch(model, prompts, 3, EAGER)
    disable_step_hooks(model)
    model.__dict__.pop("forward")
    torch._dynamo.reset()
    compile_config = CompileConfig(backend="lynx", mode=None, fullgraph=False, options={**EAGER, "mode": "default"})
    config = cb_config(varlen_compile_config=compile_config, q_padding_interval_size=64)
    _, padded = generate_batch(model, prompts, 3, EAGER, config=config)
    decode = [e for e in padded.routing if e.logits.shape[0] == 64]
    reference = [e for e in unpadded.routing if e.logits.shape[0] == 16]
    assert len(decode) == len(reference) >= 4 and all(e.rerouted for e in decode)
    for got, want in zip(decode, reference):
        assert got.live is not None and int(got.live.sum()) == 16 and bool(got.live[:16].all())
        assert torch.equal(got.ids[:16], want.ids)
        torch.testing.assert_close(got.weights[:16], want.weights)
        assert set(got.ids[16:].flatten().tolist()) <= set(want.ids.flatten().tolist())


def test_static_generate_finished_rows_do_not_vote(model, shipped):
    # Rows 4-7 repeat one prompt whose first generated token becomes the end-of-sequence id, so
    # they finish right after the prefill and keep decoding padding; rows 0-3 never emit it.
    # The live rows' choices must equal those of a batch holding rows 0-3 only.
    candidates, _ = make_prompts(model, shipped[1], 16, 24)
    with torch.no_grad():
        plain = model.generate(candidates, max_new_tokens=5, do_sample=False, pad_token_id=0)[:, 24:]
    finisher = next(i for i in range(16) if sum(plain[i, 0] in row for row in plain.tolist()) <= 2)
    eos = int(plain[finisher, 0])
    live_rows = [i for i in range(16) if i != finisher and eos not in plain[i].tolist()][:4]
    prompts = torch.cat([candidates[live_rows], candidates[[finisher] * 4]])
    compile_config = CompileConfig(backend="lynx", mode=None, options=EAGER)
    compile_config._compile_all_devices = True  # generate() compiles decode steps on CPU only when asked

    def run(batch):
        torch._dynamo.reset()
        with torch.no_grad(), lynx_compile.capture_routing() as cap, FinishedRows(eos) as finished:
            out = model.generate(batch, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=eos,
                                 cache_implementation="static", compile_config=compile_config,
                                 stopping_criteria=StoppingCriteriaList([finished]))
        return out[:, 24:], [e for e in cap.routing if e.seq_len == 1]

    tokens, decode = run(prompts)
    alone_tokens, alone = run(prompts[:4])
    assert eos not in tokens[:4].tolist() and (tokens[4:, 0] == eos).all()
    assert torch.equal(tokens[:4], alone_tokens)
    assert len(decode) == len(alone) >= 8
    for got, want in zip(decode, alone):
        assert got.live.tolist() == [True] * 4 + [False] * 4 and int(got.voters.sum()) == 4
        assert torch.equal(got.ids[:4], want.ids)

"""Tiny MoE models through ``vllm.LLM`` on CPU, with and without the plugin (see conftest.py)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.timeout(3600)  # the first test waits for every engine run

MODELS = ["mixtral", "deepseek_v3", "qwen3_moe", "qwen3_moe_compiled"]
STATS_KEYS = {"layer", "tokens", "live", "decode", "rerouted", "distinct_plain", "distinct"}


@pytest.mark.parametrize("model", MODELS)
def test_off_generates_plain_vllms_tokens(engines, model):
    plain, off = engines["plain"].results[model], engines["off"].results[model]
    assert off["tokens"] == plain["tokens"]
    assert off["first_logprobs"] == plain["first_logprobs"]
    assert not engines["off"].stats(model), "off must not wrap any router"


@pytest.mark.parametrize("model", MODELS)
def test_lynx_leaves_prefill_to_vllm(engines, model):
    """Every request's first token comes from its prefill: with lynx its logprobs are plain vLLM's, exactly.

    That includes the requests admitted late, whose prefill ran in a mixed step next to
    decoding sequences: such steps exist (a non-decode call after the first decode call).
    """
    plain, lynx = engines["plain"].results[model], engines["lynx"].results[model]
    assert lynx["first_logprobs"] == plain["first_logprobs"]
    calls = engines["lynx"].stats(model)
    first_decode = next(i for i, call in enumerate(calls) if call["decode"])
    assert any(not call["decode"] for call in calls[first_decode:]), "the run must contain a mixed step"


@pytest.mark.parametrize("model", MODELS)
def test_lynx_reroutes_decode_steps_only(engines, model):
    calls = engines["lynx"].stats(model)
    assert calls and all(STATS_KEYS <= set(call) for call in calls)
    assert all(call["rerouted"] == (call["decode"] and call["tokens"] >= 2) for call in calls)
    assert sum(call["rerouted"] for call in calls) >= 10
    # the same decode steps as plain vLLM generates (one new token per running request)
    assert all(call["tokens"] <= 16 for call in calls if call["decode"])


@pytest.mark.parametrize("model", MODELS)
def test_lynx_reads_fewer_experts(engines, model):
    rerouted = [call for call in engines["lynx"].stats(model) if call["rerouted"]]
    plain = sum(call["distinct_plain"] for call in rerouted)
    lynx = sum(call["distinct"] for call in rerouted)
    assert lynx < plain, f"{model}: {lynx} vs {plain} distinct experts over {len(rerouted)} re-routed calls"
    # not re-routed: the experts plain top-k reads
    assert all(call["distinct"] == call["distinct_plain"] for call in engines["lynx"].stats(model)
               if not call["rerouted"])


def test_every_moe_layer_is_reached(engines):
    layers = {call["layer"] for call in engines["lynx"].stats("qwen3_moe")}
    assert layers == {f"model.layers.{i}.mlp.experts" for i in range(4)}
    layers = {call["layer"] for call in engines["lynx"].stats("deepseek_v3")}
    assert layers == {f"model.layers.{i}.mlp.experts" for i in range(2)}


def test_startup_and_shutdown_log(engines):
    log = engines["lynx"].log
    assert "lynx (lynx) re-routes decode steps of MoE layers with sigmoid top-4 of 32 + selection bias, " \
           "best 2 of 4 groups (top2_sum), renormalised" in log
    assert "softmax top-4 of 64, renormalised: alpha=3, beta=2" in log
    summaries = re.findall(r"lynx: (\d+) MoE layer calls, (\d+) in decode steps, (\d+) re-routed; re-routed calls "
                           r"read [\d.]+ distinct experts on average instead of [\d.]+", log)
    assert len(summaries) == len(MODELS)
    assert "lynx" not in engines["plain"].log.lower().replace("lynx-tiny-moe", "")


def test_plugin_runs_in_vllms_worker_process(engines):
    """vLLM's default engine: the model runs in a spawned worker, which loads the plugin itself."""
    run = engines["lynx_mp"]
    calls = run.stats("mixtral")
    assert any(call["rerouted"] for call in calls)
    assert run.results["mixtral"]["first_logprobs"] == engines["plain"].results["mixtral"]["first_logprobs"]
    assert re.search(r"\(Worker pid=\d+\).*lynx \(lynx\) re-routes decode steps", run.log)


def test_lynx_compiles_its_own_model(engines):
    """vLLM keys its compile cache by its config and its own environment, not by out-of-tree layers.

    off and lynx differ only in LYNX_VLLM_POLICY (not a vLLM variable); without lynx's entry
    in ``additional_config`` both would use the same cache directory, and lynx could load a
    model compiled without its op.
    """
    def cache_dirs(log: str) -> set[str]:
        return set(re.findall(r"torch_aot_compile/([0-9a-f]{16,})", log))

    off, lynx = cache_dirs(engines["off"].log), cache_dirs(engines["lynx"].log)
    assert off and lynx and not off & lynx

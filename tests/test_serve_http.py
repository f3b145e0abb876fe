"""The ``transformers serve`` launcher, end to end: real HTTP requests on localhost."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import lynx_compile
from lynx_compile.integrations.serve import start

pytest.importorskip("fastapi", reason="transformers serve needs the serving extras (pip install lynx-compile[serve])")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

pytestmark = pytest.mark.serving

MODEL = str(Path(__file__).resolve().parent.parent / "models" / "lynx-tiny-moe")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def wait_until_up(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/health", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def complete(port: int, prompt: str, results: list) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    request = urllib.request.Request(f"http://localhost:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        results.append((response.status, json.loads(response.read())))


def test_continuous_batching_server_reroutes_decode_steps():
    port = free_port()
    serve = start(MODEL, {"compiler": "eager"}, continuous_batching=True, port=port, device="cpu", dtype="float32",
                  cb_num_blocks=16, cb_max_batch_tokens=512)
    try:
        wait_until_up(port)
        results: list = []
        prompts = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def", "for i in range("]
        with lynx_compile.capture_routing(all_threads=True) as cap:
            threads = [threading.Thread(target=complete, args=(port, p, results)) for p in prompts]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        serve.kill_server()
    assert [status for status, _ in results] == [200] * 4
    assert all(body["usage"]["completion_tokens"] == 6 for _, body in results)
    # prefill steps hold whole prompts; decode steps one token per running request (requests that
    # arrive a little later may leave a few steps with a single sequence: nothing to re-route)
    prefill = [e for e in cap.routing if e.logits.shape[0] > len(prompts)]
    batched_decode = [e for e in cap.routing if 2 <= e.logits.shape[0] <= len(prompts)]
    assert prefill and not any(e.rerouted for e in prefill)
    assert len(batched_decode) >= 2 * 4 and all(e.rerouted for e in batched_decode)

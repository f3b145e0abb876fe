"""``transformers serve`` with lynx: an OpenAI-compatible server whose decode steps re-route.

    python -m lynx_compile.integrations.serve models/lynx-tiny-moe --port 8000
    python -m lynx_compile.integrations.serve MODEL --lynx-options '{"policy": "off"}' --no-continuous-batching

``transformers serve`` (5.24) has no way to pass a torch.compile backend to continuous batching:
its ``--compile`` flag only switches sequential generation to a static cache, and its CB
config takes no compile config. This launcher starts transformers' own server (``Serve``, the
class behind the CLI) with the model preloaded (``force_model``), then prepares that model
object the way a user would by hand: lynx's step hooks (``integrations.transformers``) and
``model.forward = torch.compile(model.forward, backend="lynx", options=...)``. It changes no
transformers code; it relies on ``Serve`` keeping its preloaded model in
``ModelManager.loaded_models``, which it checks. Serving needs transformers' serving extras
(``pip install lynx-compile[serve]``: fastapi, uvicorn, openai).
"""

from __future__ import annotations

import argparse
import json

import torch

from ..options import LynxOptions
from .transformers import enable_step_hooks


def prepare(model: torch.nn.Module, options: dict | None = None) -> None:
    """lynx for a model transformers serves: step hooks, and its forward compiled by lynx."""
    options = LynxOptions.from_user(options)  # a bad option fails here, not at the first request
    enable_step_hooks(model)
    model.forward = torch.compile(model.forward, backend="lynx", options=options)


def start(model: str, lynx_options: dict | None = None, **serve_kwargs):
    """Start ``transformers serve`` in a background thread with ``model`` prepared for lynx.

    ``serve_kwargs``: ``transformers.cli.serve.Serve``'s options (``continuous_batching``,
    ``host``, ``port``, ``device``, ``dtype``, ...). Returns the ``Serve`` object
    (``kill_server()`` stops it).
    """
    from transformers.cli.serve import Serve

    serve = Serve(force_model=model, non_blocking=True, **serve_kwargs)
    manager = getattr(serve, "_model_manager", None)
    loaded = list(getattr(manager, "loaded_models", {}).values())
    if len(loaded) != 1 or getattr(loaded[0], "model", None) is None:
        serve.kill_server()
        raise RuntimeError("transformers' Serve no longer exposes its preloaded model (ModelManager.loaded_models); "
                           "this launcher supports transformers 5.24")
    prepare(loaded[0].model, lynx_options)
    return serve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory or hub id (loaded once, served for every request)")
    parser.add_argument("--lynx-options", default="{}", help="JSON object of lynx backend options")
    parser.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--cb-max-batch-tokens", type=int, default=None)
    parser.add_argument("--cb-num-blocks", type=int, default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.lynx_options)
    except json.JSONDecodeError as error:
        parser.error(f"--lynx-options is not JSON: {error}")
    if not isinstance(options, dict):
        parser.error("--lynx-options must be a JSON object")
    serve = start(args.model, options, continuous_batching=args.continuous_batching, host=args.host,
                  port=args.port, device=args.device, dtype=args.dtype,
                  attn_implementation=args.attn_implementation, cb_max_batch_tokens=args.cb_max_batch_tokens,
                  cb_num_blocks=args.cb_num_blocks, log_level=args.log_level)
    try:
        serve._thread.join()
    except KeyboardInterrupt:
        serve.kill_server()


if __name__ == "__main__":
    main()

"""lynx in transformers' own serving paths: continuous batching and static ``generate()``.

Continuous batching (``generate_batch``, ``ContinuousBatchingManager``, ``transformers serve
--continuous-batching``) packs every request's new tokens into one row: each MoE layer sees
``[1, T, H]`` whether the step is a prefill or a decode step of T sequences, and a compiled
batch is padded with rows that are no tokens at all. The forward's own arguments say which:
``cu_seq_lens_q`` (cumulative query lengths per sequence; padding sequences have length 0) and
the real token count ``cu_seq_lens_q[-1]``. ``enable_step_hooks(model)`` registers a forward
pre-hook on the model that turns them into lynx's step context (on the device, no host sync)
and a forward hook that clears it:

    lynx_compile.integrations.transformers.enable_step_hooks(model)
    model.forward = torch.compile(model.forward, backend="lynx")
    model.generate_batch(inputs, generation_config=...)

The hooks are PyTorch module hooks, not changes to transformers; inside a compiled
``_forward_process_and_sample`` (CB's own compile configs) dynamo traces them into the first
graph, and under CB's CUDA graphs they are captured with the forward. Calls without
``cu_seq_lens_q`` (static ``generate()``, plain forwards) leave the context alone.

Static ``generate()`` keeps decoding sequences that already finished (they emit padding).
``FinishedRows`` is a ``StoppingCriteria`` that stops nothing itself: it watches each row's
newest token for the end-of-sequence ids and marks finished rows not live for the next steps;
use it as a context manager so the mask is cleared when the generation is over:

    with FinishedRows(model.generation_config.eos_token_id) as finished:
        model.generate(..., stopping_criteria=StoppingCriteriaList([finished]))
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from transformers import StoppingCriteria

from ..step import clear_step, reserve_step, set_step

_HOOKS_ATTR = "_lynx_step_hooks"


def continuous_batching_step(cu_seq_lens_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decode, num_live)`` of a continuous-batching forward, both device scalars.

    A decode step is one in which every sequence contributes exactly one query token (padding
    sequences contribute none); rows past the real token count are padding.
    """
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    num_live = cu_seq_lens_q[-1]
    decode = (lengths.max() <= 1) & (num_live > 0)
    return decode, num_live


def _before_forward(module, args, kwargs):
    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    if isinstance(cu_seq_lens_q, torch.Tensor):
        decode, num_live = continuous_batching_step(cu_seq_lens_q)
        set_step(decode=decode, num_live=num_live, device=cu_seq_lens_q.device)


def _after_forward(module, args, kwargs, output):
    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    if isinstance(cu_seq_lens_q, torch.Tensor):
        clear_step(cu_seq_lens_q.device)


RECOMPILE_LIMIT = 64


class _ThreadRecompileLimit(threading.local):
    """Raises dynamo's recompile limits once in each thread that runs the model's forward.

    Continuous batching compiles in its own worker thread, and torch (2.13) keeps dynamo config
    overrides per thread, so a limit the user set in the main thread does not reach it. There
    the default limit (8) is soon hit: transformers' ``deprecate_kwarg`` wrapper is one code
    object for the attention, decoder-layer and model forwards, so every new padded shape adds
    several cache entries to it. Past the limit dynamo runs those frames eagerly without a word,
    and lynx matches nothing. Runs outside dynamo (``torch._dynamo.disable``)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.done = False

    def __call__(self, module, args, kwargs):
        if self.limit is not None and not self.done:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, self.limit)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * self.limit)
            self.done = True


def enable_step_hooks(model: torch.nn.Module, recompile_limit: int | None = RECOMPILE_LIMIT) -> None:
    """Let ``model``'s continuous-batching forwards tell lynx their step kind and live rows.

    Idempotent. Reserves the step context on the model's device (needed when the hooks run
    inside a compiled region). ``recompile_limit``: dynamo's recompile limit is raised to at
    least this in every thread that runs the forward (None: left alone); see
    ``_ThreadRecompileLimit`` for why continuous batching needs it. ``disable_step_hooks``
    removes the hooks.
    """
    if getattr(model, _HOOKS_ATTR, None):
        return
    parameter = next(model.parameters(), None)
    reserve_step(parameter.device if parameter is not None else "cpu")
    handles = (
        model.register_forward_pre_hook(torch._dynamo.disable(_ThreadRecompileLimit(recompile_limit)),
                                        with_kwargs=True),
        model.register_forward_pre_hook(_before_forward, with_kwargs=True),
        model.register_forward_hook(_after_forward, with_kwargs=True),
    )
    setattr(model, _HOOKS_ATTR, handles)


def disable_step_hooks(model: torch.nn.Module) -> None:
    for handle in getattr(model, _HOOKS_ATTR, None) or ():
        handle.remove()
    setattr(model, _HOOKS_ATTR, None)


class FinishedRows(StoppingCriteria):
    """A ``StoppingCriteria`` for static ``generate()``: rows that emitted an end-of-sequence
    token stop voting in lynx's selector (transformers keeps running them, padded).

    It returns "not done" for every row, so it changes nothing else about the generation.
    A new generation (shorter ``input_ids`` than the last call saw) starts with every row live.
    """

    def __init__(self, eos_token_id: int | Iterable[int] | None):
        if eos_token_id is None:
            raise ValueError("FinishedRows needs the end-of-sequence token id(s) (generation_config.eos_token_id)")
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
        self.eos = torch.tensor(ids)
        self.finished: torch.Tensor | None = None
        self._length = 0
        self._device = None

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self.finished is None or input_ids.shape[1] <= self._length or len(self.finished) != len(input_ids):
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self._length, self._device = input_ids.shape[1], input_ids.device
        self.finished |= torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        set_step(live=~self.finished, device=input_ids.device)
        return torch.zeros_like(self.finished)

    def __enter__(self) -> FinishedRows:
        return self

    def __exit__(self, *exc) -> None:
        if self._device is not None:
            clear_step(self._device)
        self.finished, self._length = None, 0


__all__ = ["FinishedRows", "continuous_batching_step", "disable_step_hooks", "enable_step_hooks"]

"""The step context: how an engine tells lynx what a forward step is, on the device.

A compiled MoE layer sees only its own input: ``[1, 16, H]`` is a prefill of 16 tokens or a
continuous-batching decode step of 16 sequences, and padded or finished rows look like live
ones. The engine knows. It says so with

    lynx_compile.set_step(decode=True, num_live=n)     # rows >= n are padding
    lynx_compile.set_step(live=mask)                   # bool [T]: finished rows are False
    with lynx_compile.step(decode=is_decode, live=mask): out = model(...)
    lynx_compile.clear_step()

and every ``lynx::select_experts`` on that device reads it. The context lives in two small
tensors per device, allocated once and only ever updated in place: a compiled graph reads them
as buffers, so the decision is taken on the device at run time (a prefill and a decode step
may share one graph), nothing is synchronised with the host, and a CUDA graph that captured the
writes and the reads replays both. ``set_step`` is traceable: called inside a compiled region
(for example from a forward pre-hook, ``integrations.transformers``), its writes become part of
the graph.

Fields (``state``, int64 [4]): ``active`` (0: no context; the layers use the shape rule),
``decode`` (1 / 0, or -1: not said, use the shape rule), ``num_live`` (rows >= it are not live;
-1: no limit), ``mask_len`` (a live mask of that many rows is in ``mask``; 0: none). ``mask`` is
bool [``MASK_CAPACITY``].

The context is per device and per process, not per thread or per model: an engine that runs
two models on one device concurrently must not rely on it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

MASK_CAPACITY = 1 << 16  # live masks cover up to this many rows (a decode step's sequences)
_ACTIVE, _DECODE, _NUM_LIVE, _MASK_LEN = range(4)

_buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_lock = threading.Lock()


def _key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def step_buffers(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(state, mask)`` for ``device``, allocated on first use and never replaced (the lynx
    pass allocates them for the devices of the graphs it rewrites)."""
    key = _key(device)
    found = _buffers.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _buffers:
            state = torch.tensor([0, -1, -1, 0], dtype=torch.int64, device=key)
            mask = torch.ones(MASK_CAPACITY, dtype=torch.bool, device=key)
            _buffers[key] = (state, mask)
    return _buffers[key]


def reserve_step(device: torch.device | str) -> None:
    """Allocate ``device``'s step context now (needed before ``set_step`` runs inside compiled code)."""
    step_buffers(device)


def _device_of(*values, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    if torch.cuda.is_available():
        raise ValueError("lynx_compile.set_step: pass device= (no tensor argument says which device)")
    return torch.device("cpu")


def _write(slot: torch.Tensor, value) -> None:
    if isinstance(value, torch.Tensor):
        slot.copy_(value.reshape(()))
    else:
        slot.fill_(int(value))  # a fill, not a host-to-device copy: capturable in a CUDA graph


def set_step(*, decode: bool | torch.Tensor | None = None, live: torch.Tensor | None = None,
             num_live: int | torch.Tensor | None = None, device: torch.device | str | None = None) -> None:
    """Describe the next forward steps on ``device`` (see the module docstring).

    Args:
        decode: True if every sequence contributes exactly one query token (a Python bool or a
            0-dim bool tensor on the device); None: leave it to the layers' shape rule.
        live: bool [n] (n <= MASK_CAPACITY): which rows are live tokens; rows >= n are not.
        num_live: rows >= num_live are not live (an int or a 0-dim integer tensor), e.g. the
            real token count of a padded batch.
    """
    if decode is not None and not isinstance(decode, (bool, torch.Tensor)):
        raise ValueError(f"decode must be None, a bool or a 0-dim bool tensor, got {type(decode).__name__}")
    if isinstance(decode, torch.Tensor) and decode.numel() != 1:
        raise ValueError(f"decode must be a 0-dim tensor, got shape {tuple(decode.shape)}")
    if live is not None:
        if not isinstance(live, torch.Tensor) or live.dtype != torch.bool or live.dim() != 1:
            raise ValueError(f"live must be a 1-D bool tensor, got {getattr(live, 'dtype', type(live).__name__)} "
                             f"{tuple(getattr(live, 'shape', ()))}")
        if live.shape[0] > MASK_CAPACITY:
            raise ValueError(f"live covers {live.shape[0]} rows; the step context holds at most {MASK_CAPACITY}")
    if isinstance(num_live, bool) or (num_live is not None and not isinstance(num_live, (int, torch.Tensor))):
        raise ValueError(f"num_live must be None, an int or a 0-dim integer tensor, got {num_live!r}")
    target = _device_of(live, decode, num_live, device=device)
    if _key(target) not in _buffers and torch.compiler.is_compiling():
        raise RuntimeError(
            f"lynx's step context for {_key(target)} must exist before set_step is traced: call "
            f"lynx_compile.reserve_step({_key(target)!r}) before compiling (enable_step_hooks does)"
        )
    state, mask = step_buffers(target)
    _write(state[_ACTIVE], 1)
    _write(state[_DECODE], -1 if decode is None else decode)
    _write(state[_NUM_LIVE], -1 if num_live is None else num_live)
    if live is None:
        _write(state[_MASK_LEN], 0)
    else:
        mask[: live.shape[0]].copy_(live)
        _write(state[_MASK_LEN], live.shape[0])


def clear_step(device: torch.device | str | None = None) -> None:
    """Forget the step context on ``device``: layers go back to their shape rule."""
    key = _key(_device_of(device=device))
    if key in _buffers:
        _buffers[key][0][_ACTIVE].fill_(0)


@contextlib.contextmanager
def step(*, decode: bool | torch.Tensor | None = None, live: torch.Tensor | None = None,
         num_live: int | torch.Tensor | None = None, device: torch.device | str | None = None) -> Iterator[None]:
    """``set_step`` for the block, ``clear_step`` after it (eager code)."""
    set_step(decode=decode, live=live, num_live=num_live, device=device)
    try:
        yield
    finally:
        clear_step(_device_of(live, decode, num_live, device=device))


# --- read by lynx::select_experts (traced into compiled graphs) ------------------------------

def step_decision(state: torch.Tensor | None, mask: torch.Tensor | None, num_tokens, seq_len,
                  decode_only: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rerouting, live)``: a 0-dim bool (does this step re-route?) and bool [T] or None.

    ``seq_len``: the layer input's sequence length (int or SymInt), or -1 where the layout is
    unknown (then only an engine context can make a step a decode step).
    """
    if isinstance(seq_len, int) and seq_len < 0:
        shape_decode = torch.zeros((), dtype=torch.bool, device=device)
    else:  # a SymInt in a dynamic-shape graph: compared on the device, no guard
        shape_decode = torch.full((), seq_len, dtype=torch.int64, device=device) == 1
    if state is None:
        decode, live = shape_decode, None
    else:
        active = state[_ACTIVE] > 0
        said = state[_DECODE]
        decode = torch.where(active & (said >= 0), said > 0, shape_decode)
        rows = torch.arange(num_tokens, device=device)
        num_live, mask_len = state[_NUM_LIVE], state[_MASK_LEN]
        in_mask = (rows < mask_len) & mask[rows.clamp(max=mask.shape[0] - 1)]
        live = ~active | (((num_live < 0) | (rows < num_live)) & ((mask_len <= 0) | in_mask))
    rerouting = decode if decode_only else torch.ones((), dtype=torch.bool, device=device)
    return rerouting, live


__all__ = ["MASK_CAPACITY", "clear_step", "reserve_step", "set_step", "step", "step_buffers", "step_decision"]

"""Options of the lynx backend: ``torch.compile(m, backend="lynx", options={...})``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .policies import POLICIES as _SELECTION_POLICIES

POLICIES = (*_SELECTION_POLICIES, "off")
COMPILERS = ("inductor", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NO_CLAMP = "none"  # beta value meaning "no clamp"; beta=None means "the model's default"
DUMP_DIR_ENV = "LYNX_DUMP_DIR"

_DOCS = {
    "policy": f"one of {POLICIES}: 'lynx' runs the batch-aware selector in decode steps, "
    "'off' keeps plain top-k routing (lynx's experts op and Inductor only)",
    "alpha": "a finite number > 0 (bins are 1/alpha logits wide), or None for the model's default",
    "beta": f"an int >= 1 (deepest bin), {NO_CLAMP!r} for no clamp, or None for the model's default",
    "decode_only": "True: re-route only in decode steps (one new token per sequence, >= 2 "
    "tokens); False: also in prefill",
    "layer_settings": "None, or a dict mapping MoE block paths (e.g. 'model.layers.3.mlp') to "
    "(alpha, beta) pairs, such as lynx_compile.calibrate() returns; they override alpha/beta",
    "dump_dir": f"a directory for graph dumps, or None (environment: {DUMP_DIR_ENV})",
    "compiler": f"one of {COMPILERS}: what runs the rewritten graph; 'eager' skips Inductor "
    "(debugging, graph tests)",
    "sequence_dim": "None, 0 or 1: which dimension of a [a, b, hidden] MoE layer input is the sequence, "
    "for the shape rule (decode when it is 1) in modules outside transformers (whose layout lynx knows)",
    "mode": "None or one of Inductor's modes ('default', 'reduce-overhead', 'max-autotune', "
    "'max-autotune-no-cudagraphs'); torch.compile refuses mode= beside options=, so give it here",
    "observe": "True keeps the selector an opaque op, so capture_routing() records every routing call "
    "under Inductor too (slower); False lets Inductor fuse it",
}


def _valid_alpha(alpha) -> bool:
    return not isinstance(alpha, bool) and isinstance(alpha, (int, float)) and 0 < alpha < math.inf


def _valid_beta(beta) -> bool:
    return beta == NO_CLAMP or (not isinstance(beta, bool) and isinstance(beta, int) and beta >= 1)


def _valid_layer_settings(settings) -> bool:
    return isinstance(settings, Mapping) and all(
        isinstance(path, str) and isinstance(pair, (tuple, list)) and len(pair) == 2
        and _valid_alpha(pair[0]) and (pair[1] is None or _valid_beta(pair[1]))
        for path, pair in settings.items()
    )


@dataclass(frozen=True)
class LynxOptions:
    policy: str = "lynx"
    alpha: float | None = None
    beta: int | str | None = None
    decode_only: bool = True
    layer_settings: Mapping[str, tuple] | None = None
    dump_dir: str | None = None
    compiler: str = "inductor"
    sequence_dim: int | None = None
    mode: str | None = None
    observe: bool = False

    def __post_init__(self):
        def bad(name: str, value: object) -> ValueError:
            return ValueError(f"invalid lynx option {name}={value!r}: expected {_DOCS[name]}")

        if self.policy not in POLICIES:
            raise bad("policy", self.policy)
        if self.alpha is not None and not _valid_alpha(self.alpha):
            raise bad("alpha", self.alpha)
        if self.beta is not None and not _valid_beta(self.beta):
            raise bad("beta", self.beta)
        if not isinstance(self.decode_only, bool):
            raise bad("decode_only", self.decode_only)
        if self.layer_settings is not None and not _valid_layer_settings(self.layer_settings):
            raise bad("layer_settings", self.layer_settings)
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise bad("dump_dir", self.dump_dir)
        if self.compiler not in COMPILERS:
            raise bad("compiler", self.compiler)
        if self.sequence_dim is not None and (isinstance(self.sequence_dim, bool) or self.sequence_dim not in (0, 1)):
            raise bad("sequence_dim", self.sequence_dim)
        if self.mode is not None and self.mode not in MODES:
            raise bad("mode", self.mode)
        if not isinstance(self.observe, bool):
            raise bad("observe", self.observe)
        if self.dump_dir is not None:
            object.__setattr__(self, "dump_dir", str(Path(self.dump_dir)))

    @classmethod
    def from_user(cls, options: Mapping | LynxOptions | None) -> LynxOptions:
        """Validate what a user passed as ``options=``; unknown keys raise ``ValueError``."""
        if isinstance(options, LynxOptions):
            return options
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(f"lynx options must be a dict or LynxOptions, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(f"unknown lynx option {key!r}; valid options: {', '.join(valid)}")
        values = dict(options)
        if values.get("dump_dir") is None and os.environ.get(DUMP_DIR_ENV):
            values["dump_dir"] = os.environ[DUMP_DIR_ENV]
        return cls(**values)

    @staticmethod
    def describe() -> str:
        return "\n".join(f"  {name}: {doc}" for name, doc in _DOCS.items())

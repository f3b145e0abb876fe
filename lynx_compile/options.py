"""Options of the lynx backend: ``torch.compile(m, backend="lynx", options={...})``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .policies import _FP32_MAX
from .policies import POLICIES as _SELECTION_POLICIES

POLICIES = (*_SELECTION_POLICIES, "off")
COMPILERS = ("inductor", "eager")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NO_CLAMP = "none"  # beta value meaning "no clamp"; beta=None means "the model's default"
DUMP_DIR_ENV = "LYNX_DUMP_DIR"

_DOCS = {
    "policy": f"one of {POLICIES}: 'lynx' runs the batch-aware selector (AffinityBinning) in decode steps, "
    "'oea' and 'xshare' the peers' rules, 'off' keeps plain top-k routing (lynx's experts op and Inductor only)",
    "alpha": "policy lynx: a number > 0, finite in fp32 (bins are 1/alpha logits wide), or None for the model's default",
    "beta": f"policy lynx: an int in [1, 64] (deepest bin), {NO_CLAMP!r} for no clamp, or None for the model's default",
    "k0": "policy oea (required): an int >= 1, at most the router's k: the experts every token keeps",
    "budget": "policy xshare (required): an int >= 1, between the router's k and E: the experts a batch may use",
    "decode_only": "True: re-route only in decode steps (one new token per sequence, >= 2 "
    "tokens); False: also in prefill",
    "layer_settings": "None, or a dict mapping MoE block paths (e.g. 'model.layers.3.mlp') to the policy's "
    "settings for that layer: a dict of its knobs ({'alpha': 3, 'beta': 2}, {'k0': 2}, {'budget': 24}), or for "
    "lynx an (alpha, beta) pair, as lynx_compile.calibrate() returns; beta: None is the model default, "
    f"{NO_CLAMP!r} no clamp",
    "dump_dir": f"a directory for graph dumps (each process writes into its own folder there), or None or '' "
    f"for none (environment: {DUMP_DIR_ENV})",
    "compiler": f"one of {COMPILERS}: what runs the rewritten graph; 'eager' skips Inductor "
    "(debugging, graph tests)",
    "sequence_dim": "None, 0 or 1: which dimension of a [a, b, hidden] MoE layer input is the sequence, "
    "for the shape rule (decode when it is 1) in modules outside transformers (whose layout lynx knows)",
    "mode": "None or one of Inductor's modes ('default', 'reduce-overhead', 'max-autotune', "
    "'max-autotune-no-cudagraphs'); torch.compile refuses mode= beside options=, so give it here",
    "ep_ranks": "None, or an int >= 1 dividing each router's E: cap the kept set per expert-parallel rank "
    "(rank r owns experts [r E/R, (r+1) E/R)) at ceil(kept / R) experts besides the voters' top-1s, so the "
    "busiest rank reads fewer experts (policies.ep_cap); None or 1: no cap",
    "observe": "True keeps the selector an opaque op, so capture_routing() records every routing call "
    "under Inductor too (slower); False lets Inductor fuse it",
}


def _valid_alpha(alpha) -> bool:
    # finite in fp32, where the selector computes (1e39 would be inf there, and 0 * inf = NaN)
    return not isinstance(alpha, bool) and isinstance(alpha, (int, float)) and 0 < alpha <= _FP32_MAX


def _valid_beta(beta) -> bool:
    return beta == NO_CLAMP or (not isinstance(beta, bool) and isinstance(beta, int) and 1 <= beta <= 64)


def _valid_count(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


_KNOB_CHECKS = {"alpha": _valid_alpha, "beta": lambda b: b is None or _valid_beta(b), "k0": _valid_count,
                "budget": _valid_count}
POLICY_KNOBS = {"lynx": ("alpha", "beta"), "oea": ("k0",), "xshare": ("budget",), "off": ()}


def layer_knobs(policy: str, value) -> dict | None:
    """A layer_settings entry as a dict of the policy's knobs, or None if it is malformed."""
    if policy == "lynx" and isinstance(value, (tuple, list)) and len(value) == 2:
        value = {"alpha": value[0], "beta": value[1]}
    if not isinstance(value, Mapping) or not set(value) <= set(POLICY_KNOBS[policy]):
        return None
    if not all(_KNOB_CHECKS[name](knob) for name, knob in value.items()):
        return None
    return dict(value)


@dataclass(frozen=True)
class LynxOptions:
    policy: str = "lynx"
    alpha: float | None = None
    beta: int | str | None = None
    k0: int | None = None
    budget: int | None = None
    decode_only: bool = True
    layer_settings: Mapping[str, tuple] | None = None
    dump_dir: str | None = None
    compiler: str = "inductor"
    sequence_dim: int | None = None
    mode: str | None = None
    observe: bool = False
    ep_ranks: int | None = None

    def __post_init__(self):
        def bad(name: str, value: object) -> ValueError:
            return ValueError(f"invalid lynx option {name}={value!r}: expected {_DOCS[name]}")

        if self.policy not in POLICIES:
            raise bad("policy", self.policy)
        if self.alpha is not None and not _valid_alpha(self.alpha):
            raise bad("alpha", self.alpha)
        if self.beta is not None and not _valid_beta(self.beta):
            raise bad("beta", self.beta)
        for name in ("k0", "budget"):
            value = getattr(self, name)
            if value is not None and not _valid_count(value):
                raise bad(name, value)
        given = [name for name in ("alpha", "beta", "k0", "budget") if getattr(self, name) is not None]
        foreign = [name for name in given if name not in POLICY_KNOBS[self.policy]]
        if foreign and self.policy != "off":  # "off" ignores knobs, so a policy can be toggled alone
            raise ValueError(f"lynx option(s) {', '.join(foreign)} do not apply to policy {self.policy!r} "
                             f"(its knobs: {', '.join(POLICY_KNOBS[self.policy]) or 'none'})")
        required = {"oea": "k0", "xshare": "budget"}.get(self.policy)
        if required and getattr(self, required) is None and not self.layer_settings:
            raise ValueError(f"policy {self.policy!r} needs the option {required}: {_DOCS[required]}")
        if not isinstance(self.decode_only, bool):
            raise bad("decode_only", self.decode_only)
        if self.layer_settings is not None:
            if not isinstance(self.layer_settings, Mapping) or not all(isinstance(p, str) for p in self.layer_settings):
                raise bad("layer_settings", self.layer_settings)
            for path, value in self.layer_settings.items():
                if self.policy != "off" and layer_knobs(self.policy, value) is None:
                    raise ValueError(f"invalid lynx option layer_settings[{path!r}]={value!r} for policy "
                                     f"{self.policy!r}: expected {_DOCS['layer_settings']}")
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
        if self.ep_ranks is not None and not _valid_count(self.ep_ranks):
            raise bad("ep_ranks", self.ep_ranks)
        if self.dump_dir is not None:  # "" means no dumps, as LYNX_DUMP_DIR="" does
            object.__setattr__(self, "dump_dir", str(Path(self.dump_dir)) if str(self.dump_dir) else None)

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

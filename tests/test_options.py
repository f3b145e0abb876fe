"""Options: validated with clear errors, reachable through torch.compile(options=...)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lynx_compile import LynxOptions


@pytest.mark.parametrize(
    "options,match",
    [
        ({"polcy": "off"}, r"unknown lynx option 'polcy'; valid options: policy, alpha, beta"),
        ({"policy": "fast"}, r"policy='fast'.*'lynx', 'oea', 'xshare', 'off'"),
        ({"alpha": float("inf")}, r"alpha=inf: expected policy lynx: a number > 0, finite in fp32"),
        ({"alpha": 1e39}, r"alpha=1e\+39"),
        ({"policy": "oea"}, r"policy 'oea' needs the option k0"),
        ({"policy": "oea", "k0": 0}, r"k0=0"),
        ({"policy": "xshare", "budget": 8, "alpha": 2}, r"alpha do not apply to policy 'xshare'"),
        ({"k0": 2}, r"k0 do not apply to policy 'lynx'"),
        ({"layer_settings": {"a": (1.0, 2, 3)}}, r"layer_settings\['a'\]"),
        ({"policy": "oea", "k0": 2, "layer_settings": {"a": (1.0, 2)}}, r"layer_settings\['a'\].*policy 'oea'"),
        ({"alpha": 0}, r"alpha=0: expected policy lynx: a number > 0, finite in fp32"),
        ({"alpha": "3"}, r"alpha='3'"),
        ({"beta": 0}, r"beta=0: expected policy lynx: an int in \[1, 64\]"),
        ({"beta": 2.5}, r"beta=2.5"),
        ({"decode_only": "yes"}, r"decode_only='yes'"),
        ({"compiler": "tvm"}, r"compiler='tvm'.*'inductor', 'eager'"),
        ({"dump_dir": 3}, r"dump_dir=3"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        LynxOptions.from_user(options)


def test_good_options():
    opts = LynxOptions.from_user({"policy": "off", "alpha": 2, "beta": "none", "decode_only": False})
    assert (opts.policy, opts.alpha, opts.beta, opts.decode_only) == ("off", 2, "none", False)
    assert LynxOptions.from_user(None) == LynxOptions()


def test_backend_is_an_installed_entry_point():
    assert "lynx" in torch._dynamo.list_backends()


def test_bad_option_through_torch_compile_names_it():
    compiled = torch.compile(nn.Linear(4, 4), backend="lynx", options={"alhpa": 1.0})
    with pytest.raises(Exception, match="unknown lynx option 'alhpa'"):
        compiled(torch.randn(2, 4))


def test_unknown_mode_raises():
    compiled = torch.compile(nn.Linear(4, 4), backend="lynx", mode="turbo")
    with pytest.raises(Exception, match="unknown mode 'turbo'"):
        compiled(torch.randn(2, 4))


def test_settings_precedence():
    from lynx_compile.settings import resolve_settings

    def resolve(options, block="Qwen3MoeSparseMoeBlock", k=8, e=128, hidden=2048):
        return resolve_settings(LynxOptions.from_user(options), "model.layers.0.mlp", block, k, e, hidden)

    released = resolve({})
    assert (released.alpha, released.beta) == (3.0, 2) and "Qwen3-30B" in released.source
    mixtral = resolve({}, "MixtralSparseMoeBlock", 2, 8, 4096)
    assert (mixtral.alpha, mixtral.beta) == (0.7, 1)
    derived = resolve({}, "Qwen3MoeSparseMoeBlock", 4, 16, 48)
    assert (derived.alpha, derived.beta, derived.source) == (1.0, 1, "derived from k=4, E=16")
    top1 = resolve({}, "SomeMoe", 1, 16, 48)
    assert (top1.alpha, top1.beta) == (1.0, None)
    assert (resolve({"alpha": 2}).alpha, resolve({"alpha": 2}).beta) == (2.0, 2)  # beta from the default
    assert resolve({"beta": "none"}).beta is None
    per_layer = resolve({"alpha": 2, "layer_settings": {"model.layers.0.mlp": (4, "none")}})
    assert (per_layer.alpha, per_layer.beta, per_layer.source) == (4.0, None, "layer_settings")
    # one spelling per meaning, at the top level and per layer: None is the default, "none" no clamp
    assert resolve({"layer_settings": {"model.layers.0.mlp": (4, None)}}).beta == 2
    assert resolve({"layer_settings": {"model.layers.0.mlp": {"alpha": 4}}}).knobs == {"alpha": 4.0, "beta": 2}
    oea = resolve({"policy": "oea", "k0": 3})
    assert (oea.knobs, oea.source) == ({"k0": 3}, "options")
    layer = resolve({"policy": "xshare", "budget": 20, "layer_settings": {"model.layers.0.mlp": {"budget": 30}}})
    assert (layer.knobs, layer.source) == ({"budget": 30}, "layer_settings")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp: invalid k0=9 .* 1 <= k0 <= 8"):
        resolve({"policy": "oea", "k0": 9})
    with pytest.raises(ValueError, match=r"needs budget for model.layers.0.mlp"):
        resolve({"policy": "xshare", "layer_settings": {"model.layers.1.mlp": {"budget": 30}}})

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
        ({"policy": "fast"}, r"policy='fast'.*'lynx', 'off'"),
        ({"alpha": 0}, r"alpha=0: expected a number > 0"),
        ({"alpha": "3"}, r"alpha='3'"),
        ({"beta": 0}, r"beta=0: expected an int >= 1"),
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

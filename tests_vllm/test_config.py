"""The plugin's environment: what it accepts, and the errors that stop vLLM at startup."""

from __future__ import annotations

import pytest

from lynx_compile.integrations.vllm.config import PluginConfig


def config(**environ) -> PluginConfig:
    return PluginConfig.from_env(environ)


def test_unset_off_and_lynx():
    assert config().policy is None and not config().active
    assert config(LYNX_VLLM_POLICY="off").policy == "off" and not config(LYNX_VLLM_POLICY="off").active
    parsed = config(LYNX_VLLM_POLICY="lynx", LYNX_VLLM_STATS="stats/s.jsonl",
                    LYNX_VLLM_OPTIONS='{"alpha": 2.5, "beta": "none", "decode_only": false, '
                                      '"layer_settings": {"model.layers.0.mlp": [1, 2]}}')
    assert parsed.active and parsed.stats_path == "stats/s.jsonl"
    assert (parsed.options.alpha, parsed.options.beta, parsed.options.decode_only) == (2.5, "none", False)
    assert parsed.options.layer_settings == {"model.layers.0.mlp": [1, 2]}


@pytest.mark.parametrize("environ, message", [
    ({"LYNX_VLLM_POLICY": "fast"}, "LYNX_VLLM_POLICY='fast': expected one of lynx, oea, xshare, off"),
    ({"LYNX_VLLM_POLICY": "oea"}, "k0"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"k0": 2}'}, "k0"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": "{alpha: 1}"}, "LYNX_VLLM_OPTIONS is not valid JSON"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": "[1]"}, "must be a JSON object, got list"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"compiler": "eager"}'},
     "option 'compiler' does not apply to vLLM"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"policy": "off"}'}, "the policy comes from LYNX_VLLM_POLICY"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"alpha": -1}'}, "invalid lynx option alpha=-1"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"beta": 0}'}, "invalid lynx option beta=0"),
    ({"LYNX_VLLM_POLICY": "lynx", "LYNX_VLLM_OPTIONS": '{"layer_settings": {"a": [1]}}'},
     "invalid lynx option layer_settings"),
])
def test_bad_settings_are_named(environ, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        PluginConfig.from_env(environ)


def test_register_stops_vllm_on_a_bad_setting(monkeypatch):
    from lynx_compile.integrations.vllm import register

    monkeypatch.setenv("LYNX_VLLM_POLICY", "lynx")
    monkeypatch.setenv("LYNX_VLLM_OPTIONS", '{"beta": 1.5}')
    with pytest.raises(ValueError, match="beta=1.5"):
        register()


def test_register_is_idempotent_and_never_displaces_another_runner(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot

    from lynx_compile.integrations.vllm import register
    from lynx_compile.integrations.vllm.runner import LynxMoERunner

    monkeypatch.setenv("LYNX_VLLM_POLICY", "lynx")
    monkeypatch.delenv("LYNX_VLLM_OPTIONS", raising=False)
    saved = op_registry_oot.pop("MoERunner", None)
    try:
        register()
        register()
        assert op_registry_oot["MoERunner"] is LynxMoERunner
        op_registry_oot["MoERunner"] = type("OtherRunner", (), {})
        with pytest.raises(RuntimeError, match="another plugin already replaces vLLM's MoERunner"):
            register()
    finally:
        op_registry_oot.pop("MoERunner", None)
        if saved is not None:
            op_registry_oot["MoERunner"] = saved


def test_off_registers_nothing(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.model_executor.custom_op import op_registry_oot

    from lynx_compile.integrations.vllm import register

    monkeypatch.setenv("LYNX_VLLM_POLICY", "off")
    saved = op_registry_oot.pop("MoERunner", None)
    try:
        register()
        assert "MoERunner" not in op_registry_oot
    finally:
        if saved is not None:
            op_registry_oot["MoERunner"] = saved

"""Server settings are declared once (a field of ``ServerConfig`` or ``ServerLimits``, with its
flag, help and environment variable): `serve`'s arguments are generated from them, ``--help``
shows each one's default and variable, and the cross-flag rules run when a ``ServerConfig`` is
built, however it is built: from flags, from the environment, or by a program that embeds the
server."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from visionserve.service.cli import UsageError, build_parser, server_config
from visionserve.service.limits import ServerLimits
from visionserve.service.modes import AccessLogMode, ModelControlMode
from visionserve.service.process.server_config import ServerConfig
from visionserve.service.settings import declared


def serve_parser() -> argparse.ArgumentParser:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def serve_help() -> str:
    return " ".join(serve_parser().format_help().split())  # unwrapped


SETTINGS = [(f, flag) for cls in (ServerConfig, ServerLimits) for f, flag in declared(cls)
            if f.name != "limits"]


def test_every_setting_is_a_flag_whose_help_shows_its_default_and_variable():
    text = serve_help()
    flags = {o for a in serve_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    declared_flags = {flag.flag(f.name) for f, flag in SETTINGS} | \
        {flag.off for _, flag in SETTINGS if flag.off}
    assert flags == declared_flags and len(flags) == 45  # every serve flag, declared once
    for f, flag in SETTINGS:
        name = flag.flag(f.name)
        assert f"{name} " in text, name
        assert f"[env {flag.env(f.name)}" in text, name
        if f.default not in (False, dataclasses.MISSING):
            shown = getattr(f.default, "value", f.default)
            shown = "none" if shown is None else "empty" if shown in ("", ()) else shown
            assert f"(default: {shown})" in text, name


def test_parsed_defaults_build_the_default_config():
    args = build_parser().parse_args(["serve"])
    assert server_config(args) == ServerConfig()


def test_flags_keep_their_spelling_and_reach_their_setting(tmp_path):
    args = build_parser().parse_args([
        "serve", "--max-image-bytes", "1000", "--load-model", "a", "--load-model", "b",
        "--no-http", "--model-control", "explicit", "--trust-network", "--access-log", "all"])
    config = server_config(args)
    assert config.limits.max_encoded_image_bytes == 1000
    assert config.load_models == ("a", "b") and config.http_port is None
    assert config.model_control is ModelControlMode.EXPLICIT
    assert config.access_log is AccessLogMode.ALL


def test_the_environment_sets_a_flag_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("VISIONSERVE_GRPC_PORT", "9101")
    monkeypatch.setenv("VISIONSERVE_MODEL_CONTROL", "none")
    monkeypatch.setenv("VISIONSERVE_LOAD_MODEL", "x,y")
    monkeypatch.setenv("VISIONSERVE_NO_HTTP", "true")
    config = server_config(build_parser().parse_args(["serve", "--grpc-port", "9202"]))
    assert config.grpc_port == 9202
    assert config.model_control is ModelControlMode.NONE
    assert config.load_models == ("x", "y") and config.http_port is None


def test_a_bad_value_in_the_environment_is_a_usage_error_naming_the_variable(monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("VISIONSERVE_GOLDEN_CHECK", "sometimes")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--golden-check" in err and "VISIONSERVE_GOLDEN_CHECK" in err and "sometimes" in err


@pytest.mark.parametrize(("settings", "named"), [
    ({"tls_cert": Path("cert.pem")}, "--tls-cert and --tls-key go together"),
    ({"tls_client_ca": Path("ca.pem")}, "--tls-client-ca (mutual TLS) needs --tls-cert"),
    ({"auth_open": ("metadata",)}, "--auth-open needs a token"),
    ({"model_control": "explicit"}, "--model-control explicit without a token"),
    ({"model_control": "sometimes"}, "--model-control 'sometimes': choose one of poll"),
    ({"ready_file": Path("/no/such/folder/ready.json")}, "--ready-file"),
    ({"auth_token": "t", "auth_open": ("everything",)}, "everything"),
])
def test_a_config_built_by_a_program_is_checked_like_the_command_line(settings, named):
    with pytest.raises(UsageError) as refused:
        ServerConfig(**settings)
    assert named in str(refused.value)


def test_the_rules_pass_what_they_should(tmp_path):
    config = ServerConfig(model_control="explicit", auth_token="t", auth_open=("metadata",),
                          ready_file=tmp_path / "ready.json")
    assert config.model_control is ModelControlMode.EXPLICIT and config.tls is None
    assert ServerConfig(model_control="explicit", trust_network=True).auth_token is None

"""The embedded Ray instance always uses token authentication and never logs its token
(issue 11, item 12)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fer_batch.config import RayConfig, RunConfig  # noqa: E402
from fer_batch.runners.ray import embedded_env, ray_session  # noqa: E402


@pytest.fixture()
def no_user_token(monkeypatch, tmp_path):
    """An environment with no Ray token configured (HOME without ~/.ray/auth_token)."""
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("inherited", [None, "disabled", "DISABLED", "token"])
def test_embedded_env_always_asks_for_token_auth(no_user_token, monkeypatch, inherited):
    if inherited is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", inherited)
    env = embedded_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert len(env["RAY_AUTH_TOKEN"]) >= 32  # a random one: none is configured
    assert embedded_env()["RAY_AUTH_TOKEN"] != env["RAY_AUTH_TOKEN"]


def test_embedded_env_keeps_a_configured_token(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    tok = tmp_path / "token"
    tok.write_text("t" * 40)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tok))
    env = embedded_env()
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env  # Ray reads the file


@pytest.mark.slow
def test_embedded_session_uses_token_auth_and_logs_no_token(no_user_token, monkeypatch, caplog):
    """A real embedded instance started with RAY_AUTH_MODE=disabled inherited: it runs with
    token authentication, and nothing logged (dashboard line included) holds the token."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = RunConfig(ray=RayConfig(dashboard=True))
    caplog.set_level(logging.DEBUG)
    with ray_session(cfg) as info:
        assert info["embedded"]
        mode, token = os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN")
        assert mode == "token" and token
        assert ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()) == "token"
        token_file = Path(info["temp_dir"]) / "auth_token"
        assert token_file.read_text() == token and token_file.stat().st_mode & 0o077 == 0
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"  # the caller's setting is back
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Ray dashboard" in logged and str(token_file) in logged
    assert token not in logged

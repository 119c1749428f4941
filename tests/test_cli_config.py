"""Configuration files of ``deployctl server --config`` and ``deployctl agent/up --config``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from deploy_core.cli import load_agent_settings, load_server_settings, parse_duration


def test_server_settings_hold_plugin_tables(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[plugins.monitor_docker]\nretention_days = 3\n")
    assert load_server_settings(path) == {"monitor_docker": {"retention_days": 3}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[surprise]\nx = 1\n", "unknown section"),
        ("plugins = 3\n", "must be tables"),
        ("[plugins\n", "server.toml"),
    ],
)
def test_bad_server_settings_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(click.BadParameter, match=message):
        load_server_settings(path)


def test_agent_settings_refuse_services_that_are_not_tables(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[services]\ndocker_monitor = 5\n")
    with pytest.raises(click.BadParameter, match="must be tables"):
        load_agent_settings(path)


def test_agent_settings_hold_plugin_tables(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[plugins.deploy_tar]\nallow_http_hosts = ["mirror.lan"]\n')
    assert load_agent_settings(path)["plugins"] == {
        "deploy_tar": {"allow_http_hosts": ["mirror.lan"]}
    }
    path.write_text("[plugins]\ndeploy_tar = 5\n")
    with pytest.raises(click.BadParameter, match=r"\[plugins.NAME\] must be tables"):
        load_agent_settings(path)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", "0", "1w"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_duration(text)


def test_server_refuses_a_bad_config_file_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonsense]\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy_core.cli",
            "server",
            "--state-dir",
            str(tmp_path / "s"),
            "--config",
            str(bad),
            "--api-port",
            "0",
            "--quic-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown section" in done.stderr
    assert not (tmp_path / "s" / "server.json").exists()

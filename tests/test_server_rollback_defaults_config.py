"""``[defaults.rollback]`` of ``deployctl server --config``: read, checked against the installed
plugins, and a wrong one stops the server before it starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from deploy_core.cli import load_server_settings
from deploy_core.cli.serving import load_rollback_defaults
from deploy_core.plugins import get_plugins
from tests.conftest import missing_part

GOOD = """\
[plugins.monitor_docker]
retention_days = 3

[defaults.rollback."deploy.shell"]
strategy = "snapshot"
path = "{workdir}"

[defaults.rollback]
"deploy.docker" = {strategy = "none"}
"""


@pytest.fixture(autouse=True)
def _plugins() -> None:
    plugins = get_plugins()
    if "deploy.shell" not in plugins.deploy_types or "snapshot" not in plugins.rollback_strategies:
        missing_part("deploy_shell and rollback_basic must be installed")


def test_defaults_are_read_beside_the_plugin_tables(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(GOOD)
    assert load_server_settings(path) == {"monitor_docker": {"retention_days": 3}}
    assert load_rollback_defaults(path) == {
        "deploy.shell": {"strategy": "snapshot", "path": "{workdir}"},
        "deploy.docker": {"strategy": "none"},
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[defaults]\nfoo = 1\n", "[defaults] holds only"),
        ("[defaults.rollback]\nx = 3\n", "must hold one table per deploy type"),
        ('[defaults.rollback."deploy.nope"]\nstrategy = "inline"\n', "no deploy type"),
        ('[defaults.rollback."deploy.shell"]\nstrategy = "magic"\n', "unknown rollback strategy"),
        ('[defaults.rollback."deploy.shell"]\nstrategy = "snapshot"\n', "path: Field required"),
    ],
)
def test_bad_defaults_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(click.BadParameter) as caught:
        load_rollback_defaults(path)
    assert message in str(caught.value)


def test_the_server_refuses_to_start_on_a_wrong_default(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[defaults.rollback."deploy.shell"]\nstrategy = "snapshot"\npath = "{nope}"\n')
    server = [sys.executable, "-m", "deploy_core.cli", "server", "--state-dir", str(tmp_path)]
    done = subprocess.run(
        [*server, "--api-port", "0", "--quic-port", "0", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "path = '{nope}' names no parameter of deploy.shell" in done.stderr
    assert not (tmp_path / "server.json").exists()

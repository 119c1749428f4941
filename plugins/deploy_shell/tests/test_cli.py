"""``deployctl deploy shell`` comes from this plugin (``deploy_register_cli_commands``), like
``deploy tar`` and ``deploy docker``: listed when the plugin is loaded, absent when not."""

from __future__ import annotations

import os
import subprocess
import sys

from deploy_core.plugins import load_plugins
from deploy_shell.cli import deploy_shell


def _deployctl(*args: str, plugins: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DEPLOY_CORE_PLUGINS": plugins},
    )


def test_the_command_is_registered_by_deploy_shell() -> None:
    commands = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"}).cli_commands
    assert commands.get("deploy shell") is deploy_shell
    assert commands.owners["deploy shell"] == "deploy_shell"


def test_deployctl_has_deploy_shell_only_with_the_plugin() -> None:
    helped = _deployctl("deploy", "shell", "--help", plugins="deploy_shell")
    assert helped.returncode == 0, helped.stderr
    for option in ("--script-file", "--health", "--health-retries", "--snapshot", "--no-rollback"):
        assert option in helped.stdout
    missing = _deployctl("deploy", "shell", "--help", plugins="nothing")
    assert missing.returncode == 2 and "No such command 'shell'" in missing.stderr

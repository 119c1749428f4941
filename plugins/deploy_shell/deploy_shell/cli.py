"""``deployctl deploy shell``: run a script on a client from the command line.

Registered under the core's ``deploy`` group with ``deploy_register_cli_commands``, like
``deployctl deploy tar`` and ``docker``.  Its rollback options name the strategies of the
``rollback_basic`` plugin (``inline``, ``script``, ``snapshot``) as plain request values:
the server refuses them, with what to do, when that plugin is not loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploy_core.plugin.cli import (
    DeployClient,
    health_checks_field,
    health_options,
    no_rollback_option,
    parse_env,
    rollback_field,
    submit_and_follow,
    with_api,
)

__all__ = ["deploy_shell"]


def _read_script(text: str | None, file: Path | None, what: str) -> str | None:
    if text is not None and file is not None:
        raise click.UsageError(f"give {what} as text or as a file, not both")
    if file is not None:
        return file.read_text()
    return text


@click.command("shell")
@click.option("--client", "client_id", required=True, help="target client id")
@click.option("--script", default=None, help="script text")
@click.option("--script-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workdir", default=None, help="absolute working directory on the host")
@click.option("--env", "env", multiple=True, help="KEY=VALUE, repeatable")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300,
    show_default=True,
    help="seconds before the script is killed",
)
@health_options
@click.option(
    "--health-script-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a script whose exit code 0 means healthy",
)
@click.option(
    "--rollback",
    "rollback_strategy",
    default=None,
    help="rollback strategy: inline (run the script again with DEPLOY_ACTION=rollback),"
    " script, snapshot",
)
@click.option(
    "--rollback-script-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="script run to roll back (implies --rollback script)",
)
@click.option(
    "--snapshot",
    "snapshot_dir",
    default=None,
    help="directory to snapshot before and restore on failure (implies --rollback snapshot)",
)
@no_rollback_option
@click.option("--wait", is_flag=True, help="follow the deployment until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def deploy_shell(
    api: DeployClient,
    client_id: str,
    script: str | None,
    script_file: Path | None,
    workdir: str | None,
    env: tuple[str, ...],
    timeout: float,
    health: tuple[str, ...],
    health_retries: int | None,
    health_interval: float | None,
    health_script_file: Path | None,
    rollback_strategy: str | None,
    rollback_script_file: Path | None,
    snapshot_dir: str | None,
    no_rollback: bool,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Run a shell script on a client.  Without a rollback option, a failure is undone only
    if the server config sets a default for deploy.shell (the record says which)."""
    body_script = _read_script(script, script_file, "the script")
    if body_script is None:
        raise click.UsageError("give --script or --script-file")
    body: dict[str, Any] = {
        "client_id": client_id,
        "script": body_script,
        "env": parse_env(env),
        "timeout": timeout,
    }
    if workdir:
        body["workdir"] = workdir
    script_check = (
        [{"type": "script", "script": health_script_file.read_text()}]
        if health_script_file is not None
        else []
    )
    body.update(health_checks_field(health, health_retries, health_interval, script_check))
    body.update(
        rollback_field(
            no_rollback, _rollback_option(rollback_strategy, rollback_script_file, snapshot_dir)
        )
    )
    submit_and_follow(api, "shell", body, wait, wait_timeout)


def _rollback_option(
    strategy: str | None, script_file: Path | None, snapshot_dir: str | None
) -> dict[str, Any] | None:
    if script_file is not None:
        return {"strategy": strategy or "script", "script": script_file.read_text()}
    if snapshot_dir is not None:
        return {"strategy": strategy or "snapshot", "path": snapshot_dir}
    if strategy is not None:
        return {"strategy": strategy}
    return None

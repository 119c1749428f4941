"""``deployctl deploy tar``: upload a package (with a progress bar) and deploy it.

Registered under the core's ``deploy`` group with ``deploy_register_cli_commands``.
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
    upload_with_progress,
    with_api,
)
from deploy_tar.deploy import size_text

__all__ = ["deploy_tar"]


@click.command("tar")
@click.option("--client", "client_id", required=True, help="target client id")
@click.option(
    "--package",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a .tar.gz (or .tar, .tar.bz2, .tar.xz) to upload and deploy",
)
@click.option("--artifact", help="SHA-256 of a package already uploaded (deployctl artifact push)")
@click.option("--target-dir", required=True, help="absolute directory on the host")
@click.option(
    "--install-script", help="script inside the package to run (default: install.sh if present)"
)
@click.option("--env", "env", multiple=True, help="KEY=VALUE for the install script, repeatable")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600,
    show_default=True,
    help="seconds for fetch, extraction and install",
)
@click.option("--keep-releases", type=click.IntRange(1, 100), default=5, show_default=True)
@health_options
@click.option(
    "--start-script",
    default=None,
    help="on rollback, script inside the previous release that starts it (default: its "
    "install script again, with DEPLOY_ACTION=rollback)",
)
@no_rollback_option
@click.option("--wait", is_flag=True, help="follow the deployment until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def deploy_tar(
    api: DeployClient,
    client_id: str,
    package: Path | None,
    artifact: str | None,
    target_dir: str,
    install_script: str | None,
    env: tuple[str, ...],
    timeout: float,
    keep_releases: int,
    health: tuple[str, ...],
    health_retries: int | None,
    health_interval: float | None,
    start_script: str | None,
    no_rollback: bool,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Deploy a tar.gz package as a new release under --target-dir.

    The package is uploaded first (--package) unless it is in the store already
    (--artifact). On failure the release rollback switches back to the previous release
    (the default of deploy.tar, unless the server config sets another), unless --no-rollback.
    """
    if (package is None) == (artifact is None):
        raise click.UsageError("give exactly one of --package FILE and --artifact SHA256")
    if no_rollback and start_script is not None:
        raise click.UsageError("--start-script is for the rollback; drop --no-rollback")
    if package is not None:
        stored = upload_with_progress(api, package)
        artifact = stored["sha256"]
        how = "already stored" if stored.get("existing") else "uploaded"
        click.echo(f"package {artifact} {how} ({size_text(stored['size'])})", err=True)
    body: dict[str, Any] = {
        "client_id": client_id,
        "artifact": artifact,
        "target_dir": target_dir,
        "env": parse_env(env),
        "timeout": timeout,
        "keep_releases": keep_releases,
    }
    if install_script:
        body["install_script"] = install_script
    body.update(health_checks_field(health, health_retries, health_interval))
    body.update(
        rollback_field(
            no_rollback, {"strategy": "release", "start": start_script} if start_script else None
        )
    )
    submit_and_follow(api, "tar", body, wait, wait_timeout)

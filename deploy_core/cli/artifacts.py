"""``deployctl artifact push|show``: the server's package store."""

from __future__ import annotations

from pathlib import Path

import click

from deploy_core.cli.common import (
    echo_json,
    human_size,
    json_option,
    upload_with_progress,
    with_api,
)
from deploy_core.cli.groups import main
from deploy_core.client import DeployClient


@main.group()
def artifact() -> None:
    """Upload packages to the server's artifact store, and look them up."""


@artifact.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@with_api
def artifact_push(api: DeployClient, file: Path, as_json: bool) -> None:
    """Upload FILE (streamed, with a progress bar on stderr); prints its SHA-256."""
    result = upload_with_progress(api, file)
    if as_json:
        echo_json(result)
        return
    how = "already stored" if result.get("existing") else "stored"
    click.echo(f"{result['sha256']}  {human_size(result['size'])}  {how}")


@artifact.command("show")
@click.argument("sha256")
@json_option
@with_api
def artifact_show(api: DeployClient, sha256: str, as_json: bool) -> None:
    """Show a stored artifact's size and upload time."""
    result = api.artifact(sha256)
    if as_json:
        echo_json(result)
        return
    click.echo(f"sha256:     {result['sha256']}")
    click.echo(f"size:       {result['size']} bytes ({human_size(result['size'])})")
    click.echo(f"created_at: {result['created_at']}")

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
@click.option(
    "--package-url",
    help="https:// URL the agent fetches the package from instead of the server's store "
    "(needs --sha256); a query string (presigned URL) is sent as a secret, never stored",
)
@click.option("--sha256", "url_sha256", help="SHA-256 the package at --package-url must have")
@click.option(
    "--size",
    "url_size",
    type=click.IntRange(min=1),
    help="the package's size in bytes (--package-url)",
)
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
    package_url: str | None,
    url_sha256: str | None,
    url_size: int | None,
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
    (--artifact), or the agent fetches it from a URL (--package-url with --sha256). On failure the
    release rollback switches back to the previous release (the default of deploy.tar,
    unless the server config sets another), unless --no-rollback.
    """
    if sum(x is not None for x in (package, artifact, package_url)) != 1:
        raise click.UsageError(
            "give exactly one of --package FILE, --artifact SHA256 and --package-url URL"
        )
    if (package_url is None) != (url_sha256 is None) or (url_size and package_url is None):
        raise click.UsageError("--package-url needs --sha256 (and takes --size); they go together")
    if no_rollback and start_script is not None:
        raise click.UsageError("--start-script is for the rollback; drop --no-rollback")
    if package is not None:
        stored = upload_with_progress(api, package)
        artifact = stored["sha256"]
        how = "already stored" if stored.get("existing") else "uploaded"
        click.echo(f"package {artifact} {how} ({size_text(stored['size'])})", err=True)
    body: dict[str, Any] = {
        "client_id": client_id,
        "target_dir": target_dir,
        "env": parse_env(env),
        "timeout": timeout,
        "keep_releases": keep_releases,
    }
    if package_url is not None:
        body.update(url_source(package_url, url_sha256 or "", url_size))
    else:
        body["artifact"] = artifact
    if install_script:
        body["install_script"] = install_script
    body.update(health_checks_field(health, health_retries, health_interval))
    body.update(
        rollback_field(
            no_rollback, {"strategy": "release", "start": start_script} if start_script else None
        )
    )
    submit_and_follow(api, "tar", body, wait, wait_timeout)


QUERY_SECRET = "DEPLOY_TAR_URL_QUERY"


def url_source(url: str, sha256: str, size: int | None) -> dict[str, Any]:
    """The request fields of a URL source: a query string (a presigned URL's credentials)
    goes into ``secret_env``, sealed on the server and never shown, named by
    ``source.query_secret``; the URL stored with the deployment has none."""
    base, _, query = url.partition("?")
    source: dict[str, Any] = {"url": base, "sha256": sha256}
    if size is not None:
        source["size"] = size
    fields: dict[str, Any] = {"source": source}
    if query:
        source["query_secret"] = QUERY_SECRET
        fields["secret_env"] = {QUERY_SECRET: query.partition("#")[0]}
    return fields

"""``deployctl server``: run the HTTP API and the QUIC endpoint for agents.

Loaded only when the command is run or listed (``_MainGroup.lazy_commands`` in
:mod:`deploy_core.cli.groups`): its options' defaults come from the server's modules, which
``deployctl agent`` never imports (issue 12).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deploy_core.cli.api_tls_options import api_tls_options, api_tls_settings
from deploy_core.cli.common import database_url, parse_duration, parse_size, state_dir_option
from deploy_core.cli.groups import log_format_option
from deploy_core.cli.serving import (
    load_rollback_defaults,
    load_server_settings,
    print_server_banner,
    read_server_config,
    run_until_signal,
    server_config_option,
)
from deploy_core.server.http.http_limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_UNAUTHENTICATED,
    HttpLimits,
)
from deploy_core.server.leases import LEASE_SECONDS
from deploy_core.server.webhooks import WebhookSettings
from deploy_core.transport.files import DEFAULT_MAX_TRANSFERS

#: The most file worker processes a server starts (--file-workers).
MAX_FILE_WORKERS = 64

if TYPE_CHECKING:
    from deploy_core.server.cluster_identity import ClusterSettings

HTTP_SETTINGS = {
    "header_timeout": "http_header_timeout",
    "body_timeout": "http_body_timeout",
    "max_unauthenticated": "http_max_unauthenticated",
}


def http_limits(path: Path | None, flags: dict[str, Any]) -> HttpLimits:
    """The HTTP limits: a ``--http-*`` flag given on the command line, else the ``[http]``
    table of the server configuration, else the flag's default."""
    table: dict[str, Any] = read_server_config(path).get("http", {}) if path else {}
    if not isinstance(table, dict) or set(table) - set(HTTP_SETTINGS):
        raise click.BadParameter(
            f"{path}: [http] takes only {', '.join(HTTP_SETTINGS)}", param_hint="--config"
        )
    ctx = click.get_current_context()
    values = {}
    for key, flag in HTTP_SETTINGS.items():
        given = ctx.get_parameter_source(flag) is click.core.ParameterSource.COMMANDLINE
        values[key] = flags[flag] if given or key not in table else table[key]
        if isinstance(values[key], bool) or not isinstance(values[key], int | float):
            raise click.BadParameter(
                f"{path}: [http] {key} must be a number, got {values[key]!r}",
                param_hint="--config",
            )
    try:
        return HttpLimits(**values)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(f"{path}: [http]: {exc}", param_hint="--config") from None


def webhook_settings(path: Path | None) -> WebhookSettings:
    """The ``[webhooks]`` table of the server configuration, checked."""
    table = read_server_config(path).get("webhooks", {}) if path else {}
    try:
        return WebhookSettings.from_table(table)
    except ValueError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None


CLUSTER_SETTINGS = ("key_file", "join")


def cluster_settings(
    path: Path | None, key_file: Path | None, join: bool | None
) -> ClusterSettings | None:
    """The cluster identity options: ``--cluster-key-file`` and ``--join-cluster`` given on
    the command line, else the ``[cluster]`` table of the server configuration
    (``key_file``, relative to the file's directory; ``join``).  ``None``: no cluster key,
    the state directory's own identity."""
    from deploy_core.server.cluster_identity import ClusterSettings

    table: Any = read_server_config(path).get("cluster", {}) if path else {}
    if not isinstance(table, dict) or set(table) - set(CLUSTER_SETTINGS):
        raise click.BadParameter(
            f"{path}: [cluster] takes only {', '.join(CLUSTER_SETTINGS)}", param_hint="--config"
        )
    if key_file is None and "key_file" in table:
        if not isinstance(table["key_file"], str) or not table["key_file"]:
            raise click.BadParameter(
                f"{path}: [cluster] key_file must be a path", param_hint="--config"
            )
        assert path is not None
        key_file = (path.parent / table["key_file"]).resolve()
    if join is None:
        join = table.get("join", False)
        if not isinstance(join, bool):
            raise click.BadParameter(
                f"{path}: [cluster] join must be true or false, got {join!r}",
                param_hint="--config",
            )
    if key_file is None:
        if join:
            raise click.BadParameter(
                "--join-cluster needs the cluster key: --cluster-key-file PATH (or key_file "
                "in [cluster] of --config); make one with `deployctl cluster key --out PATH`",
                param_hint="--join-cluster",
            )
        return None
    return ClusterSettings(key_file=key_file, join=join)


_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_advertise_host(value: str | None) -> str | None:
    """``--advertise-host``: a host name or an IP address (no scheme, port or path), and not
    a wildcard (which nobody can reach)."""
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        if not _HOST_NAME.match(value):
            raise click.BadParameter(
                f"{value!r} is not a host name or IP address (give just the host, e.g. "
                "deploy-a.internal or 10.0.0.11: no scheme, port or path)",
                param_hint="--advertise-host",
            ) from None
        return value
    if address.is_unspecified:
        raise click.BadParameter(
            f"{value} is the wildcard address: give the address the other replicas reach",
            param_hint="--advertise-host",
        )
    return str(address)


def artifact_dir_setting(path: Path | None, flag: Path | None) -> Path | None:
    """The artifact store's directory: ``--artifact-dir`` (or its variable) when given, else
    ``dir`` of ``[artifacts]`` in the server configuration (relative to the file's
    directory), else ``None`` (the state directory's ``artifacts/``)."""
    table = _artifacts_table(path)
    if flag is not None or "dir" not in table:
        return flag
    if not isinstance(table["dir"], str) or not table["dir"]:
        raise click.BadParameter(f"{path}: [artifacts] dir must be a path", param_hint="--config")
    assert path is not None
    return (path.parent / table["dir"]).resolve()


def _artifacts_table(path: Path | None) -> dict[str, Any]:
    table: Any = read_server_config(path).get("artifacts", {}) if path else {}
    if not isinstance(table, dict) or set(table) - {"dir", "file_workers"}:
        raise click.BadParameter(
            f"{path}: [artifacts] takes only dir and file_workers", param_hint="--config"
        )
    return table


def file_workers_setting(path: Path | None, flag: int | None) -> int:
    """File worker processes: ``--file-workers`` (or its variable) when given, else
    ``file_workers`` of ``[artifacts]`` in the server configuration, else 0."""
    if flag is not None:
        return flag
    value = _artifacts_table(path).get("file_workers", 0)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_FILE_WORKERS:
        raise click.BadParameter(
            f"{path}: [artifacts] file_workers must be a whole number from 0 to {MAX_FILE_WORKERS}",
            param_hint="--config",
        )
    return value


def server_config_file(
    path: Path | None,
    http_flags: dict[str, Any] | None = None,
    cluster_flags: tuple[Path | None, bool | None] | None = None,
    artifact_dir: Path | None = None,
    file_workers: int | None = None,
) -> dict[str, Any]:
    """What a server configuration file (``--config`` of ``server`` and ``up``) sets, as
    :class:`~deploy_core.server.app.ServerConfig` keyword arguments: plugins' settings
    (``[plugins.NAME]``), rollback defaults (``[defaults.rollback]``), HTTP limits
    (``[http]``), webhooks (``[webhooks]``), the cluster key (``[cluster]``) and the
    artifact directory (``[artifacts]``), each checked; a bad file stops the command before
    anything starts.

    :param http_flags: the ``--http-*`` flags' values (one given on the command line wins
        over ``[http]``); ``None`` for a command without them: their defaults.
    :param cluster_flags: ``--cluster-key-file`` and ``--join-cluster`` (``None`` when not
        given); ``None`` for a command without them (``up``), which refuses ``[cluster]``.
    :param artifact_dir: ``--artifact-dir``, which wins over ``[artifacts]``.
    :param file_workers: ``--file-workers``, which wins over ``[artifacts] file_workers``.
    """
    if cluster_flags is None:
        if path and "cluster" in read_server_config(path):
            raise click.BadParameter(
                f"{path}: [cluster] is for `deployctl server` replicas on PostgreSQL; this "
                "command runs one server on SQLite",
                param_hint="--config",
            )
        cluster_flags = (None, None)
    return {
        "cluster": cluster_settings(path, *cluster_flags),
        "artifact_dir": artifact_dir_setting(path, artifact_dir),
        "file_workers": file_workers_setting(path, file_workers),
        "plugin_settings": load_server_settings(path) if path else {},
        "rollback_defaults": load_rollback_defaults(path) if path else {},
        "webhooks": webhook_settings(path),
        "http_limits": http_limits(
            path,
            http_flags
            or {
                "http_header_timeout": DEFAULT_HEADER_TIMEOUT,
                "http_body_timeout": DEFAULT_BODY_TIMEOUT,
                "http_max_unauthenticated": DEFAULT_MAX_UNAUTHENTICATED,
            },
        ),
    }


@click.command()
@log_format_option
@state_dir_option
@click.option(
    "--api-host",
    default="127.0.0.1",
    show_default=True,
    help="address the API and web page listen on; one that is not loopback is served over "
    "HTTPS unless --api-insecure-http",
)
@click.option("--api-port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@api_tls_options(network=True)
@click.option("--quic-host", default="127.0.0.1", show_default=True)
@click.option("--quic-port", default=8471, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--db",
    "db_url",
    default=None,
    help="database URL (default: SQLite in the state directory), "
    "e.g. postgresql://user@host/dbname",
)
@server_config_option
@click.option(
    "--cert-name",
    "cert_names",
    multiple=True,
    help="a host name or address agents use to reach this server (repeatable); the server "
    "certificate covers it besides localhost, 127.0.0.1 and ::1",
)
@click.option(
    "--advertise-host",
    envvar="DEPLOY_CENTER_ADVERTISE_HOST",
    default=None,
    callback=lambda _ctx, _param, value: check_advertise_host(value),
    help="the host name or address other replicas reach this one's API at (and agents its "
    "QUIC port), as announced in GET /api/cluster; default: --api-host (loopback for "
    "0.0.0.0). Needed between machines for replicas to fetch packages from each other; "
    "the server certificate covers it",
)
@click.option(
    "--lease-seconds",
    envvar="DEPLOY_CENTER_LEASE_SECONDS",
    type=click.FloatRange(3, 600),
    default=LEASE_SECONDS,
    show_default=True,
    help="replicas: how long a duty's lease (watchdog, retention, rollouts) lasts; a dead "
    "replica's duties move to another within about this long, and a replica cut off from "
    "the database this long is fenced. Give every replica the same value",
)
@click.option(
    "--cluster-key-file",
    type=click.Path(dir_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="the cluster key (`deployctl cluster key --out PATH`, mode 0600) every replica on "
    "one PostgreSQL database is given: the first replica publishes its CA, admin and join "
    "tokens and secrets key to the database sealed with it, the others take them "
    "(docs/cluster.md); also key_file in [cluster] of --config",
)
@click.option(
    "--join-cluster/--no-join-cluster",
    default=None,
    help="only take the identity the database holds (refuse to start when none is published "
    "yet) instead of publishing this one's when there is none; needs --cluster-key-file; "
    "also join = true in [cluster] of --config",
)
@click.option(
    "--retention",
    default=None,
    help="delete finished deployments older than this (e.g. 30d), checked daily",
)
@click.option(
    "--max-log-bytes",
    type=click.IntRange(1024),
    default=10 * 1024 * 1024,
    show_default=True,
    help="output kept per deployment: past it the log holds the head, one "
    "[output truncated: …] line, then the tail",
)
@click.option(
    "--max-artifact-size",
    envvar="DEPLOY_CENTER_MAX_ARTIFACT_SIZE",
    default="2G",
    show_default=True,
    help="largest package the artifact store accepts (bytes, or with K, M, G)",
)
@click.option(
    "--artifact-dir",
    envvar="DEPLOY_CENTER_ARTIFACT_DIR",
    type=click.Path(file_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="the artifact store's directory (default: artifacts/ in the state directory); "
    "replicas may share one, on one machine or on NFS (docs/cluster.md); also dir in "
    "[artifacts] of --config",
)
@click.option(
    "--max-file-transfers",
    envvar="DEPLOY_CENTER_MAX_FILE_TRANSFERS",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_MAX_TRANSFERS,
    show_default=True,
    help="artifact transfers to agents sent at once; more agents wait in line (they show "
    "'waiting for the server (position N)')",
)
@click.option(
    "--file-workers",
    envvar="DEPLOY_CENTER_FILE_WORKERS",
    type=click.IntRange(0, MAX_FILE_WORKERS),
    default=None,
    help="processes serving artifact transfers besides the server's own, each on a UDP port "
    "of its own next to --quic-port (agents learn them when they connect); about one per "
    "spare core. Default: [artifacts] file_workers of --config, else 0",
)
@click.option(
    "--http-header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_HEADER_TIMEOUT,
    show_default=True,
    help="seconds a client has to send a request's headers; then 408 and the connection closes",
)
@click.option(
    "--http-body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_BODY_TIMEOUT,
    show_default=True,
    help="seconds a request body may stall (no bytes) before the connection is closed",
)
@click.option(
    "--http-max-unauthenticated",
    type=click.IntRange(1),
    default=DEFAULT_MAX_UNAUTHENTICATED,
    show_default=True,
    help="HTTP connections without an authenticated request kept at once; more get 503",
)
def server(
    state_dir: Path,
    api_host: str,
    api_port: int,
    quic_host: str,
    quic_port: int,
    db_url: str | None,
    retention: str | None,
    max_log_bytes: int,
    cert_names: tuple[str, ...],
    max_artifact_size: str,
    artifact_dir: Path | None,
    max_file_transfers: int,
    file_workers: int | None,
    config_file: Path | None,
    http_header_timeout: float,
    http_body_timeout: float,
    http_max_unauthenticated: int,
    api_tls: bool | None,
    api_cert: Path | None,
    api_key: Path | None,
    api_insecure_http: bool,
    cluster_key_file: Path | None,
    join_cluster: bool | None,
    advertise_host: str | None,
    lease_seconds: float,
) -> None:
    """Run the server: the HTTP API and the QUIC endpoint for agents."""
    from deploy_core.server.app import DeployServer, ServerConfig
    from deploy_core.server.cluster_identity import ClusterIdentityError
    from deploy_core.server.gc_policy import FrozenSurvivors

    config = ServerConfig(
        state_dir=state_dir,
        api_host=api_host,
        api_port=api_port,
        quic_host=quic_host,
        quic_port=quic_port,
        db_url=database_url(db_url, state_dir) if db_url else None,
        retention_days=parse_duration(retention) / 86400 if retention else None,
        max_log_bytes=max_log_bytes,
        cert_names=tuple(
            dict.fromkeys(
                ("localhost", "127.0.0.1", "::1", *cert_names, *filter(None, [advertise_host]))
            )
        ),
        advertise_host=advertise_host,
        lease_seconds=lease_seconds,
        max_artifact_bytes=parse_size(max_artifact_size, "--max-artifact-size"),
        max_file_transfers=max_file_transfers,
        **api_tls_settings(api_host, api_tls, api_cert, api_key, api_insecure_http),
        **server_config_file(
            config_file,
            {
                "http_header_timeout": http_header_timeout,
                "http_body_timeout": http_body_timeout,
                "http_max_unauthenticated": http_max_unauthenticated,
            },
            (cluster_key_file, join_cluster),
            artifact_dir,
            file_workers,
        ),
    )

    async def run(stop: asyncio.Event) -> None:
        srv = DeployServer(config)
        try:
            await srv.start()
        except ClusterIdentityError as exc:
            await srv.stop()
            raise click.ClickException(str(exc)) from None
        print_server_banner(srv)
        # This process is the server's: its full collections walk only what is new
        # (DEPLOY_CENTER_GC_FREEZE=0: CPython's own policy).
        survivors = None
        if os.environ.get("DEPLOY_CENTER_GC_FREEZE", "1") != "0":
            stats = srv.transport.stats
            survivors = FrozenSurvivors(
                asyncio.get_running_loop(),
                ended=lambda: sum(stats.disconnects.values()) + sum(stats.refusals.values()),
                open_now=lambda: len(srv.transport.sessions),
            ).install()
        try:
            await stop.wait()
        finally:
            if survivors is not None:
                survivors.close()
            await srv.stop()

    run_until_signal(run)

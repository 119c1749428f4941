"""What the long-running commands share: running until a signal (``agent``, ``server``,
``up``), and the server's configuration file and start-up banner (``server``, ``up``).

Light on purpose: ``deployctl agent`` loads it, so the server's modules are imported only
inside the functions that need them.  :mod:`deploy_core.cli.processes` and
:mod:`deploy_core.cli.server_command` both build on it and neither imports the other when it
loads.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from deploy_core import __version__


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until SIGINT/SIGTERM sets ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def read_server_config(path: Path) -> dict[str, Any]:
    """A server's TOML configuration, its sections checked for shape."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    unknown = set(data) - {"plugins", "defaults", "http", "webhooks", "cluster", "artifacts"}
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))}; only [plugins.NAME], "
            "[defaults.rollback], [http], [webhooks], [cluster] and [artifacts]",
            param_hint="--config",
        )
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise click.BadParameter(f"{path}: [plugins.NAME] must be tables", param_hint="--config")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - {"rollback"}:
        raise click.BadParameter(
            f'{path}: [defaults] holds only [defaults.rollback."<deploy type>"] tables',
            param_hint="--config",
        )
    rollback = defaults.get("rollback", {})
    if not isinstance(rollback, dict) or not all(isinstance(v, dict) for v in rollback.values()):
        raise click.BadParameter(
            f"{path}: [defaults.rollback] must hold one table per deploy type, e.g. "
            '"deploy.shell" = {strategy = "snapshot", path = "{workdir}"}',
            param_hint="--config",
        )
    return data


server_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="server configuration (TOML): [plugins.NAME] tables hold plugins' settings, "
    '[defaults.rollback."<deploy type>"] the rollback a type gets when a request names none, '
    "[http] header_timeout, body_timeout and max_unauthenticated (server's --http-* flags win), "
    "[cluster] key_file and join (server's --cluster-key-file and --join-cluster win)",
)


def load_server_settings(path: Path) -> dict[str, dict[str, Any]]:
    """Read a server's TOML configuration; returns its ``[plugins.NAME]`` tables."""
    plugins: dict[str, dict[str, Any]] = read_server_config(path).get("plugins", {})
    return plugins


def load_rollback_defaults(path: Path) -> dict[str, dict[str, Any]]:
    """Read a server's TOML configuration; returns its ``[defaults.rollback]`` tables by
    deploy type, checked against the installed plugins (docs/user-guide.md, "Rollback")."""
    from deploy_core.plugins import get_plugins
    from deploy_core.server.rollback_plan import RollbackDefaults, RollbackDefaultsError

    tables: dict[str, dict[str, Any]] = (
        read_server_config(path).get("defaults", {}).get("rollback", {})
    )
    try:
        RollbackDefaults(tables, get_plugins())
    except RollbackDefaultsError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    return tables


def print_server_banner(srv: Any) -> None:
    """What a started server prints: its version, endpoints and the files an operator needs."""
    click.echo(f"Deploy Center server {__version__}")
    click.echo(f"  API:          {srv.api_url}")
    click.echo(f"  QUIC:         {srv.config.quic_host}:{srv.transport.port}")
    click.echo(f"  admin token:  {srv.state.admin_token_file}")
    click.echo(f"  join token:   {srv.state.join_token_file}")
    click.echo(f"  agents' CA:   {srv.state.certs.ca_cert}")
    if srv.api_tls is not None:
        trust = f"--ca {srv.api_tls.ca}" if srv.api_tls.ca else "their trust store"
        click.echo(f"  API over TLS: {srv.api_tls.cert} (clients verify it with {trust})")

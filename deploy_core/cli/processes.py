"""``deployctl agent`` and ``up``, the long-running processes (``deployctl server`` is
:mod:`deploy_core.cli.server_command`; what they share is :mod:`deploy_core.cli.serving`)."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deploy_core.cli.api_tls_options import api_tls_options
from deploy_core.cli.common import (
    parse_size,
    state_dir_option,
)
from deploy_core.cli.groups import log_format_option, main
from deploy_core.cli.serving import print_server_banner, run_until_signal, server_config_option

if TYPE_CHECKING:
    from deploy_core.plugins import DeployPlugins


def load_agent_settings(path: Path) -> dict[str, Any]:
    """Read an agent's TOML configuration; ``[services.NAME]`` tables configure agent
    services, the ``[constraints]`` table what scripts must satisfy (returned parsed, as a
    :class:`~deploy_core.agent.constraints.Constraints`)."""
    import tomllib

    from pydantic import ValidationError

    from deploy_core.agent.constraints import Constraints

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    services = data.get("services", {})
    if not isinstance(services, dict) or not all(isinstance(v, dict) for v in services.values()):
        raise click.BadParameter(f"{path}: [services.NAME] must be tables", param_hint="--config")
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise click.BadParameter(f"{path}: [plugins.NAME] must be tables", param_hint="--config")
    data["labels"] = _agent_labels(path, data.get("agent", {}))
    servers = data.get("agent", {}).get("servers", [])
    if not isinstance(servers, list) or not all(isinstance(v, str) for v in servers):
        raise click.BadParameter(
            f'{path}: [agent] servers must be a list of "HOST:PORT" strings',
            param_hint="--config",
        )
    data["servers"] = servers and agent_servers(servers, "--config", f"{path}: [agent] servers: ")
    try:
        data["constraints"] = Constraints.model_validate(data.get("constraints", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"constraints.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise click.BadParameter(f"{path}: {problems}", param_hint="--config") from None
    return data


def _agent_labels(path: Path, table: Any) -> dict[str, str]:
    """The ``[agent]`` table's ``labels``, checked (deploy_core.labels)."""
    from deploy_core.labels import LabelError, check_labels

    if not isinstance(table, dict) or set(table) - {"labels", "servers"}:
        raise click.BadParameter(
            f'{path}: [agent] holds only labels = {{key = "value", …}} and '
            'servers = ["HOST:PORT", …]',
            param_hint="--config",
        )
    try:
        return check_labels(table.get("labels", {}), what="[agent] labels")
    except LabelError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None


def agent_settings_and_constraints(path: Path | None) -> tuple[dict[str, Any], Any]:
    """An agent's configuration file (or none) and its constraints, checked: an agent
    refuses to start rather than run scripts under constraints it cannot apply."""
    from deploy_core.agent.constraints import ConstraintConfigError, ConstraintPolicy, Constraints

    settings = load_agent_settings(path) if path else {}
    constraints = settings.get("constraints") or Constraints()
    try:
        ConstraintPolicy(constraints)
    except ConstraintConfigError as exc:
        raise click.ClickException(f"{path}: [constraints] {exc}") from None
    return settings, constraints


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def agent_servers(
    values: list[str] | tuple[str, ...], hint: str, where: str = ""
) -> list[tuple[str, int]]:
    """The servers an agent may connect to (``--server`` repeated, or ``[agent] servers``),
    each ``HOST:PORT``, none twice."""
    servers: list[tuple[str, int]] = []
    for value in values:
        try:
            server = _host_port(value)
        except click.BadParameter as exc:
            raise click.BadParameter(where + exc.message, param_hint=hint) from None
        if any(c.isspace() or not c.isprintable() for c in server[0]):
            raise click.BadParameter(
                f"{where}{value!r}: a host name has no spaces", param_hint=hint
            )
        if server in servers:
            raise click.BadParameter(f"{where}{value!r} is given twice", param_hint=hint)
        servers.append(server)
    return servers


@main.command()
@log_format_option
@click.option(
    "--server",
    "server_addrs",
    multiple=True,
    help="the server's QUIC HOST:PORT; repeat it for replicas of one server, which the agent "
    "fails over to (default: [agent] servers of --config)",
)
@click.option("--client-id", required=True, help="this agent's id, e.g. web-1")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, resolve_path=True),
    required=True,
    help="where the agent keeps its key and journal",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
    required=True,
    help="the server's CA certificate (ca.pem)",
)
@click.option(
    "--join-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="join token, needed only for the first connection",
)
@click.option(
    "--server-name",
    default="localhost",
    show_default=True,
    help="name the server's certificate is checked against",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="TOML file: [agent] labels, [constraints] on scripts, [services.NAME] for agent services",
)
@click.option(
    "--chunk-size",
    envvar="DEPLOY_CENTER_CHUNK_SIZE",
    default="256K",
    show_default=True,
    help="artifact transfer chunk, 64K to 1M: what a killed agent may receive twice",
)
def agent(
    server_addrs: tuple[str, ...],
    client_id: str,
    state_dir: Path,
    ca_file: Path,
    join_token_file: Path | None,
    server_name: str,
    config_file: Path | None,
    chunk_size: str,
) -> None:
    """Run an agent: connect to the server and carry out deployments."""
    import re

    from deploy_core.agent.runtime import Agent, AgentConfig
    from deploy_core.models import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, client_id):
        raise click.BadParameter(
            "letters, digits, '.', '_' and '-', at most 64", param_hint="--client-id"
        )
    from deploy_core.plugins import get_agent_plugins

    settings, constraints = agent_settings_and_constraints(config_file)
    servers = agent_servers(server_addrs, "--server") or settings.get("servers")
    if not servers:
        raise click.UsageError(
            "Missing option '--server' (or servers = [\"HOST:PORT\", …] in the [agent] table "
            "of --config)."
        )
    (host, port), *more_servers = servers
    warn_unknown_services(config_file, settings.get("services", {}), get_agent_plugins())
    config = AgentConfig(
        server_host=host,
        server_port=port,
        more_servers=more_servers,
        client_id=client_id,
        state_dir=state_dir,
        ca_file=ca_file,
        join_token_file=join_token_file,
        server_name=server_name,
        services=settings.get("services", {}),
        plugin_settings=settings.get("plugins", {}),
        constraints=constraints,
        chunk_size=_chunk_size(chunk_size),
        labels=settings.get("labels", {}),
        metrics_listen=_metrics_listen(config_file, settings.get("metrics")),
    )
    from deploy_core.logs import bind

    bind(client_id=client_id)  # every line of this process is about this agent

    async def run(stop: asyncio.Event) -> None:
        agt = Agent(config)
        task = asyncio.create_task(agt.run())
        await stop.wait()
        await agt.stop()
        await task

    run_until_signal(run)


@main.command()
@log_format_option
@state_dir_option
@click.option("--api-port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@click.option("--quic-port", default=8471, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--agent-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
    default=None,
    help="the local agent's configuration (TOML: [constraints], [services.NAME])",
)
@server_config_option
@api_tls_options(network=False)
def up(
    state_dir: Path,
    api_port: int,
    quic_port: int,
    agent_config: Path | None,
    config_file: Path | None,
    api_tls: bool | None,
    api_cert: Path | None,
    api_key: Path | None,
) -> None:
    """Run a server and one local agent (client id "local") in one process."""
    from deploy_core.agent.runtime import Agent, AgentConfig
    from deploy_core.cli.api_tls_options import api_tls_settings
    from deploy_core.cli.server_command import server_config_file
    from deploy_core.server.app import DeployServer, ServerConfig

    settings, constraints = agent_settings_and_constraints(agent_config)
    metrics_listen = _metrics_listen(agent_config, settings.get("metrics"), "--agent-config")
    server_config = ServerConfig(
        state_dir=state_dir,
        api_port=api_port,
        quic_port=quic_port,
        **server_config_file(config_file),
        **api_tls_settings("127.0.0.1", api_tls, api_cert, api_key),
    )

    async def run(stop: asyncio.Event) -> None:
        srv = DeployServer(server_config)
        await srv.start()
        warn_unknown_services(agent_config, settings.get("services", {}), srv.plugins)
        agt = Agent(
            AgentConfig(
                server_host="127.0.0.1",
                server_port=srv.transport.port,
                client_id="local",
                state_dir=state_dir / "agent-local",
                ca_file=srv.state.certs.ca_cert,
                join_token_file=srv.state.join_token_file,
                services=settings.get("services", {}),
                plugin_settings=settings.get("plugins", {}),
                constraints=constraints,
                labels=settings.get("labels", {}),
                metrics_listen=metrics_listen,
            ),
            plugins=srv.plugins,
        )
        agent_task = asyncio.create_task(agt.run())
        connected = await agt.connector.wait_connected(15)
        print_server_banner(srv)
        click.echo(
            f"  local agent:  {'connected' if connected else 'NOT connected'} as client 'local'"
        )
        if "deploy.shell" in srv.plugins.deploy_types:
            click.echo(f"Try:  {_try_command(srv, state_dir)}")
        try:
            await stop.wait()
        finally:
            await agt.stop()
            await agent_task
            await srv.stop()

    run_until_signal(run)


def warn_unknown_services(
    config_file: Path | None, services: dict[str, Any], plugins: DeployPlugins
) -> None:
    """Warn about ``[services.NAME]`` tables no installed agent service reads: a misspelt
    name would otherwise leave the service on its defaults without a word."""
    known = sorted(plugins.agent_services.entries)
    for name in sorted(set(services) - set(known)):
        logging.getLogger(__name__).warning(
            "%s: [services.%s] is ignored: no installed agent service is called %r; %s",
            config_file,
            name,
            name,
            f"the installed ones are {', '.join(known)}" if known else "none is installed",
        )


def _try_command(srv: Any, state_dir: Path) -> str:
    """A first deployment to try from another terminal, with what it needs to reach this
    server: ``--state-dir`` unless it is the default, ``--url``/``--token`` when the
    environment's DEPLOY_CENTER_URL/DEPLOY_CENTER_TOKEN would point elsewhere."""
    words = "deployctl deploy shell --client local --script 'echo hello' --wait"
    if state_dir != Path("~/.deploy-center").expanduser():
        words += f" --state-dir {shlex.quote(str(state_dir))}"
    if os.environ.get("DEPLOY_CENTER_URL"):
        words += f" --url {shlex.quote(srv.api_url)}"
    if os.environ.get("DEPLOY_CENTER_TOKEN"):
        words += f' --token "$(cat {shlex.quote(str(srv.state.admin_token_file))})"'
    return words


def _metrics_listen(
    config_file: Path | None, table: Any, hint: str = "--config"
) -> tuple[str, int] | None:
    """The ``[metrics]`` table's ``listen`` address, checked (deploy_core.agent.metrics)."""
    if table is None:
        return None
    from deploy_core.agent.metrics import MetricsConfigError, listen_address

    try:
        return listen_address(table)
    except MetricsConfigError as exc:
        raise click.BadParameter(f"{config_file}: {exc}", param_hint=hint) from None


def _chunk_size(value: str) -> int:
    from deploy_core.transport.files import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

    size = parse_size(value, "--chunk-size")
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise click.BadParameter(
            f"must be between 64K and 1M, got {value}", param_hint="--chunk-size"
        )
    return size

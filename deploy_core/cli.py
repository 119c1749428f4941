"""``deployctl``: run the server or an agent, deploy, and look at what happened."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from deploy_core import __version__
from deploy_core.client import DEFAULT_STATE_DIR, ApiError, ConfigError, DeployClient

TERMINAL_OK = {"success"}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "debug":
        # Their INFO lines are per request / per connection noise for an operator.
        for name in ("httpx", "alembic", "quic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` until SIGINT/SIGTERM sets ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


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
    try:
        data["constraints"] = Constraints.model_validate(data.get("constraints", {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"constraints.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise click.BadParameter(f"{path}: {problems}", param_hint="--config") from None
    return data


def load_server_settings(path: Path) -> dict[str, dict[str, Any]]:
    """Read a server's TOML configuration; returns its ``[plugins.NAME]`` tables."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    unknown = set(data) - {"plugins"}
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown section(s) {', '.join(sorted(unknown))}; only [plugins.NAME]",
            param_hint="--config",
        )
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise click.BadParameter(f"{path}: [plugins.NAME] must be tables", param_hint="--config")
    return plugins


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class _PluginAwareGroup(click.Group):
    """Adds plugins' commands on first use, so ``deployctl --help`` lists them too.

    ``plugin_group`` names the group plugins address (``None`` for the top level).
    """

    _loaded = False
    plugin_group: str | None = None

    def _load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from deploy_core.plugins import PluginError, get_plugins

        try:
            registered = get_plugins().cli_commands
        except PluginError as exc:
            logging.getLogger(__name__).warning("plugin commands not loaded: %s", exc)
            return
        for key, command in registered.entries.items():
            group, _, name = key.rpartition(" ")
            if (group or None) != self.plugin_group:
                continue
            if name in self.commands:
                logging.getLogger(__name__).warning(
                    "plugin %s's command %r clashes with a core command; ignored",
                    registered.owners[key],
                    name,
                )
                continue
            self.add_command(command, name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_PluginAwareGroup)
@click.version_option(__version__, prog_name="deployctl")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def main(log_level: str) -> None:
    """Deploy Center: deploy scripts, packages and images to hosts over QUIC."""
    _setup_logging(log_level)


# --------------------------------------------------------------------------- processes

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="where the server keeps its certificates, tokens and database",
)


@main.command()
@state_dir_option
@click.option("--api-host", default="127.0.0.1", show_default=True)
@click.option("--api-port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@click.option("--quic-host", default="127.0.0.1", show_default=True)
@click.option("--quic-port", default=8471, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--db",
    "db_url",
    default=None,
    help="database URL (default: SQLite in the state directory), "
    "e.g. postgresql://user@host/dbname",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="server configuration (TOML): [plugins.NAME] tables hold plugins' settings",
)
@click.option(
    "--cert-name",
    "cert_names",
    multiple=True,
    help="a host name or address agents use to reach this server (repeatable); the server "
    "certificate covers it besides localhost, 127.0.0.1 and ::1",
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
    help="output kept per deployment; past it a marker line says the rest was dropped",
)
@click.option(
    "--max-artifact-size",
    envvar="DEPLOY_CENTER_MAX_ARTIFACT_SIZE",
    default="2G",
    show_default=True,
    help="largest package the artifact store accepts (bytes, or with K, M, G)",
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
    config_file: Path | None,
) -> None:
    """Run the server: the HTTP API and the QUIC endpoint for agents."""
    from deploy_core.server.app import DeployServer, ServerConfig

    config = ServerConfig(
        state_dir=state_dir,
        api_host=api_host,
        api_port=api_port,
        quic_host=quic_host,
        quic_port=quic_port,
        db_url=db_url,
        retention_days=parse_duration(retention) / 86400 if retention else None,
        max_log_bytes=max_log_bytes,
        cert_names=("localhost", "127.0.0.1", "::1", *cert_names),
        max_artifact_bytes=parse_size(max_artifact_size, "--max-artifact-size"),
        plugin_settings=load_server_settings(config_file) if config_file else {},
    )

    async def run(stop: asyncio.Event) -> None:
        srv = DeployServer(config)
        await srv.start()
        _print_server_banner(srv)
        try:
            await stop.wait()
        finally:
            await srv.stop()

    _run_until_signal(run)


def _print_server_banner(srv: Any) -> None:
    click.echo(f"Deploy Center server {__version__}")
    click.echo(f"  API:          {srv.api_url}")
    click.echo(f"  QUIC:         {srv.config.quic_host}:{srv.transport.port}")
    click.echo(f"  admin token:  {srv.state.admin_token_file}")
    click.echo(f"  join token:   {srv.state.join_token_file}")
    click.echo(f"  agents' CA:   {srv.state.certs.ca_cert}")


@main.command()
@click.option("--server", "server_addr", required=True, help="the server's QUIC HOST:PORT")
@click.option("--client-id", required=True, help="this agent's id, e.g. web-1")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    required=True,
    help="where the agent keeps its key and journal",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="the server's CA certificate (ca.pem)",
)
@click.option(
    "--join-token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
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
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML file: [constraints] on scripts, [services.NAME] for agent services",
)
@click.option(
    "--chunk-size",
    envvar="DEPLOY_CENTER_CHUNK_SIZE",
    default="256K",
    show_default=True,
    help="artifact transfer chunk, 64K to 1M: what a killed agent may receive twice",
)
def agent(
    server_addr: str,
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

    from deploy_core.agent.constraints import ConstraintConfigError, ConstraintPolicy, Constraints
    from deploy_core.agent.runtime import Agent, AgentConfig
    from deploy_core.models import ID_PATTERN

    if not re.fullmatch(ID_PATTERN, client_id):
        raise click.BadParameter(
            "letters, digits, '.', '_' and '-', at most 64", param_hint="--client-id"
        )
    host, port = _host_port(server_addr)
    settings = load_agent_settings(config_file) if config_file else {}
    constraints = settings.get("constraints") or Constraints()
    try:  # refuse to start rather than run scripts unconstrained
        ConstraintPolicy(constraints)
    except ConstraintConfigError as exc:
        raise click.ClickException(f"{config_file}: [constraints] {exc}") from None
    config = AgentConfig(
        server_host=host,
        server_port=port,
        client_id=client_id,
        state_dir=state_dir,
        ca_file=ca_file,
        join_token_file=join_token_file,
        server_name=server_name,
        services=settings.get("services", {}),
        constraints=constraints,
        chunk_size=_chunk_size(chunk_size),
    )

    async def run(stop: asyncio.Event) -> None:
        agt = Agent(config)
        task = asyncio.create_task(agt.run())
        await stop.wait()
        await agt.stop()
        await task

    _run_until_signal(run)


@main.command()
@state_dir_option
@click.option("--api-port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@click.option("--quic-port", default=8471, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--agent-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="the local agent's configuration (TOML: [constraints], [services.NAME])",
)
def up(state_dir: Path, api_port: int, quic_port: int, agent_config: Path | None) -> None:
    """Run a server and one local agent (client id "local") in one process."""
    from deploy_core.agent.constraints import ConstraintConfigError, ConstraintPolicy, Constraints
    from deploy_core.agent.runtime import Agent, AgentConfig
    from deploy_core.server.app import DeployServer, ServerConfig

    settings = load_agent_settings(agent_config) if agent_config else {}
    constraints = settings.get("constraints") or Constraints()
    try:
        ConstraintPolicy(constraints)
    except ConstraintConfigError as exc:
        raise click.ClickException(f"{agent_config}: [constraints] {exc}") from None

    async def run(stop: asyncio.Event) -> None:
        srv = DeployServer(
            ServerConfig(state_dir=state_dir, api_port=api_port, quic_port=quic_port)
        )
        await srv.start()
        agt = Agent(
            AgentConfig(
                server_host="127.0.0.1",
                server_port=srv.transport.port,
                client_id="local",
                state_dir=state_dir / "agent-local",
                ca_file=srv.state.certs.ca_cert,
                join_token_file=srv.state.join_token_file,
                services=settings.get("services", {}),
                constraints=constraints,
            ),
            plugins=srv.plugins,
        )
        agent_task = asyncio.create_task(agt.run())
        connected = await agt.connector.wait_connected(15)
        _print_server_banner(srv)
        click.echo(
            f"  local agent:  {'connected' if connected else 'NOT connected'} as client 'local'"
        )
        if "deploy.shell" in srv.plugins.deploy_types:
            click.echo("Try:  deployctl deploy shell --client local --script 'echo hello' --wait")
        try:
            await stop.wait()
        finally:
            await agt.stop()
            await agent_task
            await srv.stop()

    _run_until_signal(run)


# --------------------------------------------------------------------------- API commands

api_options = [
    click.option("--url", envvar="DEPLOY_CENTER_URL", default=None, help="API base URL"),
    click.option("--token", envvar="DEPLOY_CENTER_TOKEN", default=None, help="API token"),
    state_dir_option,
]


def with_api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --url/--token/--state-dir and pass a ready :class:`DeployClient` as ``api``."""
    import functools

    @functools.wraps(fn)
    def wrapper(url: str | None, token: str | None, state_dir: Path, **kwargs: Any) -> Any:
        try:
            api = DeployClient.from_env(url, token, state_dir)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            return fn(api=api, **kwargs)
        except ApiError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            api.close()

    for option in reversed(api_options):
        wrapper = option(wrapper)
    return wrapper


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


class _PluginAwareDeployGroup(_PluginAwareGroup):
    plugin_group = "deploy"


@main.group(cls=_PluginAwareDeployGroup)
def deploy() -> None:
    """Start a deployment (answers at once with its id; add --wait to follow it)."""


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    """``--env KEY=VALUE`` options as a dict (for plugins' commands too)."""
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--env")
        env[key] = value
    return env


def parse_health(spec: str) -> dict[str, Any]:
    """``http:8080/healthz``, ``http://host:8080/path``, ``tcp:5432``, ``tcp:host:5432``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("http", "tcp"):
        raise click.BadParameter(
            f"expected http:PORT[/PATH] or tcp:[HOST:]PORT, got {spec!r}", param_hint="--health"
        )
    rest = rest.removeprefix("//")
    hostport, slash, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"no port in {spec!r}", param_hint="--health")
    check: dict[str, Any] = {"type": kind, "port": int(port)}
    if host:
        check["host"] = host
    if kind == "http":
        check["path"] = "/" + path if slash else "/"
    return check


def _read_script(text: str | None, file: Path | None, what: str) -> str | None:
    if text is not None and file is not None:
        raise click.UsageError(f"give {what} as text or as a file, not both")
    if file is not None:
        return file.read_text()
    return text


@deploy.command("shell")
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
@click.option("--health", multiple=True, help="http:PORT[/PATH] or tcp:[HOST:]PORT, repeatable")
@click.option(
    "--health-script-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a script whose exit code 0 means healthy",
)
@click.option("--health-retries", type=click.IntRange(0, 100), default=None)
@click.option("--health-interval", type=click.FloatRange(min=0), default=None)
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
    health_script_file: Path | None,
    health_retries: int | None,
    health_interval: float | None,
    rollback_strategy: str | None,
    rollback_script_file: Path | None,
    snapshot_dir: str | None,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Run a shell script on a client."""
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
    checks = [parse_health(h) for h in health]
    if health_script_file is not None:
        checks.append({"type": "script", "script": health_script_file.read_text()})
    for check in checks:
        if health_retries is not None:
            check["retries"] = health_retries
        if health_interval is not None:
            check["interval"] = health_interval
    if checks:
        body["health_checks"] = checks
    body["rollback"] = _rollback_option(rollback_strategy, rollback_script_file, snapshot_dir)
    if body["rollback"] is None:
        del body["rollback"]
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


@deploy.command("submit")
@click.argument("kind")
@click.argument("body_file", type=click.File("r"))
@click.option("--wait", is_flag=True, help="follow the deployment until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def deploy_submit(
    api: DeployClient, kind: str, body_file: Any, wait: bool, wait_timeout: float
) -> None:
    """Send a deploy request of any type: KIND (e.g. shell) and a JSON body file ('-' = stdin)."""
    try:
        body = json.load(body_file)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="BODY_FILE") from None
    submit_and_follow(api, kind, body, wait, wait_timeout)


def submit_and_follow(
    api: DeployClient, kind: str, body: dict[str, Any], wait: bool, wait_timeout: float
) -> None:
    """``POST /api/deploy/{kind}``; print the answer, or with ``wait`` follow it live and
    exit 0 only on success (for plugins' ``deploy`` commands too)."""
    accepted = api.deploy(kind, body)
    deploy_id = accepted["deploy_id"]
    if not wait:
        _echo_json(accepted)
        return
    click.echo(
        f"deployment {deploy_id} accepted"
        + (
            ""
            if accepted.get("client_connected")
            else " (client not connected: it runs when the agent connects)"
        ),
        err=True,
    )
    final = follow(api, deploy_id, wait_timeout)
    sys.exit(0 if final["status"] in TERMINAL_OK else 1)


def _bar(progress: int, width: int = 24) -> str:
    done = width * progress // 100
    return "[" + "#" * done + "." * (width - done) + "]"


def follow(api: DeployClient, deploy_id: str, timeout: float) -> dict[str, Any]:
    """Show stage and progress live until the deployment ends; print the outcome."""
    tty = sys.stderr.isatty()
    record: dict[str, Any] = {}
    last_line = ""
    try:
        for record in api.watch(deploy_id, timeout=timeout):
            line = f"{_bar(record['progress'])} {record['progress']:3d}% {record['status']}"
            if record["stage"] and record["stage"] != record["status"]:
                line += f" ({record['stage']})"
            if line == last_line:
                continue
            last_line = line
            if tty:
                click.echo("\r\033[K" + line, nl=False, err=True)
            else:
                click.echo(line, err=True)
    except TimeoutError as exc:
        if tty:
            click.echo(err=True)
        raise click.ClickException(str(exc)) from None
    if tty:
        click.echo(err=True)
    _print_outcome(record)
    return record


def _print_outcome(record: dict[str, Any]) -> None:
    """The end of a deployment for a person: status, error, the result's fields (any deploy
    type's), output tails, health checks and rollback."""
    click.echo(f"deployment {record['deploy_id']}: {record['status']}")
    if record.get("error"):
        click.echo(f"  error: {record['error']}")
    result = record.get("result") or {}
    fields = [
        f"{key.replace('_', ' ')}: {value:.2f}s"
        if key == "duration"
        else f"{key.replace('_', ' ')}: {value}"
        for key, value in result.items()
        if key != "v"
        and not key.endswith("_tail")
        and value not in (None, "", [], {})
        and not isinstance(value, (dict, list))
    ]
    for line in fields:
        click.echo(f"  {line}")
    for key, text in result.items():
        if key.endswith("_tail") and isinstance(text, str) and text.strip():
            click.echo(f"  {key.removesuffix('_tail').replace('_', ' ')} (tail):")
            for line in text.rstrip().splitlines()[-20:]:
                click.echo(f"    {line}")
    for check in record.get("health") or []:
        mark = "ok" if check["success"] else "FAILED"
        click.echo(
            f"  health {check['check_type']}: {mark} after {check.get('attempts', 1)} "
            f"attempt(s){' - ' + check['error'] if check.get('error') else ''}"
        )
    rollback = record.get("rollback")
    if rollback:
        click.echo(
            f"  rollback ({rollback.get('strategy')}): "
            f"{'ok' if rollback['success'] else 'FAILED'}"
            f"{' - ' + rollback['error'] if rollback.get('error') else ''}"
        )


@main.command()
@click.argument("deploy_id")
@click.option("--wait", is_flag=True, help="follow the rollback until it ends")
@click.option("--wait-timeout", type=float, default=3600, show_default=True)
@with_api
def rollback(api: DeployClient, deploy_id: str, wait: bool, wait_timeout: float) -> None:
    """Roll back a finished deployment with its own strategy and health checks."""
    accepted = api.rollback(deploy_id)
    if not wait:
        _echo_json(accepted)
        return
    click.echo(f"rollback {accepted['deploy_id']} of {deploy_id} accepted", err=True)
    final = follow(api, accepted["deploy_id"], wait_timeout)
    sys.exit(0 if final["status"] == "rolled_back" else 1)


@main.command()
@click.argument("deploy_id")
@click.option("--history", is_flag=True, help="also show the status history")
@click.option("--json", "as_json", is_flag=True, help="print the raw record")
@with_api
def status(api: DeployClient, deploy_id: str, history: bool, as_json: bool) -> None:
    """Show a deployment's status and result."""
    record = api.get(deploy_id)
    rows = api.history(deploy_id) if history else []
    if as_json:
        _echo_json({**record, "history": rows} if history else record)
        return
    click.echo(f"{record['deploy_id']}  {record['command_type']}  client {record['client_id']}")
    click.echo(
        f"  {_bar(record['progress'])} {record['progress']}% {record['status']}"
        f"  (created {record['created_at']}, finished {record['finished_at'] or '-'})"
    )
    if record["finished"]:
        _print_outcome(record)
    for row in rows:
        click.echo(
            f"  {row['timestamp']}  {row['status']:<15} {row['progress']:3d}%  {row['message']}"
        )


@main.command("list")
@click.option("--client", "client_id", default=None, help="only this client's deployments")
@click.option("--status", default=None, help="only deployments in this status")
@click.option("--running", is_flag=True, help="only unfinished deployments")
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True)
@with_api
def list_cmd(
    api: DeployClient,
    client_id: str | None,
    status: str | None,
    running: bool,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List deployments, newest first (all clients, or one with --client)."""
    if client_id and not status and not running:
        page = api.list(client_id, limit=limit, offset=offset)
    else:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if client_id:
            params["client_id"] = client_id
        if status:
            params["status"] = status
        if running:
            params["unfinished"] = 1
        page = api.request("GET", "/api/deployments", params=params)
    if as_json:
        _echo_json(page)
        return
    for rec in page["items"]:
        click.echo(
            f"{rec['deploy_id']}  {rec['created_at']}  {rec['client_id']:<16} "
            f"{rec['command_type']:<15} {rec['status']:<15} {rec['progress']:3d}%"
        )
    click.echo(f"({len(page['items'])} of {page['total']})", err=True)


@main.command()
@click.argument("deploy_id")
@click.option("-f", "--follow", "follow_", is_flag=True, help="keep printing until it ends")
@with_api
def logs(api: DeployClient, deploy_id: str, follow_: bool) -> None:
    """Print a deployment's output lines (with -f, as they come until it ends)."""
    if follow_:
        for item in api.follow_logs(deploy_id):
            if "end" in item:
                if item["end"]:
                    click.echo(f"-- deployment ended: {item['status']}", err=True)
                break
            click.echo(f"{item['timestamp']} [{item['stream']}] {item['line']}")
        return
    after = 0
    while True:
        page = api.logs(deploy_id, after=after)
        for line in page["lines"]:
            click.echo(f"{line['timestamp']} [{line['stream']}] {line['line']}")
        if not page["lines"]:
            break
        after = page["next_after"]


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--url", envvar="DEPLOY_CENTER_URL", default=None, help="API base URL")
@click.option("--token", envvar="DEPLOY_CENTER_TOKEN", default=None, help="API token")
@state_dir_option
@click.pass_context
def clients(
    ctx: click.Context, as_json: bool, url: str | None, token: str | None, state_dir: Path
) -> None:
    """List enrolled clients and whether they are connected (or revoke / forget one)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(clients_list, as_json=as_json, url=url, token=token, state_dir=state_dir)


@clients.command("list")
@click.option("--json", "as_json", is_flag=True)
@with_api
def clients_list(api: DeployClient, as_json: bool) -> None:
    """List enrolled clients and whether they are connected."""
    rows = api.clients()
    if as_json:
        _echo_json(rows)
        return
    for c in rows:
        state = (
            ("connected since " + (c["connected_since"] or "?"))
            if c["connected"]
            else ("disconnected since " + (c["disconnected_since"] or "?"))
        )
        if c.get("revoked_at"):
            state = "REVOKED " + c["revoked_at"]
        types = ", ".join(c["capabilities"].get("deploy_types", []))
        click.echo(f"{c['client_id']:<20} {state:<45} {types}")


@clients.command("revoke")
@click.argument("client_id")
@with_api
def clients_revoke(api: DeployClient, client_id: str) -> None:
    """Cut a client off now and refuse its agent from then on."""
    api.request("POST", f"/api/clients/{client_id}/revoke")
    click.echo(f"client {client_id} revoked")


@clients.command("forget")
@click.argument("client_id")
@with_api
def clients_forget(api: DeployClient, client_id: str) -> None:
    """Drop a client's enrolment so its id can enroll again with a join token."""
    api.request("DELETE", f"/api/clients/{client_id}")
    click.echo(f"client {client_id} forgotten; it can enroll again with a join token")


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(
            f"expected a duration like 90s, 15m, 1h, 7d; got {value!r}"
        ) from None
    if seconds <= 0:
        raise click.BadParameter("a duration must be positive")
    return seconds


@main.group()
def token() -> None:
    """API tokens (with scopes) and agents' join tokens."""


@token.command("create")
@click.argument("name", required=False)
@click.option(
    "--scope",
    type=click.Choice(["read", "deploy", "admin"]),
    default=None,
    help="what an API token may do",
)
@click.option("--join", "join", is_flag=True, help="make a join token for enrolling agents")
@click.option("--ttl", default=None, help="join token lifetime, e.g. 1h")
@click.option("--uses", type=click.IntRange(1), default=None, help="join token enrolments")
@with_api
def token_create(
    api: DeployClient,
    name: str | None,
    scope: str | None,
    join: bool,
    ttl: str | None,
    uses: int | None,
) -> None:
    """Create an API token NAME with --scope, or a join token with --join."""
    if join:
        if name or scope:
            raise click.UsageError("a join token takes no NAME or --scope")
        body: dict[str, Any] = {"note": "deployctl"}
        if ttl:
            body["ttl"] = parse_duration(ttl)
        if uses:
            body["uses"] = uses
        made = api.request("POST", "/api/join-tokens", json=body)
        click.echo(made["token"])
        click.echo(
            f"join token {made['token_id']}"
            + (f", {uses} use(s)" if uses else "")
            + (f", expires in {ttl}" if ttl else ""),
            err=True,
        )
        return
    if not name or not scope:
        raise click.UsageError("an API token needs NAME and --scope (or use --join)")
    made = api.request("POST", "/api/tokens", json={"name": name, "scope": scope})
    click.echo(made["token"])
    click.echo(f"token {name} ({scope}); shown once, keep it safe", err=True)


@token.command("list")
@with_api
def token_list(api: DeployClient) -> None:
    """List API tokens and join tokens (never their values)."""
    _echo_json(
        {
            "tokens": api.request("GET", "/api/tokens")["tokens"],
            "join_tokens": api.request("GET", "/api/join-tokens")["join_tokens"],
        }
    )


@token.command("revoke")
@click.argument("name")
@click.option("--join", "join", is_flag=True, help="NAME is a join token id")
@with_api
def token_revoke(api: DeployClient, name: str, join: bool) -> None:
    """Revoke an API token by name, or a join token by id (--join)."""
    api.request("DELETE", f"/api/{'join-tokens' if join else 'tokens'}/{name}")
    click.echo(f"revoked {name}")


@main.command()
@click.option("--server", "from_server", is_flag=True, help="ask the server instead of this host")
@click.option("--url", envvar="DEPLOY_CENTER_URL", default=None)
@click.option("--token", envvar="DEPLOY_CENTER_TOKEN", default=None)
@state_dir_option
def plugins(from_server: bool, url: str | None, token: str | None, state_dir: Path) -> None:
    """Show installed plugins as JSON: name, version, hooks, what each registered."""
    if from_server:
        try:
            with DeployClient.from_env(url, token, state_dir) as api:
                _echo_json(api.plugins())
        except (ConfigError, ApiError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    from deploy_core.plugins import PluginError, get_plugins

    try:
        _echo_json(get_plugins().describe())
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("prune")
@click.option(
    "--older-than", required=True, help="delete finished deployments older than this, e.g. 30d, 12h"
)
@click.option("--db", "db_url", default=None, help="database URL (default: the state dir's SQLite)")
@click.option("--dry-run", is_flag=True, help="only count what would be deleted")
@state_dir_option
def db_prune(older_than: str, db_url: str | None, dry_run: bool, state_dir: Path) -> None:
    """Delete finished deployments (with history and logs) older than a duration."""
    import time

    import sqlalchemy as sa

    from deploy_core.server import db as dbm
    from deploy_core.server.records import RecordStore

    cutoff = time.time() - parse_duration(older_than)
    engine = dbm.make_engine(db_url or dbm.sqlite_url(state_dir / "deploy-center.db"))
    try:
        if dry_run:
            with engine.connect() as conn:
                count = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(dbm.deployments)
                    .where(dbm.deployments.c.finished_at < cutoff)
                ).scalar_one()
            click.echo(f"would delete {count} deployments finished before {older_than} ago")
            return
        deleted = RecordStore(engine).prune(cutoff)
    finally:
        engine.dispose()
    click.echo(f"deleted {deleted} deployments finished more than {older_than} ago")


@db.command("upgrade")
@click.option("--db", "db_url", default=None, help="database URL (default: the state dir's SQLite)")
@state_dir_option
def db_upgrade(db_url: str | None, state_dir: Path) -> None:
    """Create or migrate the core's tables to the newest schema."""
    from deploy_core.server import db as dbm

    url = db_url or dbm.sqlite_url(state_dir / "deploy-center.db")
    if db_url is None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = dbm.make_engine(url)
    try:
        before = dbm.current_revision(engine)
        dbm.upgrade(engine)
        after = dbm.current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"schema {before or 'empty'} -> {after}")


# --------------------------------------------------------------------------- artifacts

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str, option: str = "size") -> int:
    """``512K``, ``2G``, ``1048576`` → bytes (binary units; a trailing ``B``/``iB`` is fine)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", value.upper())
    if match is None:
        raise click.BadParameter(
            f"expected a size such as 500M or 2G, got {value!r}", param_hint=option
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 1:
        raise click.BadParameter("must be at least 1 byte", param_hint=option)
    return size


def _chunk_size(value: str) -> int:
    from deploy_core.transport.files import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

    size = parse_size(value, "--chunk-size")
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise click.BadParameter(
            f"must be between 64K and 1M, got {value}", param_hint="--chunk-size"
        )
    return size


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@main.group()
def artifact() -> None:
    """Upload packages to the server's artifact store, and look them up."""


@artifact.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the answer as JSON")
@with_api
def artifact_push(api: DeployClient, file: Path, as_json: bool) -> None:
    """Upload FILE (streamed, with a progress bar on stderr); prints its SHA-256."""
    result = upload_with_progress(api, file)
    if as_json:
        _echo_json(result)
        return
    how = "already stored" if result.get("existing") else "stored"
    click.echo(f"{result['sha256']}  {_human(result['size'])}  {how}")


def upload_with_progress(api: DeployClient, path: Path) -> dict[str, Any]:
    """Stream ``path`` to the artifact store with a progress bar on stderr (redrawn in place
    on a terminal, a line per 10 % otherwise); the store's answer (for plugins' commands
    too)."""
    import time

    tty = sys.stderr.isatty()
    started = time.monotonic()
    shown = [-1]

    def progress(sent: int, total: int) -> None:
        percent = 100 * sent // total if total else 100
        if percent == shown[0] or (not tty and percent % 10 and sent != total):
            return
        shown[0] = percent
        rate = sent / max(time.monotonic() - started, 1e-6)
        line = f"{_bar(percent)} {percent:3d}% {_human(sent)} of {_human(total)}"
        line += f" {_human(rate)}/s"
        click.echo("\r\033[K" + line if tty else line, nl=not tty, err=True)

    try:
        result: dict[str, Any] = api.upload_artifact(path, progress=progress)
    finally:
        if tty and shown[0] >= 0:
            click.echo(err=True)
    return result


@artifact.command("show")
@click.argument("sha256")
@click.option("--json", "as_json", is_flag=True, help="print the answer as JSON")
@with_api
def artifact_show(api: DeployClient, sha256: str, as_json: bool) -> None:
    """Show a stored artifact's size and upload time."""
    result = api.artifact(sha256)
    if as_json:
        _echo_json(result)
        return
    click.echo(f"sha256:     {result['sha256']}")
    click.echo(f"size:       {result['size']} bytes ({_human(result['size'])})")
    click.echo(f"created_at: {result['created_at']}")


if __name__ == "__main__":
    main()

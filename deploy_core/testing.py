"""Test helpers for Deploy Center and its plugin authors (a pytest plugin).

Installed as a pytest plugin by ``deploy-core``, so these fixtures are available in any test
suite once ``deploy-core`` is installed:

- ``deploy_context`` — a factory for a :class:`~deploy_core.agent.context.DeployContext`
  whose reports and logs are recorded in memory, for testing an executor, probe or rollback
  strategy directly.
- ``deploy_center`` — a real server (QUIC + HTTP API on loopback, SQLite) and real agent
  processes, for end-to-end tests; see :class:`DeployCenter`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deploy_core.agent.context import DeployContext
from deploy_core.models import (
    COMMAND_ROLLBACK,
    DeployCommand,
    DeployStatus,
    LogLine,
    RollbackTarget,
)
from deploy_core.plugin.contexts import DeployContext as PluginContext
from deploy_core.registry import (
    OptionsT,
    ParamsT,
    RollbackRequest,
    RollbackState,
    Stage,
    find_stage,
)


def tree_fingerprint(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed) with its kind, mode, owner and, for a
    file, the SHA-256 of its content: equal before and after means nothing there changed.

    For tests of root file operations: fingerprint a decoy directory, swap a link to it in
    mid-step, and assert the fingerprint is unchanged afterwards."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = f"link {os.readlink(path)}"
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = f"file {st.st_mode:o} {st.st_uid} {digest}"
            else:
                out[str(path)] = f"dir {st.st_mode:o} {st.st_uid}"
    return out


@dataclass
class RecordingReporter:
    """Keeps every report and log line a context sends, in order."""

    reports: list[tuple[DeployStatus, int, str, str]] = field(default_factory=list)
    logs: list[LogLine] = field(default_factory=list)

    def report(self, status: DeployStatus, progress: int, stage: str, message: str) -> None:
        """Record one report."""
        self.reports.append((status, progress, stage, message))

    def log(self, line: LogLine) -> None:
        """Record one log line."""
        self.logs.append(line)

    @property
    def statuses(self) -> list[str]:
        """The statuses reported, in order."""
        return [r[0].value for r in self.reports]

    def lines(self, stream: str | None = None) -> list[str]:
        """The log lines' text, optionally only one stream's."""
        return [entry.line for entry in self.logs if stream is None or entry.stream == stream]


def make_context(
    data_dir: Path,
    *,
    command_type: str = "deploy.test",
    params: dict[str, Any] | None = None,
    deploy_id: str | None = None,
    timeout: float = 600.0,
    stages: Sequence[Stage] = (),
    rollback_of: RollbackTarget | None = None,
) -> tuple[DeployContext, RecordingReporter]:
    """A context for one made-up deployment, with a :class:`RecordingReporter`.

    ``stages`` are the deploy type's stages, so ``ctx.report(status, fraction=…)`` maps into
    their progress ranges as it does on a real agent.  ``rollback_of``: the context of a
    ``deploy.rollback`` command undoing that deployment (``command_type`` is then
    ``deploy.rollback``).
    """
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id=deploy_id or f"test-{time.monotonic_ns()}",
        command_type=COMMAND_ROLLBACK if rollback_of is not None else command_type,
        params=params or {},
        expires_at=time.time() + timeout,
        rollback_of=rollback_of,
    )
    return DeployContext(
        command=command,
        reporter=reporter,
        data_dir=data_dir,
        stage_of=lambda status: find_stage(stages, status),
    ), reporter


def rollback_request(
    ctx: PluginContext,
    params_model: type[ParamsT],
    options: OptionsT,
    state: RollbackState | None = None,
    *,
    reason: str | None = None,
) -> RollbackRequest[ParamsT, OptionsT]:
    """The :class:`~deploy_core.plugin.RollbackRequest` the agent hands a rollback strategy
    for the deployment of ``ctx`` (for a ``deploy.rollback`` command's context: the
    deployment it undoes), its parameters validated with ``params_model`` (the deploy type's
    model), for testing a strategy's ``prepare``, ``rollback`` and ``discard`` on their own.

    :param reason: why it is undone, for ``rollback`` (the agent gives the failure, or
        ``"manual rollback"``).
    """
    target = ctx.command.rollback_of
    deploy_id, command_type, params = (
        (target.deploy_id, target.command_type, target.params)
        if target is not None
        else (ctx.deploy_id, ctx.command_type, ctx.command.params)
    )
    return RollbackRequest(
        deploy_id, command_type, params_model.model_validate(params), options, state, reason
    )


@pytest.fixture
def deploy_context(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[DeployContext, RecordingReporter]]]:
    """Factory: ``ctx, reporter = deploy_context(params={...})``."""

    def factory(**kwargs: Any) -> tuple[DeployContext, RecordingReporter]:
        return make_context(tmp_path / "agent-data", **kwargs)

    yield factory


# --------------------------------------------------------------------------- real processes


def free_port(kind: int = __import__("socket").SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP by default, UDP with SOCK_DGRAM)."""
    import socket

    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DeployCenter:
    """A real server process and real agent processes on loopback, for end-to-end tests.

    Ports are chosen once, so a restarted server comes back where its agents expect it.
    Every wait has a timeout; :meth:`close` kills whatever is left.
    """

    def __init__(
        self, root: Path, *, db_url: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        import socket

        self.root = root
        self.server_dir = root / "server"
        self.db_url = db_url
        self.api_port = free_port()
        self.quic_port = free_port(socket.SOCK_DGRAM)
        self.env = {**__import__("os").environ, **(env or {})}
        self.server_proc: Any = None
        # Extra ``deployctl server`` options, e.g. ["--max-log-bytes", "4096"].
        self.server_args: list[str] = []
        self.agents: dict[str, Any] = {}
        self._api: Any = None

    # ------------------------------------------------------------------ server

    def _spawn(self, args: list[str], log_name: str) -> Any:
        import subprocess
        import sys

        log = open(self.root / log_name, "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "deploy_core.cli", "--log-level", "info", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def start_server(self, timeout: float = 30.0) -> None:
        """Start (or restart) the server and wait until its API answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        args = [
            "server",
            "--state-dir",
            str(self.server_dir),
            "--api-port",
            str(self.api_port),
            "--quic-port",
            str(self.quic_port),
            *self.server_args,
        ]
        if self.db_url:
            args += ["--db", self.db_url]
        self.server_proc = self._spawn(args, "server.log")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.server_proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.server_proc.returncode}: "
                    f"{self.log('server')[-3000:]}"
                )
            try:
                self.api.request("GET", "/api/info")
                return
            except Exception:
                time.sleep(0.1)
        raise TimeoutError(f"server did not answer within {timeout}s: {self.log('server')[-3000:]}")

    def stop_server(self, sig: int | None = None, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM by default, or ``sig``) and wait for it to exit."""
        import signal

        self._stop(self.server_proc, sig or signal.SIGTERM, timeout)
        self.server_proc = None

    @property
    def api(self) -> Any:
        """A :class:`~deploy_core.client.DeployClient` for the server's API."""
        from deploy_core.client import DeployClient

        if self._api is None:
            self.server_dir.mkdir(parents=True, exist_ok=True)
            token_file = self.server_dir / "admin.token"
            end = time.monotonic() + 30
            while not token_file.exists() and time.monotonic() < end:
                time.sleep(0.05)
            self._api = DeployClient(
                f"http://127.0.0.1:{self.api_port}", token_file.read_text().strip(), timeout=60
            )
        return self._api

    # ------------------------------------------------------------------ agents

    def start_agent(
        self,
        client_id: str,
        *,
        join_token_file: Path | None = None,
        wait: bool = True,
        timeout: float = 30.0,
        server_port: int | None = None,
        config: str | None = None,
    ) -> Any:
        """Start (or restart) an agent process; wait until the server lists it connected.

        ``server_port`` points the agent at another UDP port on 127.0.0.1 than the server's,
        e.g. a relay that stands between them (``tests/udp_relay.py`` in the repository).
        ``config`` is the agent's TOML config text (``[constraints]``, ``[services.NAME]``),
        written to ``agent-<id>.toml`` and passed as ``--config``.
        """
        args = [
            "agent",
            "--server",
            f"127.0.0.1:{server_port or self.quic_port}",
            "--client-id",
            client_id,
            "--state-dir",
            str(self.root / f"agent-{client_id}"),
            "--ca",
            str(self.server_dir / "ca.pem"),
            "--join-token-file",
            str(join_token_file or self.server_dir / "join.token"),
        ]
        if config is not None:
            config_file = self.root / f"agent-{client_id}.toml"
            config_file.write_text(config)
            args += ["--config", str(config_file)]
        proc = self._spawn(args, f"agent-{client_id}.log")
        self.agents[client_id] = proc
        if wait:
            self.wait_connected(client_id, timeout=timeout)
        return proc

    def stop_agent(self, client_id: str, sig: int | None = None, timeout: float = 15.0) -> None:
        """Stop an agent (SIGTERM, or ``sig`` such as SIGKILL) and wait for it to exit."""
        import signal

        self._stop(self.agents.pop(client_id, None), sig or signal.SIGTERM, timeout)

    def wait_connected(
        self, client_id: str, *, connected: bool = True, timeout: float = 30.0
    ) -> None:
        """Wait until the server shows the client (dis)connected."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                for client in self.api.clients():
                    if client["client_id"] == client_id and client["connected_here"] == connected:
                        return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError(
            f"client {client_id} not {'connected' if connected else 'gone'} "
            f"after {timeout}s: {self.log('agent-' + client_id)[-3000:]}"
        )

    # ------------------------------------------------------------------ helpers

    def deploy(self, kind: str, client_id: str, **fields: Any) -> str:
        """Start a deployment of type ``deploy.<kind>`` (any loaded type) on ``client_id``
        with the request's other ``fields``; its id.  E.g.
        ``center.deploy("shell", "web-1", script="echo hi")``."""
        body = {"client_id": client_id, **fields}
        deploy_id: str = self.api.deploy(kind, body)["deploy_id"]
        return deploy_id

    def deploy_shell(self, client_id: str, script: str, **fields: Any) -> str:
        """Deprecated until the next minor version: use
        ``deploy("shell", client_id, script=script, ...)``."""
        import warnings

        warnings.warn(
            'DeployCenter.deploy_shell is deprecated: use deploy("shell", client_id, '
            "script=...), which serves every deploy type",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.deploy("shell", client_id, script=script, **fields)

    def wait(self, deploy_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The final record of a deployment (raises TimeoutError)."""
        record: dict[str, Any] = self.api.wait(deploy_id, timeout=timeout)
        return record

    def cli_env(self) -> dict[str, str]:
        """The environment of a ``deployctl`` process pointed at this server: this one's,
        without ``DEPLOY_CENTER_*`` but for the URL and admin token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
        env["DEPLOY_CENTER_URL"] = f"http://127.0.0.1:{self.api_port}"
        env["DEPLOY_CENTER_TOKEN"] = (self.server_dir / "admin.token").read_text().strip()
        return env

    def deployctl(self, *args: str, timeout: float = 300.0) -> Any:
        """Run ``deployctl ARGS`` against this server as a separate process, as an operator
        types it; the :class:`subprocess.CompletedProcess` (text ``stdout``/``stderr``,
        ``returncode``)."""
        import subprocess
        import sys

        return subprocess.run(
            [sys.executable, "-m", "deploy_core.cli", *args],
            capture_output=True,
            text=True,
            env=self.cli_env(),
            timeout=timeout,
            check=False,
        )

    def log(self, name: str) -> str:
        """What a process wrote (``server`` or ``agent-<id>``)."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def _stop(proc: Any, sig: int, timeout: float) -> None:
        import os
        import signal
        import subprocess

        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def close(self) -> None:
        """Stop every process this harness started."""
        import signal

        for client_id in list(self.agents):
            self.stop_agent(client_id, signal.SIGKILL)
        if self.server_proc is not None:
            self.stop_server(signal.SIGKILL)
        if self._api is not None:
            self._api.close()


@pytest.fixture
def deploy_center(tmp_path: Path) -> Iterator[DeployCenter]:
    """A started server (SQLite) with no agents yet; start them with ``start_agent``."""
    center = DeployCenter(tmp_path / "center")
    try:
        center.start_server()
        yield center
    finally:
        center.close()


# --------------------------------------------------------------------------- in one process


class MemoryCredentials:
    """An agent's credential store (``deploy_core.transport.client.CredentialStore``) in
    memory: a shared ``key`` and/or a join ``token`` to start with, and the key pair it makes
    when it enrols."""

    def __init__(self, key: bytes | None = None, token: str | None = None) -> None:
        self.key = key
        self.token = token
        self.identity: Any = None  # an Ed25519PrivateKey once made

    def load_identity(self) -> Any:
        return self.identity

    def create_identity(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.identity = Ed25519PrivateKey.generate()
        return self.identity

    def load_key(self) -> bytes | None:
        return self.key

    def save_key(self, key: bytes) -> None:
        self.key = key

    def drop_key(self) -> None:
        self.key = None

    def join_token(self) -> str | None:
        return self.token


def connector_for(
    port: int, ca_file: Path, client_id: str, *, token: str = "join-secret", **options: Any
) -> Any:
    """An :class:`~deploy_core.transport.AgentConnector` (not started) to a QUIC server on
    loopback ``port`` whose CA is ``ca_file``, enrolling with ``token`` from a
    :class:`MemoryCredentials`, with no capabilities, ignoring messages, and quick to retry
    (``options`` replace any of its arguments)."""
    from deploy_core.transport import AgentConnector

    async def ignore(*_args: Any) -> None:
        return None

    arguments: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "ca_file": ca_file,
        "client_id": client_id,
        "credentials": MemoryCredentials(token=token),
        "capabilities": dict,
        "on_message": ignore,
        "heartbeat_interval": 1.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "connect_timeout": 3.0,
    }
    return AgentConnector(**(arguments | options))


def agent_for(server: Any, client_id: str, state_dir: Path, **config: Any) -> Any:
    """An :class:`~deploy_core.agent.runtime.Agent` (not started) of ``server`` (a running
    :class:`~deploy_core.server.app.DeployServer`): its QUIC port, CA and join token;
    ``config`` adds :class:`~deploy_core.agent.runtime.AgentConfig` fields (``plugins=`` goes
    to the agent)."""
    from deploy_core.agent.runtime import Agent, AgentConfig

    plugins = config.pop("plugins", None)
    return Agent(
        AgentConfig(
            server_host="127.0.0.1",
            server_port=server.transport.port,
            client_id=client_id,
            state_dir=state_dir,
            ca_file=server.state.certs.ca_cert,
            join_token_file=server.state.join_token_file,
            **config,
        ),
        plugins=plugins,
    )


@dataclass
class InProcessCenter:
    """A server and one agent running in the test's own event loop (see
    :func:`in_process_center`): reach into either, and call the API with ``http``."""

    server: Any
    agent: Any
    http: Any


@asynccontextmanager
async def in_process_center(
    root: Path,
    plugins: Any,
    *,
    client_id: str = "web-1",
    services: dict[str, Any] | None = None,
) -> AsyncIterator[InProcessCenter]:
    """Start a :class:`~deploy_core.server.app.DeployServer` (SQLite, ports chosen by the
    system) and an :class:`~deploy_core.agent.runtime.Agent` sharing ``plugins``, wait until
    the agent is connected, and stop both on exit.  ``http`` is an ``httpx.AsyncClient`` on
    the API with the admin token."""
    import asyncio

    import httpx

    from deploy_core.server.app import DeployServer, ServerConfig

    server = DeployServer(
        ServerConfig(state_dir=root / "server", api_port=0, quic_port=0), plugins=plugins
    )
    await server.start()
    agent = agent_for(server, client_id, root / "agent", services=services or {}, plugins=plugins)
    task = asyncio.create_task(agent.run())
    http = httpx.AsyncClient(
        base_url=server.api_url,
        headers={"Authorization": f"Bearer {server.state.admin_token}"},
        timeout=60,
    )
    try:
        if not await agent.connector.wait_connected(15):
            raise TimeoutError(f"agent {client_id} did not connect: {agent.connector.last_error}")
        yield InProcessCenter(server, agent, http)
    finally:
        await http.aclose()
        await agent.stop()
        await asyncio.wait_for(task, 15)
        await server.stop()

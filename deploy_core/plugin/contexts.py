"""What the core hands a plugin's code, as typed protocols.

The core's own classes implement them (``deploy_core.agent.context.DeployContext``, the
server's :class:`~deploy_core.server.services.PluginServices` …); a plugin types its code
against these, so the core may rearrange its classes without breaking a plugin, and mypy
checks that the core still gives a plugin everything listed here.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

from deploy_core.models import DeployCommand, DeployStatus

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Engine
    from starlette.requests import Request

__all__ = [
    "AgentServiceContext",
    "DeployContext",
    "EventContext",
    "FetchedArtifact",
    "PathAccess",
    "ProcessResult",
    "RunAsUser",
    "ScriptConstraints",
    "ServerServices",
    "server_services",
]

P = ParamSpec("P")
R = TypeVar("R")

#: What a plugin is about to do with a path, for :meth:`DeployContext.check_path`.
PathAccess = Literal["read", "write", "replace"]


# --------------------------------------------------------------------------- agent side


class ProcessResult(Protocol):
    """What a finished (or killed) script or command left behind
    (:meth:`DeployContext.run`, :meth:`DeployContext.run_script`)."""

    @property
    def exit_code(self) -> int | None:
        """The exit status; ``None`` when it was killed (timeout)."""

    @property
    def stdout_tail(self) -> str:
        """The last part of its standard output."""

    @property
    def stderr_tail(self) -> str:
        """The last part of its standard error (with the agent's note when a limit hit)."""

    @property
    def duration(self) -> float:
        """Seconds it ran."""

    @property
    def timed_out(self) -> bool:
        """It was killed at its timeout or the deployment's deadline."""

    @property
    def truncated(self) -> bool:
        """Its output was more than the agent streams; the middle was left out."""

    @property
    def limit_hit(self) -> str | None:
        """Which resource limit explains its end (memory, processes …), else ``None``."""

    def timeout_text(self) -> str:
        """How it was stopped, naming the limit that fired (``timed out after 30 s``)."""


class FetchedArtifact(Protocol):
    """An artifact from the server's store, verified, as :meth:`DeployContext.fetch_artifact`
    returns it.  ``path`` is the agent's cached copy: read it, never change, move or
    delete it."""

    @property
    def path(self) -> Path:
        """The cached, verified file."""

    @property
    def sha256(self) -> str:
        """Its SHA-256 (64 hex digits)."""

    @property
    def size(self) -> int:
        """Its size in bytes."""

    @property
    def bytes_transferred(self) -> int:
        """Bytes received from the server by this fetch (all attempts together)."""

    @property
    def bytes_resumed(self) -> int:
        """Bytes an interrupted earlier fetch had left, so not sent again."""

    @property
    def from_cache(self) -> bool:
        """The verified copy was already cached: nothing was transferred."""


class RunAsUser(Protocol):
    """The user scripts run as (the agent's ``run_as`` constraint)."""

    @property
    def name(self) -> str:
        """The user's name."""

    @property
    def uid(self) -> int:
        """The user's id."""

    @property
    def gid(self) -> int:
        """The user's primary group id."""


class ScriptConstraints(Protocol):
    """The agent's constraints as a plugin may read them (scripts are checked and run under
    them by :meth:`DeployContext.run_script`; paths by :meth:`DeployContext.check_path`)."""

    @property
    def switch_to(self) -> RunAsUser | None:
        """The user scripts run as when it is not the agent's own user, else ``None``: a
        plugin that creates files for scripts gives them to this user."""


class DeployContext(Protocol):
    """One deployment (or rollback, or health check) as the plugin code carrying it out sees
    it: executors, probes and rollback strategies receive one.

    Report stages with :meth:`report`, send output with :meth:`log`, run scripts with
    :meth:`run_script` (which applies the timeout, the process-group kill, the output bound
    and the agent's constraints), check a path with :meth:`check_path` before working on it
    as root.
    """

    @property
    def deploy_id(self) -> str:
        """The deployment's id."""

    @property
    def command_type(self) -> str:
        """What is being done: the deploy type's name, or ``deploy.rollback``."""

    @property
    def command(self) -> DeployCommand:
        """The command as the server sent it (``params``, ``rollback``, ``health_checks`` …)."""

    @property
    def deadline(self) -> float:
        """When the deployment must be over (seconds since the epoch)."""

    @property
    def data_dir(self) -> Path:
        """The agent's data directory; a plugin keeps its own state in a subdirectory."""

    @property
    def secret_env(self) -> dict[str, str]:
        """The deployment's secret variables (scripts get them; logs show them masked)."""

    @property
    def constraints(self) -> ScriptConstraints:
        """The agent's constraints (read :attr:`ScriptConstraints.switch_to`)."""

    @property
    def progress(self) -> int:
        """The last progress reported (0-100)."""

    def report(
        self,
        status: DeployStatus | str,
        *,
        fraction: float | None = None,
        progress: int | None = None,
        stage: str | None = None,
        message: str = "",
    ) -> None:
        """Report a status (and stage) with progress: ``fraction`` (0.0-1.0) places it inside
        the range the deploy type registered for ``status``; ``progress`` sets it outright.
        Progress never goes down."""

    def log(self, line: str, *, stream: str = "stdout") -> None:
        """Send one line of output to the server, tagged with the current stage (secret
        values masked)."""

    def mask(self, text: str) -> str:
        """``text`` with every secret value of the deployment replaced by ``***``."""

    def mask_data(self, data: Any) -> Any:
        """:meth:`mask` applied to every string inside JSON-like ``data``."""

    async def fetch_artifact(
        self, sha256: str, *, progress: Callable[[int, int], None] | None = None
    ) -> FetchedArtifact:
        """An artifact of the server's store by SHA-256, verified; a cached copy is used
        without a transfer.  Raises :class:`~deploy_core.plugin.DeployFailed` when it is
        unknown or does not arrive before the deadline."""

    def check_path(
        self, path: str | os.PathLike[str], purpose: str, *, access: PathAccess = "write"
    ) -> Path:
        """The resolved ``path`` a plugin is about to work on as root, for ``purpose`` (for
        messages: ``"tar target_dir"``); raises :class:`~deploy_core.plugin.DeployFailed`
        naming the rule when the agent's constraints refuse it."""

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The settings the agent's operator gave plugin ``name`` (``[plugins.NAME]`` of
        ``deployctl agent --config``; empty when none): the agent-side counterpart of
        :meth:`ServerServices.plugin_config`. Validate it: it is operator input."""

    def script_env(
        self, extra: Mapping[str, str] | None = None, *, run_as: bool = True
    ) -> dict[str, str]:
        """The environment scripts get: a few safe variables of the agent's, the
        deployment's identity, then ``extra``, then the deployment's secret variables."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stream_prefix: str = "",
    ) -> ProcessResult:
        """Run the plugin's own command ``argv`` with a timeout (never past the deadline),
        logging every output line.  Of the constraints only ``workdir_roots`` applies."""

    async def run_script(
        self,
        script: str,
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "script",
        stream_prefix: str = "",
    ) -> ProcessResult:
        """Run an operator's ``script`` (by its ``#!`` line, else ``/bin/sh``) under every
        constraint: a refusal raises :class:`~deploy_core.plugin.DeployFailed` before
        anything runs."""


class AgentServiceContext(Protocol):
    """What an agent service (a long-running plugin task started with the agent) is handed."""

    @property
    def client_id(self) -> str:
        """The agent's client id."""

    @property
    def data_dir(self) -> Path:
        """The agent's data directory."""

    @property
    def config(self) -> dict[str, Any]:
        """The service's settings from the agent's configuration (empty when none)."""

    @property
    def send_event(self) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        """``await send_event(name, payload)``: queue an event for the server (kept across
        reconnects until the server acknowledges it)."""


# --------------------------------------------------------------------------- server side


class ServerServices(Protocol):
    """What a server-side plugin may use of the server: event handlers get it as
    :attr:`EventContext.services`, routes through :func:`server_services`, a deploy type's
    ``server_check`` as its first argument."""

    @property
    def engine(self) -> Engine:
        """The server's SQLAlchemy engine: use it for the plugin's own tables only."""

    @property
    def metadata(self) -> MetaData:
        """The metadata the plugins' tables were defined on (``deploy_register_tables``)."""

    async def db(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking (database) call in a worker thread and return its result."""

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The settings an operator gave plugin ``name`` (``[plugins.NAME]`` of the server's
        ``--config``; empty when none)."""

    async def client_exists(self, client_id: str) -> bool:
        """Whether an agent with this client id is enrolled."""

    async def artifact_exists(self, sha256: str) -> bool:
        """Whether the server's artifact store holds this artifact."""


class EventContext(Protocol):
    """One agent event as an event handler sees it."""

    @property
    def client_id(self) -> str:
        """The sending agent's client id (authenticated by the transport)."""

    @property
    def name(self) -> str:
        """The event's name, e.g. ``docker.monitor``."""

    @property
    def event_id(self) -> str:
        """The event's id, the same each time the agent sends it again (delivery is at least
        once: a handler that must not count an event twice keys on it)."""

    @property
    def payload(self) -> dict[str, Any]:
        """The event's payload, not yet validated: the handler validates it."""

    @property
    def services(self) -> ServerServices:
        """The server's services."""


def server_services(request: Request) -> ServerServices:
    """The :class:`ServerServices` of the server handling ``request`` (in a plugin's route).

    :raises RuntimeError: the request is not served by a Deploy Center server.
    """
    services: ServerServices | None = getattr(request.app.state, "plugin_services", None)
    if services is None:
        raise RuntimeError(
            "this request is not served by a Deploy Center server (no plugin_services on "
            "the app's state); mount plugin routes with deploy_register_routes"
        )
    return services

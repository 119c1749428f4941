"""An agent is not a server (issue 12 item 6): a real ``deployctl agent`` with ``deploy_shell``
and ``deploy_tar``, connected to a real server, runs a shell and a tar deployment without
importing the server's packages or modules (the QUIC server endpoint included), nor the
plugins' server or CLI code; and it imports ``deploy_tar``'s extraction code (and
:mod:`tarfile`) only when a tar deployment arrives.

What the agent imported is read from the process itself: it runs with
``PYTHONPROFILEIMPORTTIME=1``, so Python reports every module it imports, for the process's
whole life, on its stderr (the agent's log here); and ``/proc/PID/maps`` shows no file of
those packages mapped into it.  No hook in the agent is needed for either.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core import hookimpl
from deploy_core.cli.groups import LAZY_COMMAND_MODULES
from deploy_core.plugins import PluginError, load_plugins
from deploy_core.registry import AgentService, EventHandler, RouteSet
from deploy_core.testing import DeployCenter

SERVER_PACKAGES = ("starlette", "uvicorn", "sqlalchemy", "alembic", "httpx", "docker")
AGENT = "lean-1"
# What deploy_tar's deployment and rollback code brings, imported at the first deploy.tar.
TAR_CODE = {"deploy_tar.deploy", "deploy_tar.rollback", "deploy_tar.extract", "tarfile"}


def imported_modules(log: str) -> set[str]:
    """The modules a process started with ``PYTHONPROFILEIMPORTTIME=1`` reported importing."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    } - {"package"}  # the report's header line


def mapped_files(pid: int) -> set[str]:
    """Files mapped into process ``pid`` (shared libraries, extension modules)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {fields[5] for line in maps if len(fields := line.split(None, 5)) == 6}


def package(path: Path) -> Path:
    """A tar.gz release with one file and no install script."""
    with tarfile.open(path, "w:gz") as tar:
        data = b"lean 1\n"
        info = tarfile.TarInfo("version")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_a_real_agent_with_shell_and_tar_imports_nothing_of_the_server(tmp_path: Path) -> None:
    for plugin in ("deploy_shell", "deploy_tar"):
        try:
            __import__(plugin)
        except ImportError:
            missing_part(f"the {plugin} plugin is not installed")
    center = DeployCenter(tmp_path / "center")
    try:
        center.start_server()
        center.env = {
            **center.env,
            "PYTHONPROFILEIMPORTTIME": "1",
            "DEPLOY_CORE_PLUGINS": "deploy_shell,deploy_tar",
        }
        center.env.pop("DEPLOY_CORE_DISABLE_PLUGINS", None)
        proc = center.start_agent(AGENT)
        shell = center.wait(center.deploy("shell", AGENT, script="echo lean"))
        assert shell["status"] == "success", shell
        # Connected, one shell deployment done, no tar deployment yet.
        before_tar = imported_modules(center.log(f"agent-{AGENT}"))
        sha = center.api.upload_artifact(package(tmp_path / "lean.tar.gz"))["sha256"]
        target = tmp_path / "app"
        body = {"client_id": AGENT, "artifact": sha, "target_dir": str(target)}
        tar = center.wait(center.api.deploy("tar", body)["deploy_id"])
        assert tar["status"] == "success", tar
        assert (target / "current" / "version").read_text() == "lean 1\n"

        files = mapped_files(proc.pid)
        modules = imported_modules(center.log(f"agent-{AGENT}"))
    finally:
        center.close()

    # The report is real: it names what an agent must have imported.
    assert {"deploy_core.agent.runtime", "aioquic", "deploy_tar.deploy"} <= modules
    assert any("python3" in f or "libpython" in f for f in files)

    heavy = sorted(m for m in modules if m.split(".")[0] in SERVER_PACKAGES)
    assert heavy == [], f"the agent imported server packages: {heavy}"
    server = sorted(
        m
        for m in modules
        if m.startswith("deploy_core.server") or m == "deploy_core.transport.server"
    )
    assert server == [], f"the agent imported server modules: {server}"
    # The tar code came with the tar deployment, not before (the plugin's registration
    # imports only its parameter and result models).
    assert {"deploy_tar.params", "deploy_core.agent.runtime"} <= before_tar
    early = sorted(before_tar & TAR_CODE)
    assert early == [], f"the agent imported deploy_tar's code before a tar deployment: {early}"
    assert modules >= TAR_CODE, sorted(TAR_CODE - modules)
    cli_only = sorted(
        m
        for m in modules
        if m.split(".")[0] in ("deploy_shell", "deploy_tar") and "cli" in m.split(".")[1:]
    )
    assert cli_only == [], f"the agent imported a plugin's CLI: {cli_only}"
    # Nor the core's other commands (loaded only when another command is asked for).
    commands = sorted(modules & {*LAZY_COMMAND_MODULES, "deploy_core.cli.server_command"})
    assert commands == [], f"the agent imported other deployctl commands: {commands}"
    held = sorted(
        f for f in files if any(f"{os.sep}{name}{os.sep}" in f for name in SERVER_PACKAGES)
    )
    assert held == [], f"files of server packages mapped into the agent: {held}"


class ServerSidePlugin:
    """Registers an agent service and, on the server side, one of each server-side thing;
    remembers which of its hooks were called."""

    def __init__(self) -> None:
        self.called: list[str] = []

    @hookimpl
    def deploy_agent_services(self, register: Callable[[AgentService], None]) -> None:
        self.called.append("deploy_agent_services")

        async def run(ctx: object) -> None:
            return None

        register(AgentService("sampler", run))

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        self.called.append("deploy_register_event_handlers")

    @hookimpl
    def deploy_register_routes(self, register: Callable[[RouteSet], None]) -> None:
        self.called.append("deploy_register_routes")

    @hookimpl
    def deploy_register_cli_commands(self, register: Callable[..., None]) -> None:
        self.called.append("deploy_register_cli_commands")


def test_agent_side_loading_calls_only_the_hooks_an_agent_runs() -> None:
    plugin = ServerSidePlugin()
    plugins = load_plugins(extra=[("both", plugin)], entry_points=False, agent_only=True)
    assert plugin.called == ["deploy_agent_services"]
    assert plugins.agent_services.names() == ["sampler"]
    assert plugins.event_handlers.entries == {}, "not even the core's own server handlers"
    assert plugins.route_sets.entries == {} and plugins.cli_commands.entries == {}
    with pytest.raises(PluginError, match="agent side define no tables"):
        plugins.create_tables(object())  # type: ignore[arg-type]

    full = ServerSidePlugin()
    load_plugins(extra=[("both", full)], entry_points=False)
    assert sorted(full.called) == [
        "deploy_agent_services",
        "deploy_register_cli_commands",
        "deploy_register_event_handlers",
        "deploy_register_routes",
    ]


def test_every_core_command_module_is_loaded_eagerly_or_lazily() -> None:
    """A new module of ``deployctl`` commands must be listed in ``LAZY_COMMAND_MODULES`` (or
    imported by ``deploy_core.cli``): otherwise its commands would silently be missing."""
    import deploy_core.cli as cli

    folder = Path(cli.__file__).parent
    registering = {
        f"deploy_core.cli.{path.stem}"
        for path in folder.glob("*.py")
        if any(
            marker in path.read_text()
            for marker in ("@main.", "@deploy.", "main.add_command", "deploy.add_command")
        )
    }
    registering -= {"deploy_core.cli.groups", "deploy_core.cli.processes"}  # imported eagerly
    assert registering, "the scan found no command module"
    assert registering <= set(LAZY_COMMAND_MODULES), sorted(registering - set(LAZY_COMMAND_MODULES))

"""The plugin manager: discovery through entry points, the registries, the errors a broken
plugin gets, notifications, what ``deployctl plugins`` shows, and every hook driven by a real
server and agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import sqlalchemy as sa
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from deploy_core import hookimpl
from deploy_core.agent.context import AgentServiceContext, DeployContext
from deploy_core.plugins import DEFAULT_PLUGINS, DeployPlugins, PluginError, load_plugins
from deploy_core.registry import (
    AgentService,
    DeployParams,
    DeployType,
    EventHandler,
    HealthCheckParams,
    HealthCheckType,
    RegistrationError,
    RollbackParams,
    RollbackRequest,
    RollbackStrategy,
    RouteSet,
    Stage,
)
from deploy_core.server import db as server_db
from deploy_core.server.app import DeployServer
from deploy_core.server.events import EventContext
from deploy_core.server.http.web import ApiError
from deploy_core.testing import in_process_center

BUILTIN = "deploy_core.server.handlers"
INSTALLED = {"deploy_shell", "health_checks", "rollback_basic"}

# --------------------------------------------------------------------------- test plugins


class NoopParams(DeployParams):
    """Parameters of the test deploy type."""

    message: str = "done"


class NoopResult(BaseModel):
    """Result of the test deploy type."""

    message: str


async def run_noop(ctx: DeployContext, params: NoopParams) -> NoopResult:
    ctx.report("executing", fraction=1.0, message="working")
    ctx.log(params.message)
    return NoopResult(message=params.message)


async def probe_always(params: HealthCheckParams, ctx: DeployContext) -> str | None:
    return None


async def undo_nothing(ctx: DeployContext, request: RollbackRequest[Any, Any]) -> None:
    return None


async def old_style_undo(ctx: DeployContext, params: RollbackParams, state: Any) -> None:
    return None


def noop_type(name: str = "deploy.noop") -> DeployType:
    return DeployType(
        name=name,
        params=NoopParams,
        executor=run_noop,
        stages=(Stage("executing", 0, 90),),
    )


class DeployTypePlugin:
    """Registers one deploy type under a given name."""

    def __init__(self, name: str = "deploy.noop") -> None:
        self.name = name

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        register(noop_type(self.name))


class EverythingPlugin:
    """Registers one of everything, so describe() has something in every column."""

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        register(noop_type())

    @hookimpl
    def deploy_register_health_checks(self, register: Callable[[HealthCheckType], None]) -> None:
        register(HealthCheckType("always", HealthCheckParams, probe_always))

    @hookimpl
    def deploy_register_rollback_strategies(
        self, register: Callable[[RollbackStrategy], None]
    ) -> None:
        register(RollbackStrategy("nothing", RollbackParams, undo_nothing))

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        async def handle(ctx: EventContext) -> None:
            return None

        register(EventHandler("everything.seen", handle))

    @hookimpl
    def deploy_register_routes(self, register: Callable[[RouteSet], None]) -> None:
        register(RouteSet("everything", ()))

    @hookimpl
    def deploy_agent_services(self, register: Callable[[AgentService], None]) -> None:
        async def run(ctx: AgentServiceContext) -> None:
            return None

        register(AgentService("sampler", run))

    @hookimpl
    def deploy_register_cli_commands(self, register: Callable[[click.Command], None]) -> None:
        register(click.Command("everything-status"))


# --------------------------------------------------------------------------- built-ins


def test_builtin_handlers_come_through_the_hook_and_are_marked_builtin() -> None:
    plugins = load_plugins(entry_points=False)
    assert BUILTIN in DEFAULT_PLUGINS
    impls = plugins.pm.hook.deploy_register_event_handlers.get_hookimpls()
    assert BUILTIN in [impl.plugin_name for impl in impls]
    assert plugins.event_handlers.owners == {
        "deploy.status": BUILTIN,
        "command.callback": BUILTIN,
    }
    (entry,) = [p for p in plugins.describe() if p["name"] == BUILTIN]
    assert entry["builtin"] is True
    assert entry["hooks"] == ["deploy_register_event_handlers"]
    assert entry["event_handlers"] == ["command.callback", "deploy.status"]


def test_a_third_party_plugin_is_not_builtin() -> None:
    plugins = load_plugins(extra=[("noop", DeployTypePlugin())], entry_points=False)
    (entry,) = [p for p in plugins.describe() if p["name"] == "noop"]
    assert entry["builtin"] is False


# --------------------------------------------------------------------------- bad plugins


def test_duplicate_deploy_type_names_both_plugins() -> None:
    with pytest.raises(PluginError) as err:
        load_plugins(
            extra=[("alpha", DeployTypePlugin()), ("beta", DeployTypePlugin())],
            entry_points=False,
        )
    message = str(err.value)
    assert "deploy.noop" in message
    assert "'alpha'" in message and "'beta'" in message
    assert "DEPLOY_CORE_DISABLE_PLUGINS" in message


def test_duplicate_of_an_installed_deploy_type_names_the_installed_plugin() -> None:
    with pytest.raises(PluginError, match=r"'deploy_shell'.*'impostor'"):
        load_plugins(
            extra=[("impostor", DeployTypePlugin("deploy.shell"))],
            env={"DEPLOY_CORE_PLUGINS": "deploy_shell"},
        )


def test_registering_the_wrong_type_names_the_plugin_and_the_expected_type() -> None:
    class WrongType:
        @hookimpl
        def deploy_register_deploy_types(self, register: Callable[[Any], None]) -> None:
            register(HealthCheckType("http", HealthCheckParams, probe_always))

    with pytest.raises(PluginError) as err:
        load_plugins(extra=[("wrong", WrongType())], entry_points=False)
    message = str(err.value)
    assert "'wrong'" in message
    assert "HealthCheckType" in message and "expected DeployType" in message


def test_an_exception_inside_a_registration_hook_names_the_plugin() -> None:
    class Crashing:
        @hookimpl
        def deploy_register_health_checks(self, register: Callable[[Any], None]) -> None:
            raise KeyError("oops")

    with pytest.raises(PluginError, match="plugin 'crashing' failed in deploy_register_health"):
        load_plugins(extra=[("crashing", Crashing())], entry_points=False)


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: noop_type("Deploy.Noop"), "deploy.kind"),
        (lambda: noop_type("noop"), "deploy.kind"),
        (lambda: DeployType("deploy.x", BaseModel, run_noop), "subclass DeployParams"),  # type: ignore[arg-type]
        (lambda: DeployType("deploy.x", NoopParams, "run"), "not callable"),  # type: ignore[arg-type]
        (lambda: DeployType("deploy.x", NoopParams, run_noop, result=dict), "pydantic model"),  # type: ignore[arg-type]
        (lambda: Stage("executing", 50, 10), "not within 0-100"),
        (lambda: Stage("executing", 0, 101), "not within 0-100"),
        (lambda: HealthCheckType("HTTP", HealthCheckParams, probe_always), "lower-case word"),
        (lambda: HealthCheckType("http", NoopParams, probe_always), "HealthCheckParams"),  # type: ignore[arg-type]
        (
            lambda: HealthCheckType("x", HealthCheckParams, probe_always, shorthand=lambda t: {}),
            "shorthand_usage",
        ),
        (lambda: RollbackStrategy("re-run", RollbackParams, undo_nothing), "lower-case word"),
        (lambda: RollbackStrategy("x", NoopParams, undo_nothing), "RollbackParams"),  # type: ignore[arg-type]
        (lambda: RollbackStrategy("none", RollbackParams, undo_nothing), "reserved"),
        (
            lambda: RollbackStrategy("old", RollbackParams, old_style_undo),  # type: ignore[arg-type]
            r"rollback takes \(ctx, params, state\), the signature before 0.2",
        ),
        (
            lambda: DeployType("deploy.x", NoopParams, run_noop, default_rollback="Re-Run"),
            "not a rollback strategy name",
        ),
        (
            lambda: DeployType("deploy.x", NoopParams, run_noop, default_rollback_params={"a": 1}),
            "without a default_rollback",
        ),
        (lambda: EventHandler("monitor", undo_nothing), "family.name"),  # type: ignore[arg-type]
        (lambda: AgentService("Docker Sampler", undo_nothing), "lower-case word"),  # type: ignore[arg-type]
    ],
)
def test_malformed_registrations_fail_at_construction(
    build: Callable[[], object], words: str
) -> None:
    with pytest.raises(RegistrationError, match=words):
        build()


def test_a_misspelled_hookimpl_fails_check_pending() -> None:
    class Misspelled:
        @hookimpl
        def deploy_register_deploy_typez(self, register: Callable[[Any], None]) -> None:
            raise AssertionError("never called")

    with pytest.raises(PluginError, match=r"plugin 'typo'.*deploy_register_deploy_typez"):
        load_plugins(extra=[("typo", Misspelled())], entry_points=False)


def test_two_deploy_types_with_one_api_route_are_refused() -> None:
    def executor(ctx: Any, params: Any) -> Any:
        raise AssertionError("never called")

    def plugin(family: str) -> object:
        class P:
            @hookimpl
            def deploy_register_deploy_types(self, register: Callable[[Any], None]) -> None:
                register(DeployType(name=f"{family}.file", params=DeployParams, executor=executor))

        return P()

    with pytest.raises(PluginError, match="share the API route /api/deploy/file"):
        load_plugins(extra=[("a", plugin("deploy")), ("b", plugin("acme"))], entry_points=False)


def test_an_entry_point_that_fails_to_import_is_skipped_and_listed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_entry_points = metadata.entry_points
    broken = metadata.EntryPoint(
        name="broken", value="deploy_core_no_such_module.plugin", group="deploy_core"
    )

    def entry_points(**kwargs: Any) -> list[metadata.EntryPoint]:
        return [*real_entry_points(**kwargs), broken]

    # The one mock here: an entry point whose module does not exist, beside the real ones.
    monkeypatch.setattr("deploy_core.plugins.metadata.entry_points", entry_points)
    with caplog.at_level(logging.WARNING, logger="deploy_core.plugins"):
        plugins = load_plugins(env={})
    assert "ModuleNotFoundError" in plugins.failed["broken"]
    assert "deploy_core_no_such_module" in plugins.failed["broken"]
    assert {"name": "broken", "error": plugins.failed["broken"]} in plugins.describe()
    assert "plugin broken failed to load" in caplog.text
    assert plugins.pm.get_plugin("broken") is None
    assert set(plugins.versions) >= INSTALLED, "the healthy plugins still load"
    assert "deploy.shell" in plugins.deploy_types


def test_an_entry_point_filtered_out_is_never_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint(
        name="broken", value="deploy_core_no_such_module.plugin", group="deploy_core"
    )
    real_entry_points = metadata.entry_points
    monkeypatch.setattr(
        "deploy_core.plugins.metadata.entry_points",
        lambda **kwargs: [*real_entry_points(**kwargs), broken],
    )
    assert load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"}).failed == {}
    assert "broken" not in load_plugins(env={"DEPLOY_CORE_DISABLE_PLUGINS": "broken"}).failed


# --------------------------------------------------------------------------- discovery


def _loaded(plugins: DeployPlugins) -> set[str]:
    return {name for name, plugin in plugins.pm.list_name_plugin() if plugin is not None}


def test_installed_plugins_are_found_through_entry_points() -> None:
    plugins = load_plugins(env={})
    assert INSTALLED | {BUILTIN} <= _loaded(plugins)
    assert plugins.deploy_types.owners["deploy.shell"] == "deploy_shell"
    assert {"http", "tcp", "script"} <= set(plugins.health_checks.names())
    assert {"inline", "script", "snapshot"} <= set(plugins.rollback_strategies.names())
    assert plugins.versions["deploy_shell"] == metadata.version("deploy-shell")


def test_only_list_loads_just_the_named_entry_points() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": " deploy_shell , health_checks "})
    assert _loaded(plugins) == {BUILTIN, "deploy_shell", "health_checks"}
    assert plugins.rollback_strategies.names() == []


def test_disable_list_blocks_entry_points() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_DISABLE_PLUGINS": "deploy_shell,rollback_basic"})
    loaded = _loaded(plugins)
    assert "deploy_shell" not in loaded and "rollback_basic" not in loaded
    assert "health_checks" in loaded
    assert "deploy.shell" not in plugins.deploy_types


def test_disable_wins_over_only_and_builtins_cannot_be_disabled() -> None:
    plugins = load_plugins(
        env={
            "DEPLOY_CORE_PLUGINS": "deploy_shell,health_checks",
            "DEPLOY_CORE_DISABLE_PLUGINS": f"health_checks,{BUILTIN}",
        }
    )
    assert _loaded(plugins) == {BUILTIN, "deploy_shell"}


def test_empty_lists_mean_no_filter() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": " ", "DEPLOY_CORE_DISABLE_PLUGINS": ""})
    assert _loaded(plugins) >= INSTALLED


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_CORE_PLUGINS", "rollback_basic")
    monkeypatch.delenv("DEPLOY_CORE_DISABLE_PLUGINS", raising=False)
    assert _loaded(load_plugins()) == {BUILTIN, "rollback_basic"}


# --------------------------------------------------------------------------- notifications


class Notes:
    """A lifecycle plugin that remembers what it was told (or fails, if asked to)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.changes: list[tuple[str, str | None]] = []
        self.finished: list[dict[str, Any]] = []

    @hookimpl
    def deploy_status_changed(self, record: dict[str, Any], previous: str | None) -> None:
        if self.fail:
            raise RuntimeError("notifier is down")
        self.changes.append((record["status"], previous))

    @hookimpl
    def deploy_finished(self, record: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("notifier is down")
        self.finished.append(record)


@pytest.mark.parametrize(
    ("hook", "kwargs"),
    [
        ("deploy_status_changed", {"record": {"status": "executing"}, "previous": "pending"}),
        ("deploy_finished", {"record": {"status": "success"}}),
    ],
)
def test_a_failing_notification_is_logged_with_its_plugin_and_the_others_still_run(
    hook: str, kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = Notes(), Notes()
    plugins = load_plugins(
        extra=[("first", first), ("boom", Notes(fail=True)), ("second", second)],
        entry_points=False,
    )
    with caplog.at_level(logging.ERROR, logger="deploy_core.plugins"):
        plugins.notify(hook, **kwargs)
    assert f"plugin boom failed in {hook}" in caplog.text
    assert "notifier is down" in caplog.text
    told = [n.changes if hook == "deploy_status_changed" else n.finished for n in (first, second)]
    assert all(len(t) == 1 for t in told)


def test_a_notification_impl_may_take_fewer_arguments() -> None:
    seen: list[dict[str, Any]] = []

    class RecordOnly:
        @hookimpl
        def deploy_status_changed(self, record: dict[str, Any]) -> None:
            seen.append(record)

    plugins = load_plugins(extra=[("record_only", RecordOnly())], entry_points=False)
    plugins.notify("deploy_status_changed", record={"status": "pending"}, previous=None)
    assert seen == [{"status": "pending"}]


# --------------------------------------------------------------------------- description


def test_describe_lists_hooks_and_registrations() -> None:
    plugins = load_plugins(extra=[("everything", EverythingPlugin())], entry_points=False)
    (entry,) = [p for p in plugins.describe() if p["name"] == "everything"]
    assert entry == {
        "name": "everything",
        "version": "",
        "builtin": False,
        "hooks": [
            "deploy_agent_services",
            "deploy_register_cli_commands",
            "deploy_register_deploy_types",
            "deploy_register_event_handlers",
            "deploy_register_health_checks",
            "deploy_register_rollback_strategies",
            "deploy_register_routes",
        ],
        "deploy_types": ["deploy.noop"],
        "health_checks": ["always"],
        "rollback_strategies": ["nothing"],
        "event_handlers": ["everything.seen"],
        "routes": ["everything"],
        "agent_services": ["sampler"],
        "cli_commands": ["everything-status"],
    }
    assert [p["name"] for p in plugins.describe()] == sorted([BUILTIN, "everything"])


def test_describe_shows_installed_versions() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    (entry,) = [p for p in plugins.describe() if p["name"] == "deploy_shell"]
    assert entry["version"] == metadata.version("deploy-shell")
    assert entry["hooks"] == ["deploy_register_cli_commands", "deploy_register_deploy_types"]
    assert entry["deploy_types"] == ["deploy.shell"]
    assert entry["cli_commands"] == ["deploy shell"]


def test_capabilities_list_what_plugins_provide_without_builtins() -> None:
    plugins = load_plugins(
        extra=[("everything", EverythingPlugin())], env={"DEPLOY_CORE_PLUGINS": "health_checks"}
    )
    caps = plugins.capabilities()
    assert caps == {
        "plugins": {"health_checks": metadata.version("deploy-health-checks"), "everything": ""},
        "deploy_types": ["deploy.noop"],
        "health_checks": ["always", "http", "script", "tcp"],
        "rollback_strategies": ["nothing"],
    }
    assert BUILTIN not in caps["plugins"]


# --------------------------------------------------------------------------- deployctl plugins


def _deployctl(*args: str, env: dict[str, str] | None = None) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_deployctl_plugins_prints_json_with_deploy_shell() -> None:
    listed = _deployctl(
        "plugins", "--json", env={"DEPLOY_CORE_PLUGINS": "", "DEPLOY_CORE_DISABLE_PLUGINS": ""}
    )
    by_name = {p["name"]: p for p in listed}
    assert by_name["deploy_shell"]["deploy_types"] == ["deploy.shell"]
    assert by_name["deploy_shell"]["builtin"] is False
    assert by_name[BUILTIN]["builtin"] is True
    assert set(by_name) >= INSTALLED


def test_deployctl_plugins_honours_the_disable_list() -> None:
    listed = _deployctl("plugins", "--json", env={"DEPLOY_CORE_DISABLE_PLUGINS": "deploy_shell"})
    assert "deploy_shell" not in {p["name"] for p in listed}


def _distribution(root: Path, entry_points: dict[str, str], modules: dict[str, str]) -> str:
    """A real (uninstalled) distribution on a path entry: ``importlib.metadata`` finds its
    ``dist-info`` there, as it finds an installed one.  Returns a PYTHONPATH."""
    info = root / "deploy_probe-0.3.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deploy-probe\nVersion: 0.3.0\n")
    lines = [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("[deploy_core]\n" + "\n".join(lines) + "\n")
    for dotted, source in modules.items():
        path = root / (dotted.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return str(root)


PROBE_PLUGIN = """
import click
from deploy_core import hookimpl

@click.command("probe-hello")
@click.argument("who")
def hello(who):
    \"\"\"Say hello from a plugin.\"\"\"
    click.echo(f"hello {who} from a plugin")

@hookimpl
def deploy_register_cli_commands(register):
    register(hello)
"""


def _run_cli(*args: str, pythonpath: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": pythonpath, "DEPLOY_CORE_PLUGINS": "probe"},
    )


def test_deployctl_runs_a_command_a_plugin_registered(tmp_path: Path) -> None:
    path = _distribution(
        tmp_path, {"probe": "probe_pkg.plugin"}, {"probe_pkg.plugin": PROBE_PLUGIN}
    )
    ran = _run_cli("probe-hello", "ops", pythonpath=path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello ops from a plugin\n"
    helped = _run_cli("--help", pythonpath=path)
    assert "probe-hello" in helped.stdout and "Say hello from a plugin." in helped.stdout
    listed = json.loads(_run_cli("plugins", "--json", pythonpath=path).stdout)
    (probe,) = [p for p in listed if p["name"] == "probe"]
    assert probe["version"] == "0.3.0"
    assert probe["cli_commands"] == ["probe-hello"]


def test_deployctl_plugins_lists_a_plugin_that_fails_to_import(tmp_path: Path) -> None:
    path = _distribution(tmp_path, {"probe": "probe_nowhere.plugin"}, {})
    ran = _run_cli("plugins", "--json", pythonpath=path)
    assert ran.returncode == 0, ran.stderr
    assert {"name": "probe", "error": "ModuleNotFoundError: No module named 'probe_nowhere'"} in (
        json.loads(ran.stdout)
    )
    assert "plugin probe failed to load and is skipped" in ran.stderr


def test_a_misspelled_hook_in_an_installed_plugin_stops_deployctl(tmp_path: Path) -> None:
    source = (
        "from deploy_core import hookimpl\n\n"
        "@hookimpl\n"
        "def deploy_register_deploy_typez(register):\n"
        "    pass\n"
    )
    path = _distribution(tmp_path, {"probe": "probe_typo"}, {"probe_typo": source})
    ran = _run_cli("plugins", pythonpath=path)
    assert ran.returncode != 0
    assert "unknown hook 'deploy_register_deploy_typez'" in ran.stderr


# --------------------------------------------------------------------------- a real server


PINGS = sa.Table(
    "plugintest_pings",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("client_id", sa.String(64), nullable=False),
)


class ServerSidePlugin:
    """Uses every server- and agent-side hook for real: a table, a route, an event handler,
    an agent service that sends the event, and the lifecycle notifications."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changes: list[tuple[str, str | None]] = []
        self.finished: list[dict[str, Any]] = []

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        register(noop_type())

    @hookimpl
    def deploy_register_tables(self, metadata: sa.MetaData) -> None:
        # As docs/plugins.md advises: the hook runs at every server start, on one MetaData.
        if PINGS.key not in metadata.tables:
            PINGS.to_metadata(metadata)

    @hookimpl
    def deploy_register_routes(self, register: Callable[[RouteSet], None]) -> None:
        async def pings(request: Request) -> JSONResponse:
            server = request.app.state.services
            with server.engine.connect() as conn:
                rows = conn.execute(sa.select(PINGS.c.client_id)).scalars().all()
            return JSONResponse({"pings": list(rows)})

        async def refuse(request: Request) -> JSONResponse:
            raise ApiError(418, "no coffee here", {"try": "tea"})

        register(
            RouteSet(
                "plugintest",
                [
                    Route("/plugintest/pings", pings),
                    Route("/plugintest/refuse", refuse, methods=["POST"]),
                ],
            )
        )

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        async def on_ping(ctx: EventContext) -> None:
            with ctx.server.engine.begin() as conn:
                conn.execute(PINGS.insert().values(client_id=ctx.client_id))
            self.events.append((ctx.client_id, ctx.payload))

        register(EventHandler("plugintest.ping", on_ping))

    @hookimpl
    def deploy_agent_services(self, register: Callable[[AgentService], None]) -> None:
        async def pinger(ctx: AgentServiceContext) -> None:
            await ctx.send_event("plugintest.ping", {"hello": ctx.config.get("greeting", "?")})

        register(AgentService("pinger", pinger))

    @hookimpl
    def deploy_status_changed(self, record: dict[str, Any], previous: str | None) -> None:
        self.changes.append((record["status"], previous))

    @hookimpl
    def deploy_finished(self, record: dict[str, Any]) -> None:
        self.finished.append(record)


class Running:
    """A started in-process server and agent sharing one set of plugins."""

    def __init__(self, server: DeployServer, http: httpx.AsyncClient, plugin: Any) -> None:
        self.server = server
        self.http = http
        self.plugin = plugin


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    plugin = ServerSidePlugin()
    plugins = load_plugins(
        extra=[("plugintest", plugin), ("boom", Notes(fail=True))], entry_points=False
    )
    try:
        async with in_process_center(
            tmp_path, plugins, services={"pinger": {"greeting": "hi"}}
        ) as center:
            yield Running(center.server, center.http, plugin)
    finally:
        server_db.plugin_metadata.remove(server_db.plugin_metadata.tables[PINGS.key])


async def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_agent_service_event_reaches_the_plugin_handler_table_and_route(
    running: Running,
) -> None:
    await _eventually(lambda: bool(running.plugin.events))
    assert running.plugin.events == [("web-1", {"hello": "hi"})]
    answer = await running.http.get("/api/plugintest/pings")
    assert answer.status_code == 200
    assert answer.json() == {"pings": ["web-1"]}
    listed = (await running.http.get("/api/plugins")).json()["plugins"]
    (entry,) = [p for p in listed if p["name"] == "plugintest"]
    assert entry["routes"] == ["plugintest"] and entry["agent_services"] == ["pinger"]


async def test_plugin_routes_need_the_token_and_its_scope(running: Running) -> None:
    answer = await running.http.get("/api/plugintest/pings", headers={"Authorization": ""})
    assert answer.status_code == 401
    made = await running.http.post("/api/tokens", json={"name": "viewer", "scope": "read"})
    viewer = {"Authorization": f"Bearer {made.json()['token']}"}
    assert (await running.http.get("/api/plugintest/pings", headers=viewer)).status_code == 200
    refused = await running.http.post("/api/plugintest/refuse", headers=viewer)
    assert refused.status_code == 403
    assert "needs 'deploy'" in refused.json()["error"]


async def test_plugin_routes_answer_errors_in_the_core_shape(running: Running) -> None:
    answer = await running.http.post("/api/plugintest/refuse")
    assert answer.status_code == 418
    assert answer.json() == {"error": "no coffee here", "detail": {"try": "tea"}}


async def test_lifecycle_notifications_follow_a_deployment_despite_a_failing_plugin(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="deploy_core.plugins")
    accepted = await running.http.post(
        "/api/deploy/noop", json={"client_id": "web-1", "message": "all good"}
    )
    assert accepted.status_code == 202, accepted.text
    deploy_id = accepted.json()["deploy_id"]
    record = (await running.http.get(f"/api/deploy/{deploy_id}", params={"wait": 30})).json()
    assert record["status"] == "success"
    assert record["result"] == {"message": "all good"}
    await _eventually(lambda: bool(running.plugin.finished))
    changes = running.plugin.changes
    assert changes[0] == ("pending", None)
    assert changes[-1] == ("success", "executing")
    assert [c[0] for c in changes] == ["pending", "executing", "success"]
    (finished,) = running.plugin.finished
    assert finished["deploy_id"] == deploy_id and finished["finished"] is True
    assert "plugin boom failed in deploy_status_changed" in caplog.text
    assert "plugin boom failed in deploy_finished" in caplog.text


class GoodbyePlugin:
    """An agent service that sends one last event as it is stopped, and the server side
    that records it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        async def on_goodbye(ctx: EventContext) -> None:
            self.received.append(ctx.payload)

        register(EventHandler("stoptest.goodbye", on_goodbye))

    @hookimpl
    def deploy_agent_services(self, register: Callable[[AgentService], None]) -> None:
        async def waits_then_says_goodbye(ctx: AgentServiceContext) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await ctx.send_event("stoptest.goodbye", {"bye": True})

        register(AgentService("goodbye", waits_then_says_goodbye))


async def test_a_graceful_stop_ends_the_services_first_and_flushes_their_events(
    tmp_path: Path,
) -> None:
    """An agent stopping ends its services while still connected and gives the outbox a
    moment to reach the server: an event a service queues as it ends is delivered, not left
    for the next start (the chaos test found a monitor batch queued during the stop)."""
    plugin = GoodbyePlugin()
    plugins = load_plugins(extra=[("stoptest", plugin)], entry_points=False)
    async with in_process_center(tmp_path, plugins) as center:
        assert center.agent.connector.connected
        await center.agent.stop()
        await _eventually(lambda: bool(plugin.received), timeout=10)
    assert plugin.received == [{"bye": True}]

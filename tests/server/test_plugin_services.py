"""A server-side plugin reaches the server only through :class:`deploy_core.plugin.ServerServices`:
its event handler gets ``ctx.services``, its route :func:`server_services`, its deploy type's
``server_check`` the services as first argument — a real server and agent in this process,
a real plugin table, a real artifact upload."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deploy_core.plugin import (
    AgentService,
    AgentServiceContext,
    ApiError,
    DeployContext,
    DeployParams,
    DeployType,
    EventContext,
    EventHandler,
    RouteSet,
    ServerServices,
    hookimpl,
    server_services,
)
from deploy_core.plugins import load_plugins
from deploy_core.server.app import DeployServer
from deploy_core.server.services import PluginServices
from deploy_core.testing import in_process_center

TABLE = "probe_seen"


def seen_table(metadata: sa.MetaData) -> sa.Table:
    if TABLE not in metadata.tables:
        sa.Table(
            TABLE,
            metadata,
            sa.Column("client_id", sa.String(64), primary_key=True),
            sa.Column("n", sa.Integer, nullable=False),
        )
    return metadata.tables[TABLE]


def store_seen(engine: sa.Engine, table: sa.Table, client_id: str, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.client_id == client_id))
        conn.execute(table.insert().values(client_id=client_id, n=n))


def read_seen(engine: sa.Engine, table: sa.Table, client_id: str) -> int | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(table.c.n).where(table.c.client_id == client_id)).first()
    return None if row is None else int(row[0])


class ProbeParams(DeployParams):
    artifact: str


async def never_runs(ctx: DeployContext, params: ProbeParams) -> BaseModel:
    raise AssertionError("the server check refuses every request of this test")


class ProbePlugin:
    """Uses every member of ServerServices from the places a plugin gets it."""

    def __init__(self) -> None:
        self.handler_got: list[object] = []
        self.check_got: list[object] = []
        self.event_ids: list[str] = []

    @hookimpl
    def deploy_register_tables(self, metadata: sa.MetaData) -> None:
        seen_table(metadata)

    @hookimpl
    def deploy_register_event_handlers(self, register: Callable[[EventHandler], None]) -> None:
        async def on_seen(ctx: EventContext) -> None:
            self.handler_got.append(ctx.services)
            self.event_ids.append(ctx.event_id)
            table = seen_table(ctx.services.metadata)
            n = int(ctx.payload["n"])
            await ctx.services.db(store_seen, ctx.services.engine, table, ctx.client_id, n)

        register(EventHandler("probe.seen", on_seen))

    @hookimpl
    def deploy_agent_services(self, register: Callable[[AgentService], None]) -> None:
        async def send_once(ctx: AgentServiceContext) -> None:
            await ctx.send_event("probe.seen", {"n": 7})
            await asyncio.Event().wait()

        register(AgentService("probe", send_once))

    @hookimpl
    def deploy_register_routes(self, register: Callable[[RouteSet], None]) -> None:
        async def seen(request: Request) -> Response:
            services = server_services(request)
            client_id = request.path_params["client_id"]
            if not await services.client_exists(client_id):
                raise ApiError(404, f"unknown client {client_id!r}")
            table = seen_table(services.metadata)
            n = await services.db(read_seen, services.engine, table, client_id)
            return JSONResponse({"n": n, "config": services.plugin_config("probe")})

        register(RouteSet("probe", [Route("/probe/{client_id:str}", seen)]))

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        async def stored_only(services: ServerServices, params: ProbeParams) -> None:
            self.check_got.append(services)
            if not await services.artifact_exists(params.artifact):
                raise LookupError(f"no artifact {params.artifact}")
            raise ValueError(f"artifact {params.artifact} is stored; refused all the same")

        register(DeployType("deploy.probe", ProbeParams, never_runs, server_check=stored_only))


async def _wait_for_seen(server: DeployServer, client_id: str) -> int | None:
    table = seen_table(server.plugin_metadata)
    end = time.monotonic() + 30
    n = None
    while n is None and time.monotonic() < end:
        n = await server.db(read_seen, server.engine, table, client_id)
        await asyncio.sleep(0.05)
    return n


async def test_a_plugin_reaches_the_server_only_through_its_services(tmp_path: Path) -> None:
    probe = ProbePlugin()
    plugins = load_plugins(extra=[("probe", probe)], entry_points=False)
    async with in_process_center(tmp_path, plugins, services={"probe": {}}) as center:
        server = center.server
        server.config.plugin_settings["probe"] = {"greeting": "hi"}
        # The agent service's event went through the handler into the plugin's own table.
        assert await _wait_for_seen(server, "web-1") == 7
        assert all(isinstance(got, PluginServices) for got in probe.handler_got)
        assert not any(isinstance(got, DeployServer) for got in probe.handler_got)
        # One event (resent or not): one id, the agent's.
        assert probe.event_ids and probe.event_ids[0] and len(set(probe.event_ids)) == 1

        answer = await center.http.get("/api/probe/web-1")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"n": 7, "config": {"greeting": "hi"}}
        unknown = await center.http.get("/api/probe/web-9")
        assert unknown.status_code == 404
        assert unknown.json()["error"] == "unknown client 'web-9'"

        missing = "ab" * 32
        refused = await center.http.post(
            "/api/deploy/probe", json={"client_id": "web-1", "artifact": missing}
        )
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"] == f"no artifact {missing}"
        package = b"a package"
        stored = await center.http.post("/api/artifacts", content=package)
        assert stored.status_code == 201, stored.text
        sha = hashlib.sha256(package).hexdigest()
        found = await center.http.post(
            "/api/deploy/probe", json={"client_id": "web-1", "artifact": sha}
        )
        assert found.status_code == 422, found.text
        assert found.json()["error"] == f"artifact {sha} is stored; refused all the same"
        assert len(probe.check_got) == 2
        assert all(isinstance(got, PluginServices) for got in probe.check_got)


async def test_services_answer_from_the_running_server(tmp_path: Path) -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        services: ServerServices = PluginServices(center.server)
        assert await services.client_exists("web-1") is True
        assert await services.client_exists("web-2") is False
        assert await services.artifact_exists("cd" * 32) is False
        assert services.plugin_config("nobody") == {}
        assert services.engine is center.server.engine
        assert services.metadata is center.server.plugin_metadata
        assert await services.db(sum, [1, 2, 3]) == 6

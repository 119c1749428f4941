"""PostgreSQL unreachable (issue 15 item 6): a real DeployServer on a real PostgreSQL schema,
reached through a TCP proxy on loopback (tests/pg_proxy.py) that the test cuts and restores.

- every route answers ``503`` with the error shape and ``Retry-After`` while the database is
  cut or black-holed, named tokens included (their check reads the database), and no request
  hangs (each has a client timeout: a hang fails the test; the times are printed);
- ``GET /healthz`` (no token) says 200 and 503 with the reason, and a flood of probes opens
  at most a few database connections;
- a replica cut off for longer than its lease is fenced: deploy, rollback and rollout
  requests get ``503`` with the seconds, ``deploy_center_database_fenced`` is 1, the log says
  so once; when the database is back it is 0, the log says so once, and work is taken again;
- :class:`~deploy_core.server.db_health.DbHealth` does not fence a quiet replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.db_health import HEALTH_PATH, DbHealth
from tests.pg_proxy import PgProxy
from tests.waits import eventually

LEASE = 2.0
BEAT = 0.2
WAIT = 60.0  # the longest any condition is waited for (a slow shared machine)
#: No request may take longer than this (the client gives up: the test fails).
REQUEST_BOUND = 20.0


@pytest_asyncio.fixture
async def server(tmp_path: Path, pg_url: str, proxy: PgProxy) -> AsyncIterator[DeployServer]:
    s = DeployServer(
        ServerConfig(
            state_dir=tmp_path / "server",
            api_port=0,
            quic_port=0,
            db_url=proxy.url(pg_url),
            server_id="replica-a",
            heartbeat_flush_interval=BEAT,
            lease_seconds=LEASE,
        )
    )
    await s.start()
    try:
        yield s
    finally:
        proxy.restore()
        await asyncio.wait_for(s.stop(), 60)


def client(server: DeployServer, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token or server.state.admin_token}"}
    return httpx.AsyncClient(base_url=server.api_url, headers=headers, timeout=REQUEST_BOUND)


async def fenced_gauge(http: httpx.AsyncClient) -> float:
    answer = await http.get("/metrics")
    assert answer.status_code == 200, answer.text
    for line in answer.text.splitlines():
        if line.startswith("deploy_center_database_fenced "):
            return float(line.split()[1])
    raise AssertionError(f"no deploy_center_database_fenced in {answer.text[:2000]}")


def assert_outage(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 503, (answer.request.url, answer.status_code, answer.text)
    assert answer.headers["Retry-After"] == "5"
    body = answer.json()
    assert isinstance(body["error"], str) and "database" in body["error"], body
    assert body["detail"]["server_id"] == "replica-a", body
    return dict(body)


async def test_every_route_answers_503_with_the_reason_while_the_database_is_cut(
    server: DeployServer, proxy: PgProxy
) -> None:
    async with client(server) as http:
        made = await http.post("/api/tokens", json={"name": "reader", "scope": "read"})
        assert made.status_code == 201, made.text
        async with client(server, made.json()["token"]) as reader:
            assert (await reader.get("/api/deployments")).status_code == 200
            proxy.cut()
            requests = [
                (http, "GET", "/api/deployments", None),
                (http, "GET", "/api/clients", None),
                (http, "GET", "/api/deploy/d-1", None),
                (http, "GET", "/api/deploy/d-1/status", None),
                (http, "GET", "/api/rollouts", None),
                (http, "POST", "/api/deploy/shell", {"client_id": "web-1", "script": "true"}),
                (http, "POST", "/api/deploy/d-1/rollback", None),
                (reader, "GET", "/api/deployments", None),  # the token check itself fails
            ]
            for caller, method, path, body in requests:
                began = time.monotonic()
                answer = await caller.request(method, path, json=body)
                print(f"{method} {path}: {answer.status_code} in {time.monotonic() - began:.2f} s")
                outage = assert_outage(answer)
                assert "cannot reach its database" in outage["error"], outage
            # The metrics are still served, and say how long the database has been silent.
            scraped = await http.get("/metrics")
            assert scraped.status_code == 200, scraped.text
            assert "deploy_center_database_unreachable_seconds" in scraped.text

            proxy.restore()

            async def served() -> bool:
                return (await reader.get("/api/deployments")).status_code == 200

            await eventually(served, "the API to answer again")
            assert (await http.get("/api/deploy/d-1")).status_code == 404


async def test_a_black_holed_database_is_answered_503_quickly_and_not_hammered(
    server: DeployServer, proxy: PgProxy
) -> None:
    async with client(server) as http:
        proxy.stall()
        began = time.monotonic()
        answers = await asyncio.gather(*(http.get("/api/deployments") for _ in range(20)))
        took = time.monotonic() - began
        for answer in answers:
            assert_outage(answer)
        probes = await asyncio.gather(
            *(
                httpx.AsyncClient().get(server.api_url + HEALTH_PATH, timeout=REQUEST_BOUND)
                for _ in range(30)
            )
        )
        for probe in probes:
            assert probe.status_code == 503, probe.text
            assert probe.json()["ok"] is False
        print(
            f"20 requests on a black-holed database answered 503 in {took:.2f} s; "
            f"{proxy.accepted_while_down} connection attempts reached the proxy "
            f"(connect timeout 5 s, one attempt at a time)"
        )
        # One attempt at a time: the 50 requests did not each open a connection.
        assert proxy.accepted_while_down <= 10, proxy.accepted_while_down
        proxy.restore()

        async def served() -> bool:
            return (await http.get("/api/deployments")).status_code == 200

        await eventually(served, "the API to answer again")


async def test_the_health_endpoint_needs_no_token_and_says_both_ways(
    server: DeployServer, proxy: PgProxy
) -> None:
    async with httpx.AsyncClient(base_url=server.api_url, timeout=REQUEST_BOUND) as anon:
        ok = await anon.get(HEALTH_PATH)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"ok": True, "server_id": "replica-a"}
        assert (await anon.head(HEALTH_PATH)).status_code == 200
        wrong = await anon.post(HEALTH_PATH)
        assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET, HEAD"
        assert (await anon.get("/api/deployments")).status_code == 401  # the rest needs one

        proxy.cut()

        async def unhealthy() -> httpx.Response | None:
            answer = await anon.get(HEALTH_PATH)
            return answer if answer.status_code == 503 else None

        down = await eventually(unhealthy, "the health endpoint to say 503")
        body = down.json()
        assert body["ok"] is False and body["server_id"] == "replica-a", body
        assert "database" in body["error"], body
        assert down.headers["Retry-After"] == "5"

        # A flood of probes is one query per second at most: all answered the same.
        many = await asyncio.gather(*(anon.get(HEALTH_PATH) for _ in range(50)))
        assert {m.status_code for m in many} == {503}

        proxy.restore()

        async def healthy() -> bool:
            return (await anon.get(HEALTH_PATH)).status_code == 200

        await eventually(healthy, "the health endpoint to say 200 again")


async def test_a_replica_cut_off_longer_than_its_lease_is_fenced_and_resumes(
    server: DeployServer, proxy: PgProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy_core.server.db_health")
    async with client(server) as http:
        assert await fenced_gauge(http) == 0
        proxy.cut()

        async def fenced() -> bool:
            return await fenced_gauge(http) == 1

        await eventually(fenced, "the replica to be fenced")
        assert server.db_health is not None and server.db_health.check()
        for path, body in [
            ("/api/deploy/shell", {"client_id": "web-1", "script": "true"}),
            ("/api/deploy/d-1/rollback", None),
            ("/api/rollouts", {"type": "shell", "request": {"script": "true"}, "targets": {}}),
        ]:
            answer = await http.post(path, json=body)
            refused = assert_outage(answer)
            assert "this replica has not reached its database for" in refused["error"], refused
            assert refused["detail"]["fenced"] is True
            assert refused["detail"]["unreachable_seconds"] >= LEASE
        health = await httpx.AsyncClient().get(server.api_url + HEALTH_PATH, timeout=30)
        assert health.status_code == 503 and health.json()["detail"]["fenced"] is True

        proxy.restore()

        async def resumed() -> bool:
            return await fenced_gauge(http) == 0

        await eventually(resumed, "the replica to leave the fence")
        # New work is taken again: the deploy is refused for its unknown client, not fenced.
        answer = await http.post("/api/deploy/shell", json={"client_id": "web-9", "script": "x"})
        assert answer.status_code == 404 and "unknown client" in answer.json()["error"]
        # Once on entering, once on leaving.
        entered = [r for r in caplog.records if "is fenced" in r.getMessage()]
        left = [r for r in caplog.records if "is no longer fenced" in r.getMessage()]
        assert len(entered) == 1 and len(left) == 1, caplog.text
        assert entered[0].levelno == logging.ERROR


def test_a_quiet_replica_is_not_fenced_and_one_answer_ends_the_fence(tmp_path: Path) -> None:
    now = [1000.0]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'h.db'}")
    health = DbHealth(engine, server_id="r", fence_after=15.0, clock=lambda: now[0])
    health.watch()
    now[0] += 100  # nothing asked of the database for a long time: not an outage
    assert not health.check() and health.unreachable_for() == 0
    health.failed(sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused")))
    assert health.check(), "silent for 100 s with a failure since: fenced"
    assert health.unreachable_for() == 100
    health.failed(sa.exc.IntegrityError("INSERT", {}, Exception("duplicate")))  # not an outage
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))  # the database answers
    assert not health.check() and health.fenced_reason() is None
    with pytest.raises(ValueError, match="fence_after"):
        DbHealth(engine, server_id="r", fence_after=0)
    engine.dispose()


def test_postgresql_connections_get_timeouts_and_the_url_wins(pg_url: str) -> None:
    from deploy_core.server.db import make_engine

    for url, connect_timeout in [(pg_url, "5"), (pg_url + "&connect_timeout=30", "30")]:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                given = dbapi.info.get_parameters()  # what libpq was given (non-defaults)
        finally:
            engine.dispose()
        assert given["connect_timeout"] == connect_timeout, given
        assert given["keepalives_idle"] == "10" and given["tcp_user_timeout"] == "10000", given


def test_only_unreachable_databases_are_outages() -> None:
    from deploy_core.server.db_health import is_outage

    cause = Exception("x")
    assert is_outage(sa.exc.OperationalError("SELECT 1", {}, cause))
    assert is_outage(sa.exc.InterfaceError("SELECT 1", {}, cause))
    assert is_outage(sa.exc.TimeoutError("QueuePool limit reached"))
    assert is_outage(sa.exc.DBAPIError("SELECT 1", {}, cause, connection_invalidated=True))
    assert not is_outage(sa.exc.IntegrityError("INSERT", {}, cause))
    assert not is_outage(sa.exc.ProgrammingError("SELEC", {}, cause))
    assert not is_outage(ValueError("no"))

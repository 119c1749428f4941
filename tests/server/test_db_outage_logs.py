"""What a replica logs while PostgreSQL is unreachable, and what an agent is told (issue 15
item 6): a real DeployServer on a real PostgreSQL schema behind a TCP proxy on loopback
(tests/pg_proxy.py) that the test cuts and restores.

- the background loops (watchdog, rollout driver, lease keeper, webhooks, heartbeats, the
  cluster bus) log a few lines during a cut or a black hole, none with a traceback for the
  outage, and one line each when the database answers again; every loop still runs after;
- a new agent's handshake during a cut is refused with a clear reason and a retry-after hint
  that the agent honours (as for a busy server), and it connects once the database is back;
- the 503 answers and ``GET /healthz`` match the OpenAPI document;
- :class:`~deploy_core.server.db_health.OutageLog` on its own, with a clock of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.db_health import RETRY_AFTER, is_outage
from deploy_core.server.webhooks import WebhookSettings
from deploy_core.testing import agent_for
from tests.pg_proxy import PgProxy
from tests.waits import eventually

LEASE = 2.0
BEAT = 0.2
WAIT = 60.0  # the longest any condition is waited for (a slow shared machine)
#: How long the database stays cut while the log is counted (seconds).
CUT = 6.0
#: The loops that must each say the database is unreachable.
EXPECTED = {"watchdog", "rollout driver", "leases", "webhooks sweep", "webhooks delivery"}


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
            watchdog_interval=0.2,
            retention_days=30,
            webhooks=WebhookSettings(sweep_interval=0.5),
        )
    )
    await s.start()
    try:
        yield s
    finally:
        proxy.restore()
        await asyncio.wait_for(s.stop(), 60)


def outage_in(record: logging.LogRecord) -> BaseException | None:
    """The outage error among a record's traceback's exceptions (causes included)."""
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None:
        if is_outage(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def ours(caplog: pytest.LogCaptureFixture, since: int) -> list[logging.LogRecord]:
    """The server's records from ``since`` on, at the level an operator runs (INFO)."""
    return [
        r
        for r in caplog.records[since:]
        if r.name.startswith("deploy_core") and r.levelno >= logging.INFO
    ]


@pytest.mark.parametrize("how", ["cut", "stall"])
async def test_loops_log_a_few_lines_per_outage_and_one_when_it_ends(
    server: DeployServer, proxy: PgProxy, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="deploy_core")
    assert server.bus is not None
    await eventually(lambda: _true(server.leases.held()), "the duties' leases")
    async with httpx.AsyncClient(
        base_url=server.api_url,
        headers={"Authorization": f"Bearer {server.state.admin_token}"},
        timeout=30,
    ) as http:
        # A webhook, so that the webhooks' delivery loop reads its outbox too.
        made = await http.post(
            "/api/webhooks",
            json={
                "url": "https://127.0.0.1:9/hook",
                "events": ["deployment.finished"],
                "secret": "s" * 32,
            },
        )
        assert made.status_code == 201, made.text

        start = len(caplog.records)
        proxy.cut() if how == "cut" else proxy.stall()  # refused, or a black hole
        await asyncio.sleep(CUT)  # the outage lasts; what is logged meanwhile is counted

        # A black hole holds a loop in its connection attempt for up to the connect timeout
        # (5 s): give each loop that long again to say so, never past 10 s more (so each says
        # it at most twice more: once at first, once 10 s later).
        async def all_complained() -> bool:
            said = {r.getMessage().split(":")[0] for r in ours(caplog, start)}
            return said >= EXPECTED

        with contextlib.suppress(AssertionError):
            await eventually(all_complained, "every loop to log the outage", timeout=9.0)
        during = ours(caplog, start)
        # By logger, what begins the line (a loop's name) and the line's template.
        by_message = collections.Counter(
            f"{r.name}: {r.getMessage().split(':')[0]}: {r.msg}" for r in during
        )
        print(f"{len(during)} log records during a {CUT:g} s {how}:")
        for message, count in by_message.most_common():
            print(f"  {count:4d}  {message[:150]}")
        restored_at = len(caplog.records)
        proxy.restore()

        async def served() -> bool:
            return (await http.get("/api/deployments")).status_code == 200

        await eventually(served, "the API to answer again")

        def recovered() -> list[logging.LogRecord]:
            return [r for r in ours(caplog, restored_at) if "answers again" in r.getMessage()]

        # Each loop that said the database is unreachable says once that it answers again.
        complained = {
            r.getMessage().split(":")[0]
            for r in during
            if "database is unreachable" in r.getMessage() and r.levelno == logging.WARNING
        }

        async def all_recovered() -> bool:
            said = {r.getMessage().split(":")[0] for r in recovered()}
            return complained <= said

        await eventually(all_recovered, f"every loop of {sorted(complained)} to recover")
        await eventually(lambda: _true(server.bus.listening.is_set()), "the bus to listen")
        # The work goes on: every background task still runs, and a new webhook is taken.
        for task in server._tasks:
            assert not task.done(), (task.get_name(), task)
        again = await http.post(
            "/api/webhooks",
            json={
                "url": "https://127.0.0.1:9/two",
                "events": ["deployment.finished"],
                "secret": "s" * 32,
            },
        )
        assert again.status_code == 201, again.text
        assert server.db_health is not None and not server.db_health.check()

    tracebacks = [r for r in during if outage_in(r) is not None]
    assert not tracebacks, [f"{r.name}: {r.getMessage()}" for r in tracebacks]
    assert complained >= EXPECTED, complained
    # A few lines per loop (one at the start, one every 10 s, the fence), not one per pass.
    assert all(count <= 3 for count in by_message.values()), by_message
    assert len(during) <= 40, by_message
    after = collections.Counter(r.getMessage().split(":")[0] for r in recovered())
    assert all(count == 1 for count in after.values()), after


async def _true(value: Any) -> Any:
    return value


async def test_an_agent_is_told_the_database_is_unreachable_and_waits_the_hint(
    server: DeployServer, proxy: PgProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deploy_core")
    proxy.cut()
    agent = agent_for(server, "web-1", tmp_path / "agent")
    task = asyncio.create_task(agent.run())
    try:
        connector = agent.connector

        async def refused() -> bool:
            return bool(connector.last_error) and len(connector.busy_hints) >= 1

        await eventually(refused, "the handshake to be refused")
        assert "cannot reach its database" in (connector.last_error or ""), connector.last_error
        assert connector.busy_hints[0] == RETRY_AFTER
        # The agent waited at least the hint before its next attempt (as for a busy server).
        assert connector.backoff_waits and connector.backoff_waits[0] >= RETRY_AFTER
        assert server.transport.stats.refusals["unavailable"] >= 1
        assert server.transport.stats.refusals["internal"] == 0
        handshake_lines = [
            r
            for r in caplog.records
            if r.name.startswith("deploy_core.server") and "handshake" in r.getMessage()
        ]
        assert handshake_lines and all(r.exc_info is None for r in handshake_lines), [
            r.getMessage() for r in handshake_lines
        ]

        proxy.restore()
        assert await connector.wait_connected(WAIT), connector.last_error
        assert server.is_connected("web-1")
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 30)


async def test_outage_answers_have_the_documented_shapes(
    server: DeployServer, proxy: PgProxy
) -> None:
    import jsonschema_rs

    async with httpx.AsyncClient(
        base_url=server.api_url,
        headers={"Authorization": f"Bearer {server.state.admin_token}"},
        timeout=30,
    ) as http:
        doc = (await http.get("/openapi.json")).json()
        health_op = doc["paths"]["/healthz"]["get"]
        assert health_op["security"] == []  # public
        assert set(health_op["responses"]) == {"200", "503"}
        for path, method in [("/api/deployments", "get"), ("/api/deploy/shell", "post")]:
            op = doc["paths"][path][method]
            assert "Retry-After" in op["responses"]["503"]["headers"], (path, op)

        def check(answer: httpx.Response, path: str, method: str) -> None:
            documented = doc["paths"][path][method]["responses"]
            assert str(answer.status_code) in documented, (path, answer.status_code)
            schema = documented[str(answer.status_code)]["content"]["application/json"]["schema"]
            validator = jsonschema_rs.Draft202012Validator(
                {**schema, "components": doc["components"]}
            )
            errors = [e.message for e in validator.iter_errors(answer.json())]
            assert not errors, (path, errors, answer.text)
            if answer.status_code == 503:
                assert "Retry-After" in documented["503"]["headers"]
                assert int(answer.headers["Retry-After"]) == RETRY_AFTER

        check(await http.get("/healthz"), "/healthz", "get")
        proxy.cut()

        async def unhealthy() -> httpx.Response | None:
            answer = await http.get("/healthz")
            return answer if answer.status_code == 503 else None

        check(await eventually(unhealthy, "/healthz to say 503"), "/healthz", "get")
        answer = await http.get("/api/deployments")
        assert answer.status_code == 503, answer.text
        check(answer, "/api/deployments", "get")
        body = {"client_id": "web-1", "script": "true"}
        answer = await http.post("/api/deploy/shell", json=body)
        assert answer.status_code == 503, answer.text
        check(answer, "/api/deploy/shell", "post")


def test_an_outage_log_says_little_and_leaves_other_errors_to_its_caller() -> None:
    import sqlalchemy as sa

    from deploy_core.server.db_health import OutageLog

    now = [0.0]
    logger = logging.getLogger("tests.outage_log")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        outage = OutageLog(logger, "loop", every=10.0, clock=lambda: now[0])
        down = sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused\nmore"))
        assert not outage.failed(ValueError("a bug")), "not an outage: the caller logs it"
        assert not outage.failed(sa.exc.IntegrityError("INSERT", {}, Exception("dup")))
        outage.ok()  # no outage yet: nothing to say
        assert records == []
        for _ in range(100):  # 100 passes over 25 s
            assert outage.failed(down)
            now[0] += 0.25
        messages = [r.getMessage() for r in records]
        assert len(messages) == 3, messages  # at 0, 10 and 20 s
        assert messages[0] == (
            "loop: the database is unreachable (Exception: connection refused); trying "
            "again, logged at most every 10 s until it answers"
        )
        assert "still unreachable after 20 s, 81 passes failed" in messages[2], messages
        assert all(r.exc_info is None and r.levelno == logging.WARNING for r in records)
        outage.ok()
        outage.ok()
        assert [r.getMessage() for r in records[3:]] == [
            "loop: the database answers again (unreachable for 25 s, 100 passes failed)"
        ]
        assert outage.failed(down)  # a new outage is told at once
        assert len(records) == 5
        with pytest.raises(ValueError, match="every"):
            OutageLog(logger, "loop", every=0)
    finally:
        logger.removeHandler(handler)


async def test_an_agents_reports_during_an_outage_are_logged_once_not_per_message(
    server: DeployServer, proxy: PgProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chatty deployment while the database is cut: its reports fail to be stored (and are
    not acknowledged) without a traceback each; once it is back, they are all stored."""
    caplog.set_level(logging.INFO, logger="deploy_core")
    agent = agent_for(server, "web-1", tmp_path / "agent")
    task = asyncio.create_task(agent.run())
    try:
        assert await agent.connector.wait_connected(WAIT), agent.connector.last_error
        async with httpx.AsyncClient(
            base_url=server.api_url,
            headers={"Authorization": f"Bearer {server.state.admin_token}"},
            timeout=WAIT,
        ) as http:
            script = "for i in $(seq 1 60); do echo line $i; sleep 0.1; done"
            made = await http.post(
                "/api/deploy/shell", json={"client_id": "web-1", "script": script}
            )
            assert made.status_code == 202, made.text
            deploy_id = made.json()["deploy_id"]

            async def running() -> bool:
                r = await http.get(f"/api/deploy/{deploy_id}/logs")
                return r.status_code == 200 and len(r.json()["lines"]) >= 3

            await eventually(running, "the first lines to be stored")
            start = len(caplog.records)
            proxy.cut()
            await asyncio.sleep(CUT)  # the script reports all along
            during = ours(caplog, start)
            proxy.restore()

            async def done() -> dict[str, Any] | None:
                r = await http.get(f"/api/deploy/{deploy_id}", params={"wait": 5})
                return r.json() if r.status_code == 200 and r.json()["finished"] else None

            record = await eventually(done, "the deployment to finish once the database is back")
            assert record["status"] == "success", record
            lines = (await http.get(f"/api/deploy/{deploy_id}/logs", params={"limit": 1000})).json()
            texts = [x["line"] for x in lines["lines"] if x["stream"] == "stdout"]
            assert texts == [f"line {i}" for i in range(1, 61)]  # each once, none lost
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 30)
    messages = [
        r for r in during if r.name in ("deploy_core.server.ingest", "deploy_core.server.events")
    ]
    assert not [r for r in during if outage_in(r) is not None], [r.getMessage() for r in during]
    assert len(messages) <= 4, [r.getMessage() for r in messages]  # was one or two per report

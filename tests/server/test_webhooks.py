"""Webhooks below the HTTP API: which URLs and settings are accepted, the signature against
the documented check, back-off, the outbox on SQLite and PostgreSQL (one row per webhook and
event, the sweep for missed finishes, claims that exclude each other, pruning), and the
worker against a real receiver (gives up after max_age, follows no redirect, reads a huge
answer only in part, stops sending to a host no longer allowed, logs no secret)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from webhook_receiver import Receiver, documented_verifier

from deploy_core.server import db
from deploy_core.server.rollouts import RolloutStore, resolve_strategy
from deploy_core.server.secret_box import SecretBox
from deploy_core.server.webhooks import (
    AGENT_CONNECTED,
    DEPLOYMENT_FINISHED,
    ROLLOUT_FINISHED,
    Event,
    WebhookError,
    Webhooks,
    WebhookSettings,
    WebhookStore,
    backoff,
    check_events,
    check_url,
    signature,
)
from deploy_core.transport.certs import ensure_server_certs

SECRET = "whsec-unit-0f1e2d3c4b5a69788796a5b4"
ALLOW = ("127.0.0.1",)


@pytest.mark.parametrize(
    "url",
    [
        "https://ci.example.com/hook",
        "https://ci.example.com:8443/a/b?token=x",
        "https://[2001:db8::1]/hook",
        "http://127.0.0.1:9000/hook",
        "HTTPS://CI.EXAMPLE.COM/",
    ],
)
def test_acceptable_urls(url: str) -> None:
    assert check_url(url, ALLOW) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("ftp://example.com/x", "only https://"),
        ("file:///etc/passwd", "only https://"),
        ("example.com/hook", "without a scheme"),
        ("http://example.com/x", "http:// to example.com is not allowed"),
        ("http://localhost/x", "http:// to localhost is not allowed"),
        ("https://user:pw@example.com/", "user name or password"),
        ("https://token@example.com/", "user name or password"),
        ("https:///path", "no host"),
        ("https://example.com/#frag", "fragment"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com/\x00", "control"),
        ("https://example.com/\r\nX-Injected: 1", "control"),
        ("https://exämple.com/", "ASCII"),
        ("https://example.com:0/", "port"),
        ("https://example.com:99999/", "not valid"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_refused_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(WebhookError, match=why):
        check_url(url, ALLOW)


def test_events_are_checked_and_ordered() -> None:
    assert check_events([DEPLOYMENT_FINISHED, AGENT_CONNECTED, DEPLOYMENT_FINISHED]) == [
        DEPLOYMENT_FINISHED,
        AGENT_CONNECTED,
    ]
    with pytest.raises(WebhookError, match=r"unknown event 'deploy\.finished'"):
        check_events(["deploy.finished"])
    with pytest.raises(WebhookError, match="at least one"):
        check_events([])


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"allow_http_hosts": "127.0.0.1"}, "list of host names"),
        ({"allow_http_hosts": [""]}, "list of host names"),
        ({"max_age": "1d"}, "number of seconds"),
        ({"max_age": -1}, "0 or more"),
        ({"timeout": 0}, "more than 0"),
        ({"concurrency": 0}, "1 to 64"),
        ({"concurrency": 2.5}, "integer"),
        ({"max_response_bytes": 10}, "1024"),
        ({"retry_initial": True}, "number of seconds"),
        ({"retries": 3}, "no setting retries"),
        ({"ca_file": "/nonexistent/ca.pem"}, "no CA certificates read"),
        ({"ca_file": "/etc/hostname"}, "no CA certificates read"),
    ],
)
def test_bad_settings_are_refused(table: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        WebhookSettings.from_table(table)


def test_settings_from_a_table() -> None:
    settings = WebhookSettings.from_table(
        {"allow_http_hosts": ["127.0.0.1", "[::1]", "Hooks.Internal"], "max_age": 60}
    )
    assert settings.allow_http_hosts == ("127.0.0.1", "::1", "hooks.internal")
    assert settings.max_age == 60.0 and settings.timeout == 10.0
    assert check_url("http://[::1]:8000/x", settings.allow_http_hosts)
    assert check_url("http://HOOKS.internal/x", settings.allow_http_hosts)


def test_the_signature_is_what_the_documented_check_accepts() -> None:
    verify = documented_verifier()
    body = b'{"event":"deployment.finished"}'
    now = str(int(time.time()))
    sig = signature(SECRET, now, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify(SECRET.encode(), now, body, sig)
    assert not verify(SECRET.encode(), now, body + b" ", sig)  # body changed
    assert not verify(b"another-secret-xxxxxxxx", now, body, sig)
    stale = str(int(time.time()) - 3600)
    assert not verify(SECRET.encode(), stale, body, signature(SECRET, stale, body))  # replay
    assert not verify(SECRET.encode(), "soon", body, sig)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    settings = WebhookSettings(retry_initial=10, retry_max_interval=300)
    for attempts in range(1, 60):
        full = min(300.0, 10 * 2.0 ** (attempts - 1))
        for _ in range(20):
            assert full / 2 <= backoff(attempts, settings) <= full


# --------------------------------------------------------------------------- the outbox


@pytest.fixture
def store(db_url: str) -> WebhookStore:
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    return WebhookStore(engine, SecretBox(), lease=60)


def _finished_deployment(engine: sa.Engine, deploy_id: str, finished_at: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            db.deployments.insert().values(
                deploy_id=deploy_id,
                client_id="web-1",
                command_type="deploy.shell",
                status="success",
                stage="",
                progress=100,
                last_seq=3,
                request={"params": {"script": "echo do-not-send"}},
                deadline=finished_at + 60,
                created_at=finished_at - 5,
                updated_at=finished_at,
                finished_at=finished_at,
                rollback_wanted=False,
            )
        )


def test_the_outbox_holds_one_delivery_per_webhook_and_event(store: WebhookStore) -> None:
    hook = store.create("https://example.com/a", [DEPLOYMENT_FINISHED], SECRET, "")
    other = store.create("https://example.com/b", [AGENT_CONNECTED], SECRET, "")
    event = Event(DEPLOYMENT_FINISHED, "d1", {"deploy_id": "d1"})
    targets = {DEPLOYMENT_FINISHED: [hook["id"]], AGENT_CONNECTED: [other["id"]]}
    assert store.enqueue([event], targets) == 1
    assert store.enqueue([event, event], targets) == 0  # the same fact again: nothing new
    rows = store.deliveries(hook["id"])
    assert [r["event"] for r in rows] == [DEPLOYMENT_FINISHED] and rows[0]["status"] == "pending"
    assert store.deliveries(other["id"]) == []
    assert store.enqueue([event], {DEPLOYMENT_FINISHED: ["0000000000000000"]}) == 0  # gone
    ping = store.ping(other["id"])
    assert ping is not None and [r["id"] for r in store.deliveries(other["id"])] == [ping]
    assert store.ping("0000000000000000") is None

    # The secret is sealed in the database and shown by no view.
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(db.webhooks.c.secret)).scalars().all()
    assert all(SECRET not in json.dumps(s) for s in stored)
    assert SECRET not in json.dumps(store.all())


def test_the_sweep_enqueues_finishes_the_listeners_missed_once(store: WebhookStore) -> None:
    _finished_deployment(store.engine, "before", time.time() - 30)
    hook = store.create("https://example.com/a", [DEPLOYMENT_FINISHED], SECRET, "")
    store.create("https://example.com/b", [AGENT_CONNECTED], SECRET, "")
    _finished_deployment(store.engine, "after-1", time.time())
    _finished_deployment(store.engine, "after-2", time.time())

    assert store.sweep_finished(window=3600) == 2  # not the one before the webhook
    assert store.sweep_finished(window=3600) == 0
    rows = store.deliveries(hook["id"])
    assert len(rows) == 2
    with store.engine.connect() as conn:
        payloads = conn.execute(sa.select(db.webhook_deliveries.c.payload)).scalars().all()
    data = [json.loads(p)["data"] for p in payloads]
    assert {d["deploy_id"] for d in data} == {"after-1", "after-2"}
    assert all(d["status"] == "success" and d["type"] == "deploy.shell" for d in data)
    assert all("do-not-send" not in p for p in payloads)  # never the request


def test_the_sweep_enqueues_finished_rollouts_once(store: WebhookStore) -> None:
    rollouts = RolloutStore(store.engine, store.box)
    hook = store.create("https://example.com/a", [ROLLOUT_FINISHED], SECRET, "")

    def rollout() -> str:
        row = rollouts.create(
            kind="shell",
            command_type="deploy.shell",
            request={"script": "echo not-in-the-payload"},
            deadline_seconds=60,
            secret_env={"K": "rollout-secret"},
            selector=None,
            strategy=resolve_strategy({}, 2),
            strategy_asked={},
            client_ids=["web-1", "web-2"],
            created_by="admin",
        )
        rollout_id: str = row["rollout_id"]
        return rollout_id

    done, running = rollout(), rollout()
    assert rollouts.transition(done, ("pending",), "aborted", "stopped by a test")
    assert store.sweep_rollouts(rollouts, window=3600) == 1  # not the one still pending
    assert store.sweep_rollouts(rollouts, window=3600) == 0
    with store.engine.connect() as conn:
        (payload,) = conn.execute(sa.select(db.webhook_deliveries.c.payload)).scalars()
    body = json.loads(payload)
    assert body["event"] == ROLLOUT_FINISHED and body["data"]["rollout_id"] == done
    assert body["data"]["status"] == "aborted" and body["data"]["total"] == 2
    assert running not in payload and "not-in-the-payload" not in payload
    assert "rollout-secret" not in payload
    assert len(store.deliveries(hook["id"])) == 1


def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_ends(
    store: WebhookStore,
) -> None:
    hook = store.create("https://example.com/a", [AGENT_CONNECTED], SECRET, "")
    store.enqueue([Event(AGENT_CONNECTED, "x", {})], {AGENT_CONNECTED: [hook["id"]]})
    first = store.due(10)
    assert len(first) == 1 and store.open_secret(first[0]) == SECRET
    assert store.due(10) == []  # another worker (or replica) leaves it alone
    assert len(store.due(10, now=time.time() + 61)) == 1  # a dead worker's claim expires

    claimed = store.due(10, now=time.time() + 200)
    store.record_attempt(claimed[0], ok=False, status_code=503, error="HTTP 503", next_attempt_at=1)
    row = store.deliveries(hook["id"])[0]
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("pending", 1, 503)
    again = store.due(10)
    store.record_attempt(again[0], ok=True, status_code=200, error=None, next_attempt_at=None)
    row = store.deliveries(hook["id"])[0]
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("delivered", 2, None)
    assert store.all()[0]["deliveries"] == {"pending": 0, "delivered": 1, "failed": 0}

    assert store.prune(before=time.time() - 60) == 0
    assert store.prune(before=time.time() + 1) == 1
    assert store.remove(hook["id"]) and not store.remove(hook["id"])


# --------------------------------------------------------------------------- the worker


@asynccontextmanager
async def running(settings: WebhookSettings, tmp_path: Any) -> AsyncIterator[Webhooks]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hooks.db'}")
    await asyncio.to_thread(db.upgrade, engine)
    hooks = Webhooks(engine, SecretBox(), settings)
    task = asyncio.create_task(hooks.run())
    try:
        yield hooks
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        engine.dispose()


async def wait_row(
    hooks: Webhooks, webhook_id: str, predicate: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        rows = await asyncio.to_thread(hooks.store.deliveries, webhook_id)
        if rows and predicate(rows[0]):
            return rows[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no such delivery: {rows}")


async def subscribe_and_emit(hooks: Webhooks, url: str) -> str:
    """A webhook to ``url`` for agent.connected, and one such event; the webhook's id."""
    made = await asyncio.to_thread(hooks.store.create, url, [AGENT_CONNECTED], SECRET, "")
    hooks.invalidate()
    hooks.agent_connected("web-1", "127.0.0.1")
    webhook_id: str = made["id"]
    return webhook_id


async def settle(
    tmp_path: Any,
    mode: str,
    settings: WebhookSettings,
    query: str = "",
    tls: tuple[Path, Path] | None = None,
) -> tuple[dict[str, Any], Receiver]:
    """Send one event to a receiver answering as ``mode`` until its delivery is delivered or
    failed; that delivery's log entry, and the receiver (stopped)."""
    receiver = Receiver(SECRET, mode=mode, tls=tls).start()
    try:
        async with running(settings, tmp_path) as hooks:
            webhook_id = await subscribe_and_emit(hooks, receiver.url + query)
            row = await wait_row(hooks, webhook_id, lambda r: r["status"] != "pending")
        return row, receiver
    finally:
        receiver.stop()


QUICK = {"allow_http_hosts": ALLOW, "retry_initial": 0.05, "max_age": 0.5}


async def test_a_delivery_is_failed_after_max_age(tmp_path: Any) -> None:
    row, receiver = await settle(tmp_path, "error", WebhookSettings(**QUICK))
    assert row["status"] == "failed" and row["next_attempt_at"] is None
    assert row["attempts"] >= 1 and row["last_status_code"] == 500
    assert row["last_error"] == "HTTP 500: no"
    assert len(receiver.got) == row["attempts"]


async def test_redirects_are_not_followed(tmp_path: Any) -> None:
    row, receiver = await settle(tmp_path, "redirect", WebhookSettings(**QUICK))
    assert row["status"] == "failed" and row["last_status_code"] == 302
    assert "redirects are not followed" in row["last_error"]
    assert {d.path for d in receiver.got} == {"/hook"}  # never /elsewhere


async def test_a_huge_answer_is_read_only_in_part(tmp_path: Any) -> None:
    # 200 announcing 50 MB and sending ~13 MB: delivered after 4 KiB of it.
    settings = WebhookSettings(allow_http_hosts=ALLOW, max_response_bytes=4096)
    row, _receiver = await settle(tmp_path, "huge", settings)
    assert (row["status"], row["last_status_code"], row["attempts"]) == ("delivered", 200, 1)


async def test_a_host_no_longer_allowed_gets_nothing(tmp_path: Any) -> None:
    # Made while 127.0.0.1 was allowed (an older config), sent under today's.
    row, receiver = await settle(tmp_path, "ok", WebhookSettings(allow_http_hosts=()))
    assert row["status"] == "failed" and "not allowed" in row["last_error"]
    assert row["last_status_code"] is None and receiver.got == []


async def test_logs_name_the_host_never_the_path_or_the_secret(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="deploy_core.server.webhooks"):
        row, _receiver = await settle(
            tmp_path, "error", WebhookSettings(**QUICK), "?token=receiver-token-123"
        )
    assert row["status"] == "failed"
    assert "gave up" in caplog.text and "127.0.0.1" in caplog.text
    assert SECRET not in caplog.text and "receiver-token-123" not in caplog.text


async def test_an_answer_dripping_in_is_cut_at_the_timeout(tmp_path: Any) -> None:
    settings = WebhookSettings(**QUICK | {"timeout": 1.0})
    row, _receiver = await settle(tmp_path, "drip", settings)
    assert row["status"] == "failed" and row["last_status_code"] is None
    assert row["last_error"] == "no complete answer within 1 s"


async def test_two_workers_on_one_database_send_each_delivery_once(db_url: str) -> None:
    receiver = Receiver(SECRET, mode="slow").start()  # so that neither can take them all
    engines = [db.make_engine(db_url) for _ in range(2)]
    await asyncio.to_thread(db.upgrade, engines[0])
    box = SecretBox()
    settings = WebhookSettings(allow_http_hosts=ALLOW, concurrency=3)
    workers = [Webhooks(engine, box, settings) for engine in engines]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        made = await asyncio.to_thread(
            workers[0].store.create, receiver.url, [AGENT_CONNECTED], SECRET, ""
        )
        for worker in workers:
            worker.invalidate()
        for i in range(30):
            workers[0].agent_connected(f"web-{i}", "127.0.0.1")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            rows = await asyncio.to_thread(workers[1].store.deliveries, made["id"])
            if len(rows) == 30 and {r["status"] for r in rows} == {"delivered"}:
                break
            await asyncio.sleep(0.1)
        assert len(rows) == 30 and all(r["attempts"] == 1 for r in rows), rows
        ids = [d.headers["x-deploy-center-delivery"] for d in receiver.got]
        assert sorted(ids) == sorted(r["id"] for r in rows)  # each once, none twice
        assert all(w.delivered > 0 for w in workers)  # both took a share
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in engines:
            engine.dispose()
        receiver.stop()


async def test_a_stopping_server_hands_its_claimed_deliveries_back(tmp_path: Any) -> None:
    receiver = Receiver(SECRET, mode="hold").start()
    settings = WebhookSettings(allow_http_hosts=ALLOW, timeout=30)
    try:
        async with running(settings, tmp_path) as hooks:
            webhook_id = await subscribe_and_emit(hooks, receiver.url)
            assert await asyncio.to_thread(receiver.holding.wait, 30)
        # Stopped mid-attempt: due again now, not after the claim's lease, and no attempt
        # counted (the receiver never answered).
        (row,) = await asyncio.to_thread(hooks.store.deliveries, webhook_id)
        assert row["status"] == "pending" and row["attempts"] == 0
        assert len(await asyncio.to_thread(hooks.store.due, 10)) == 1
    finally:
        receiver.stop()


async def test_a_removed_webhook_gets_nothing_more(tmp_path: Any) -> None:
    receiver = Receiver(SECRET, mode="error").start()
    settings = WebhookSettings(allow_http_hosts=ALLOW, retry_initial=0.05)
    try:
        async with running(settings, tmp_path) as hooks:
            webhook_id = await subscribe_and_emit(hooks, receiver.url)
            await asyncio.to_thread(receiver.wait_for, lambda got: len(got) >= 2)
            assert await asyncio.to_thread(hooks.store.remove, webhook_id)
            hooks.invalidate()
            await asyncio.sleep(0.5)  # let an attempt in flight end
            calls = len(receiver.got)
            hooks.agent_connected("web-1", "127.0.0.1")
            await asyncio.sleep(1.5)  # many retry intervals
            assert len(receiver.got) == calls
            assert await asyncio.to_thread(hooks.store.deliveries, webhook_id) == []
    finally:
        receiver.stop()


async def test_a_flood_of_events_is_bounded_and_never_blocks(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hooks.db'}")
    await asyncio.to_thread(db.upgrade, engine)
    hooks = Webhooks(engine, SecretBox(), WebhookSettings())  # not running: nothing drains
    try:
        with caplog.at_level(logging.WARNING, logger="deploy_core.server.webhooks"):
            for i in range(Webhooks.QUEUE_SIZE + 2500):
                hooks.agent_connected(f"web-{i}", "127.0.0.1")  # returns at once, always
        assert hooks.dropped == 2500
        assert len(caplog.records) == 3  # the first drop, then one line per 1000
    finally:
        engine.dispose()


async def test_https_targets_are_verified_against_the_configured_cas(tmp_path: Path) -> None:
    certs = ensure_server_certs(tmp_path / "receiver-ca", hostnames=("127.0.0.1",))
    tls = (certs.cert, certs.key)
    trusted = WebhookSettings(ca_file=str(certs.ca_cert))
    row, receiver = await settle(tmp_path / "a", "ok", trusted, tls=tls)
    assert row["status"] == "delivered" and receiver.got[0].verified

    # The system's CAs do not know the receiver's: no request is ever made.
    untrusted = WebhookSettings(retry_initial=0.05, max_age=0.3)
    row, receiver = await settle(tmp_path / "b", "ok", untrusted, tls=tls)
    assert row["status"] == "failed" and "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
    assert receiver.got == []


async def test_a_receiver_that_never_answers_leaves_the_others_room(tmp_path: Any) -> None:
    stuck = Receiver(SECRET, mode="hold").start()
    healthy = Receiver(SECRET).start()
    # Two slots; without a cap per webhook the stuck one would hold both for 30 s.
    settings = WebhookSettings(allow_http_hosts=ALLOW, concurrency=2, timeout=30)
    try:
        async with running(settings, tmp_path) as hooks:
            for receiver in (stuck, healthy):
                await asyncio.to_thread(
                    hooks.store.create, receiver.url, [AGENT_CONNECTED], SECRET, ""
                )
            hooks.invalidate()
            for i in range(6):
                hooks.agent_connected(f"web-{i}", "127.0.0.1")
            await asyncio.to_thread(healthy.wait_for, lambda got: len(got) == 6, 20)
            assert stuck.holding.is_set() and len(stuck.got) == 1  # one slot, held
    finally:
        stuck.stop()
        healthy.stop()

"""Webhooks end to end (issue 16 §2): a real server and agent as processes, a real HTTP
receiver on loopback that verifies each signature with the snippet of docs/operating.md.

A deployment's finish is delivered once with its payload; a receiver that refuses
connections, then answers 500, then comes back gets the delivery retried and delivered,
with the attempts in the delivery log; a server killed with deliveries pending sends them
after its restart; a receiver that holds its requests never delays a deployment; bad
input is refused with a clear error; the secret shows nowhere (API, logs, database file).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from webhook_receiver import Receiver

from deploy_core.testing import DeployCenter

SECRET = "whsec-3b1f0e9a8d7c6b5a4f3e2d1c0b9a8f7e"
SCRIPT_SECRET = "script-secret-value-77aa"
CONFIG = """
[webhooks]
allow_http_hosts = ["127.0.0.1"]
retry_initial = 0.2
retry_max_interval = 1
timeout = 3
sweep_interval = 1
"""


@contextmanager
def started(root: Path, db_url: str | None = None) -> Iterator[DeployCenter]:
    """A server with webhooks to 127.0.0.1 allowed and quick retries, and agent web-1."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "server.toml"
    config.write_text(CONFIG)
    c = DeployCenter(root / "center", db_url=db_url)
    c.server_args = ["--config", str(config)]
    try:
        c.start_server()
        c.start_agent("web-1")
        yield c
    finally:
        c.close()


@pytest.fixture
def center(tmp_path: Path) -> Iterator[DeployCenter]:
    with started(tmp_path) as c:
        yield c


def add_webhook(center: DeployCenter, url: str, events: list[str]) -> str:
    hook = center.api.add_webhook(url, events, SECRET, description="test")
    assert "secret" not in hook and SECRET not in json.dumps(hook)
    webhook_id: str = hook["id"]
    return webhook_id


def wait_log(
    center: DeployCenter,
    webhook_id: str,
    predicate: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """The delivery log once ``predicate`` holds for it."""
    end = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < end:
        rows = center.api.webhook_deliveries(webhook_id)
        if predicate(rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"delivery log never matched: {rows}")


def test_a_finished_deployment_is_delivered_once_signed_with_its_payload(
    center: DeployCenter, tmp_path: Path
) -> None:
    receiver = Receiver(SECRET).start()
    try:
        secret_file = tmp_path / "hook.secret"
        secret_file.write_text(SECRET + "\n")
        added = center.deployctl(
            "webhook", "add", receiver.url,
            "--events", "deployment.started,deployment.finished",
            "--secret-file", str(secret_file), "--description", "CI gate", "--json",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        webhook_id = json.loads(added.stdout)["id"]
        assert SECRET not in added.stdout + added.stderr

        deploy_id = center.deploy(
            "shell",
            "web-1",
            script=f'UNSHOWN="{SCRIPT_SECRET}"; echo "token $TOKEN"; exit 3',
            secret_env={"TOKEN": "env-secret-4242"},
        )
        record = center.wait(deploy_id)
        assert record["status"] == "failed"

        receiver.wait_for(lambda got: any(
            d.verified and d.payload["event"] == "deployment.finished" for d in got
        ))  # fmt: skip
        rows = wait_log(
            center, webhook_id, lambda rows: {r["event"] for r in rows if r["status"] ==
                                              "delivered"} == {"deployment.started",
                                                               "deployment.finished"}
        )  # fmt: skip
        time.sleep(3)  # three sweeps: none may enqueue the finish again
        finished = receiver.events("deployment.finished")
        assert len(finished) == 1, [d.payload for d in finished]
        assert len(receiver.events("deployment.started")) == 1
        assert all(d.verified for d in receiver.got)

        delivery = finished[0]
        payload = delivery.payload
        assert payload["id"] == delivery.headers["x-deploy-center-delivery"]
        assert delivery.headers["content-type"] == "application/json"
        data = payload["data"]
        assert data["deploy_id"] == deploy_id and data["client_id"] == "web-1"
        assert data["type"] == "deploy.shell" and data["status"] == "failed"
        assert data["finished"] is True and data["error"]
        assert data["finished_at"] == record["finished_at"]
        assert data["created_at"] == record["created_at"]
        body = delivery.body.decode()
        for secret in (SCRIPT_SECRET, "env-secret-4242", SECRET):
            assert secret not in body  # neither the script, its secret_env nor the key
        assert "token ***" in data["error"]  # the output's tail, secret_env masked

        log = json.loads(center.deployctl("webhook", "deliveries", webhook_id, "--json").stdout)
        entry = next(r for r in log if r["event"] == "deployment.finished")
        assert entry["id"] == payload["id"]
        assert (entry["status"], entry["attempts"], entry["last_status_code"]) == (
            "delivered",
            1,
            200,
        )
        assert entry["last_error"] is None and entry["finished_at"]
        assert len(rows) == 2

        listed = center.deployctl("webhook", "list")
        assert listed.returncode == 0 and webhook_id in listed.stdout
        assert "2 delivered" in listed.stdout and SECRET not in listed.stdout

        pinged = center.deployctl("webhook", "ping", webhook_id)
        assert pinged.returncode == 0, pinged.stderr
        receiver.wait_for(lambda got: any(d.payload["event"] == "ping" for d in got))
        (ping,) = [d for d in receiver.got if d.payload["event"] == "ping"]
        assert ping.verified and ping.payload["data"] == {"webhook_id": webhook_id}
        assert ping.payload["id"] in pinged.stdout
        wait_log(center, webhook_id, lambda rows: rows[0]["event"] == "ping"
                 and rows[0]["status"] == "delivered")  # fmt: skip
        missing = center.deployctl("webhook", "ping", "0123456789abcdef")
        assert missing.returncode == 1 and "no webhook" in missing.stderr
    finally:
        receiver.stop()


def test_a_receiver_that_refuses_then_fails_then_comes_back_gets_it(
    center: DeployCenter,
) -> None:
    receiver = Receiver(SECRET)  # not listening yet: connections are refused
    try:
        webhook_id = add_webhook(center, receiver.url, ["deployment.finished"])
        deploy_id = center.deploy("shell", "web-1", script="echo ok")
        assert center.wait(deploy_id)["status"] == "success"

        rows = wait_log(center, webhook_id, lambda rows: bool(rows) and rows[0]["attempts"] >= 2)
        assert rows[0]["status"] == "pending" and rows[0]["last_status_code"] is None
        assert "refused" in rows[0]["last_error"].lower(), rows[0]
        assert rows[0]["next_attempt_at"] is not None

        receiver.mode = "error"
        receiver.start()
        receiver.wait_for(lambda got: len(got) >= 2)
        rows = wait_log(center, webhook_id, lambda rows: rows[0]["last_status_code"] == 500)
        assert rows[0]["status"] == "pending" and rows[0]["last_error"].startswith("HTTP 500")

        receiver.mode = "ok"
        rows = wait_log(center, webhook_id, lambda rows: rows[0]["status"] == "delivered")
        assert len(rows) == 1
        assert rows[0]["attempts"] >= 4 and rows[0]["last_status_code"] == 200
        got = receiver.got
        assert all(d.verified for d in got)
        assert len({d.headers["x-deploy-center-delivery"] for d in got}) == 1  # one delivery
        assert len({d.body for d in got}) == 1  # the same body each time, newly signed
        assert [d.answered for d in got].count(200) == 1
        assert got[-1].payload["data"]["deploy_id"] == deploy_id
    finally:
        receiver.stop()


def test_pending_deliveries_are_sent_after_the_server_is_killed_and_restarted(
    tmp_path: Path, db_url: str
) -> None:
    receiver = Receiver(SECRET)
    with started(tmp_path, db_url) as center:
        killed_and_restarted(center, receiver)


def killed_and_restarted(center: DeployCenter, receiver: Receiver) -> None:
    try:
        webhook_id = add_webhook(center, receiver.url, ["deployment.finished"])
        for i in range(2):  # one at a time: the client is busy meanwhile
            center.wait(center.deploy("shell", "web-1", script=f"echo {i}"))
        rows = wait_log(
            center, webhook_id, lambda rows: len(rows) == 2 and all(r["attempts"] for r in rows)
        )
        assert {r["status"] for r in rows} == {"pending"}

        center.stop_server(signal.SIGKILL)
        receiver.start()
        center.start_server()

        # A delivery the killed server had claimed for an attempt is left alone until its claim
        # runs out (the attempt timeout, 3 s here, + 60 s), as on a replica that died: wait
        # past that, not just past the quick retries.
        claim = 3 + 60
        receiver.wait_for(
            lambda got: len({d.payload["data"]["deploy_id"] for d in got}) == 2,
            timeout=claim + 60,
        )
        rows = wait_log(
            center,
            webhook_id,
            lambda rows: {r["status"] for r in rows} == {"delivered"},
            timeout=claim + 60,
        )
        assert {d.payload["id"] for d in receiver.got} == {r["id"] for r in rows}
        assert all(d.verified for d in receiver.got)
    finally:
        receiver.stop()


def test_a_receiver_that_holds_its_requests_never_delays_a_deployment(
    center: DeployCenter,
) -> None:
    receiver = Receiver(SECRET)
    receiver.mode = "hold"
    receiver.start()
    try:
        webhook_id = add_webhook(
            center, receiver.url, ["deployment.started", "deployment.finished"]
        )
        first = center.deploy("shell", "web-1", script="echo one")
        assert center.wait(first)["status"] == "success"
        assert receiver.holding.wait(60), "the receiver was never called"
        # The receiver is holding a request (past the server's 3 s timeout, too): the next
        # deployments still start, finish, and are recorded finished.
        for i in range(3):
            deploy_id = center.deploy("shell", "web-1", script=f"echo {i}")
            assert center.wait(deploy_id)["status"] == "success"
        assert not receiver.release.is_set()
        wait_log(
            center,
            webhook_id,
            lambda rows: any("no complete answer" in (r["last_error"] or "") for r in rows),
        )
        receiver.mode = "ok"
        receiver.release.set()
        wait_log(
            center,
            webhook_id,
            lambda rows: len(rows) == 8 and {r["status"] for r in rows} == {"delivered"},
        )
        assert len(receiver.events("deployment.finished")) >= 4
    finally:
        receiver.stop()


def test_agents_coming_and_going_are_told(center: DeployCenter) -> None:
    receiver = Receiver(SECRET).start()
    try:
        add_webhook(center, receiver.url, ["agent.connected", "agent.disconnected"])
        center.stop_agent("web-1")
        receiver.wait_for(lambda got: any(
            d.headers["x-deploy-center-event"] == "agent.disconnected" for d in got
        ))  # fmt: skip
        center.start_agent("web-1")
        receiver.wait_for(lambda got: any(
            d.headers["x-deploy-center-event"] == "agent.connected" for d in got
        ))  # fmt: skip
        gone = receiver.events("agent.disconnected")[0].payload["data"]
        back = receiver.events("agent.connected")[0].payload["data"]
        assert gone["client_id"] == back["client_id"] == "web-1"
        assert back["remote"] == "127.0.0.1"
    finally:
        receiver.stop()


def test_a_finished_rollout_is_told(center: DeployCenter) -> None:
    receiver = Receiver(SECRET).start()
    try:
        webhook_id = add_webhook(center, receiver.url, ["rollout.finished"])
        made = center.api.create_rollout(
            {
                "type": "shell",
                "request": {"script": "echo rolled", "secret_env": {"K": "rollout-secret-31"}},
                "targets": {"clients": ["web-1"]},
            }
        )
        rollout_id = made["rollout_id"]
        receiver.wait_for(lambda got: any(
            d.headers["x-deploy-center-event"] == "rollout.finished" for d in got
        ))  # fmt: skip
        time.sleep(2)  # two sweeps: none may enqueue it again
        (told,) = receiver.events("rollout.finished")
        data = told.payload["data"]
        assert data["rollout_id"] == rollout_id and data["status"] == "succeeded"
        assert data["total"] == 1 and data["failures"] == 0 and data["finished_at"]
        assert data["url"] == f"/api/rollouts/{rollout_id}"
        assert (
            "rollout-secret-31" not in told.body.decode()
            and "echo rolled" not in told.body.decode()
        )
        rows = center.api.webhook_deliveries(webhook_id)
        assert [(r["event"], r["status"]) for r in rows] == [("rollout.finished", "delivered")]
    finally:
        receiver.stop()


def test_bad_webhooks_are_refused_with_a_clear_error(center: DeployCenter, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    empty = tmp_path / "empty"
    empty.write_text("\n")

    def refused(*args: str, secret: Path = secret_file) -> str:
        done = center.deployctl(
            "webhook", "add", *args[:1], "--secret-file", str(secret), *args[1:]
        )
        assert done.returncode != 0, done.stdout
        return done.stderr

    assert "only https://" in refused("ftp://example.com/x", "--events", "deployment.finished")
    assert "http:// to example.com is not allowed" in refused(
        "http://example.com/x", "--events", "deployment.finished"
    )
    assert "user name or password" in refused(
        "https://user:pw@example.com/x", "--events", "deployment.finished"
    )
    assert "unknown event 'deployment.exploded'" in refused(
        "https://example.com/x", "--events", "deployment.finished,deployment.exploded"
    )
    assert "is empty" in refused(
        "https://example.com/x", "--events", "deployment.finished", secret=empty
    )
    assert "description" in refused(
        "https://example.com/x", "--events", "deployment.finished", "--description", "d" * 5000
    )
    assert center.api.webhooks() == []

    http = httpx.Client(
        base_url=f"http://127.0.0.1:{center.api_port}",
        headers={"Authorization": f"Bearer {center.cli_env()['DEPLOY_CENTER_TOKEN']}"},
        timeout=30,
    )
    good = {"url": "https://example.com/x", "events": ["deployment.finished"], "secret": SECRET}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "events": []}, "events"),
        ({**good, "events": ["rollout.exploded"]}, "unknown event 'rollout.exploded'"),
        ({**good, "secret": ""}, "secret"),
        ({**good, "secret": "short"}, "at least 16"),
        ({**good, "secret": "x" * 20 + "\n"}, "control characters"),
        ({**good, "description": "line\nbreak"}, "control characters"),
        ({**good, "url": "https://example.com/" + "a" * 3000}, "url"),
        ({**good, "url": "https://example.com/#frag"}, "fragment"),
        ({**good, "url": "https:///nohost"}, "no host"),
        ({**good, "url": "javascript:alert(1)"}, "only https://"),
        ({**good, "extra": 1}, "extra"),
        ({k: v for k, v in good.items() if k != "secret"}, "secret"),
    ]
    try:
        for body, needle in cases:
            answer = http.post("/api/webhooks", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert needle in answer.text, (needle, answer.text)
            assert SECRET not in answer.text
        assert http.delete("/api/webhooks/0123456789abcdef").status_code == 404
        assert http.get("/api/webhooks/0123456789abcdef/deliveries").status_code == 404
        made = http.post("/api/webhooks", json=good).json()
        bogus = http.get(f"/api/webhooks/{made['id']}/deliveries?status=bogus")
        assert bogus.status_code == 422 and "unknown delivery status" in bogus.text

        deployer = center.api.request(
            "POST", "/api/tokens", json={"name": "ci", "scope": "deploy"}
        )["token"]
        for method, path in [("GET", "/api/webhooks"), ("POST", "/api/webhooks"),
                             ("GET", f"/api/webhooks/{made['id']}/deliveries"),
                             ("DELETE", f"/api/webhooks/{made['id']}")]:  # fmt: skip
            answer = http.request(
                method, path, json=good, headers={"Authorization": f"Bearer {deployer}"}
            )
            assert answer.status_code == 403, (method, path, answer.text)

        # The secret is never shown: not by the API, not in the logs, not in the database.
        shown = [
            http.get("/api/webhooks").text,
            http.get(f"/api/webhooks/{made['id']}").text,
            http.get(f"/api/webhooks/{made['id']}/deliveries").text,
            json.dumps(made),
        ]
        assert all(SECRET not in text for text in shown)
        data = database_bytes(center)
        assert b"webhooks" in data and SECRET.encode() not in data  # sealed
        assert http.delete(f"/api/webhooks/{made['id']}").json() == {"removed": made["id"]}
        assert http.get(f"/api/webhooks/{made['id']}").status_code == 404
    finally:
        http.close()
    assert SECRET not in center.log("server")


def database_bytes(center: DeployCenter) -> bytes:
    """The server's SQLite database as it lies on disk, with its WAL and journal."""
    data = b""
    database = center.server_dir / "deploy-center.db"
    for suffix in ("", "-wal", "-journal"):
        path = database.with_name(database.name + suffix)
        if path.exists():
            data += path.read_bytes()
    return data

"""The agent's outbox pump outlives what would stop it: an event no server can take (a name
outside the wire's pattern) is dropped with an error, and a pass whose journal read fails is
logged and tried again; every other event still reaches the server.  Before, either ended
the pump's task for the life of the agent, and nothing it reported left the outbox again.
A real server and agent over QUIC, in process."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.plugins import load_plugins
from deploy_core.testing import InProcessCenter, in_process_center


@pytest.fixture
async def center(tmp_path: Path) -> AsyncIterator[InProcessCenter]:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        yield center


async def _outbox_empties(center: InProcessCenter, timeout: float = 20.0) -> None:
    journal = center.agent.journal
    end = time.monotonic() + timeout
    while journal.outbox_size() and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert journal.outbox_size() == 0, "events left in the outbox"


async def _deploy_true(center: InProcessCenter) -> dict[str, Any]:
    answer = await center.http.post(
        "/api/deploy/shell", json={"client_id": "web-1", "script": "true"}
    )
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    waited = await center.http.get(f"/api/deploy/{deploy_id}", params={"wait": 30}, timeout=40)
    record: dict[str, Any] = waited.json()
    return record


async def test_an_event_no_server_takes_is_dropped_and_the_rest_still_go(
    center: InProcessCenter, caplog: pytest.LogCaptureFixture
) -> None:
    journal = center.agent.journal
    with caplog.at_level(logging.ERROR, logger="deploy_core.agent.runtime"):
        await asyncio.to_thread(journal.enqueue, "ev-bad", "Not A Wire Name!", {"x": 1})
        center.agent._wake.set()
        record = await _deploy_true(center)
        await _outbox_empties(center)
    assert record["finished"] and record["status"] == "success"
    assert "outbox: event ev-bad ('Not A Wire Name!') cannot be sent, dropped" in caplog.text


async def test_a_pass_whose_journal_read_fails_is_tried_again(
    center: InProcessCenter, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = center.agent.journal
    real = journal.pending
    failures: list[dict[str, Any]] = []

    def pending(**kwargs: Any) -> Any:
        if len(failures) < 2:
            failures.append(kwargs)
            raise sqlite3.OperationalError("database is locked")
        return real(**kwargs)

    monkeypatch.setattr(journal, "pending", pending)
    # The database is read only when the in-memory feed cannot tell: make every pass read.
    monkeypatch.setattr(journal, "committed", lambda **kwargs: None)
    with caplog.at_level(logging.ERROR, logger="deploy_core.agent.runtime"):
        record = await _deploy_true(center)
        await _outbox_empties(center)
    assert record["finished"] and record["status"] == "success"
    assert len(failures) == 2
    assert caplog.text.count("outbox: sending failed; trying again in 1 s") == 2


async def test_an_idle_agent_does_not_poll_its_outbox(
    center: InProcessCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every source of work wakes the pump (a commit, an acknowledgement, a connection);
    # it used to read its journal every second anyway: most of an idle fleet's CPU.
    await _deploy_true(center)
    await _outbox_empties(center)
    journal = center.agent.journal
    reads: list[str] = []
    real_pending, real_committed = journal.pending, journal.committed

    def pending(**kwargs: Any) -> Any:
        reads.append("database")
        return real_pending(**kwargs)

    def committed(**kwargs: Any) -> Any:
        reads.append("feed")
        return real_committed(**kwargs)

    monkeypatch.setattr(journal, "pending", pending)
    monkeypatch.setattr(journal, "committed", committed)
    await asyncio.sleep(2.5)
    assert reads == []
    # ... and still sends at once what is written: from the feed, with no database read.
    record = await _deploy_true(center)
    assert record["status"] == "success"
    assert "feed" in reads and "database" not in reads


async def test_an_event_left_unacknowledged_goes_again(
    center: InProcessCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy_core.agent import runtime
    from deploy_core.transport import Envelope, Kind

    monkeypatch.setattr(runtime, "RESEND_AFTER", 0.5)
    agent = center.agent
    sent: list[str] = []
    real_send = agent.connector.send

    def send(env: Envelope) -> bool:
        if env.id == "ev-once":
            sent.append(env.id)
        return bool(real_send(env))

    monkeypatch.setattr(agent.connector, "send", send)
    real_on_message = agent._on_message
    swallowed: list[str] = []

    async def on_message(env: Envelope) -> None:
        if env.kind in (Kind.ACK, Kind.ERROR) and env.ref == "ev-once" and not swallowed:
            swallowed.append(env.ref)  # the server's acknowledgement is lost on the way
            return
        await real_on_message(env)

    monkeypatch.setattr(agent.connector, "_on_message", on_message)
    await asyncio.to_thread(agent.journal.enqueue, "ev-once", "bench.once", {"x": 1})
    agent._wake.set()
    await _outbox_empties(center)
    # Answered (the server refuses a name it has no handler for, which answers it too),
    # the answer lost, the event sent again once RESEND_AFTER had passed, then answered.
    assert swallowed == ["ev-once"]
    assert sent == ["ev-once", "ev-once"]


async def test_one_ack_for_many_events_drops_them_all(
    center: InProcessCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent announces ack_refs; the server answers the reports it stored together with
    # one ACK naming them all, and the agent drops every one of them from its outbox.
    from deploy_core.agent.reporter import OutboxReporter
    from deploy_core.models import DeployStatus
    from deploy_core.transport import Envelope, Kind
    from deploy_core.transport.envelope import CAPABILITY_ACK_REFS

    agent = center.agent
    assert agent.capabilities()[CAPABILITY_ACK_REFS] is True
    answer = await center.http.post(
        "/api/deploy/shell", json={"client_id": "web-1", "script": "sleep 2"}
    )
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    end = time.monotonic() + 20
    while agent.journal.get(deploy_id) is None or agent.journal.get(deploy_id).state != "started":
        assert time.monotonic() < end, "the deployment did not start"
        await asyncio.sleep(0.02)
    acks: list[Envelope] = []
    real_on_message = agent.connector._on_message

    async def on_message(env: Envelope) -> None:
        if env.kind is Kind.ACK:
            acks.append(env)
        await real_on_message(env)

    monkeypatch.setattr(agent.connector, "_on_message", on_message)
    reporter = OutboxReporter(
        agent.journal, deploy_id=deploy_id, command_type="deploy.shell", wake=agent.executor.wake
    )
    before = {m.msg_id for m in agent.journal.pending(limit=10_000)}
    for n in range(100):  # one step of the loop: one transaction, sent together
        reporter.report(DeployStatus.SCRIPT_RUNNING, 50, "script_running", f"report {n}")
    await asyncio.wrap_future(agent.journal.barrier())
    ours = {m.msg_id for m in agent.journal.pending(limit=10_000)} - before
    assert len(ours) == 100
    await _outbox_empties(center)
    named = [ref for env in acks for ref in env.payload.get("refs", [env.ref])]
    assert ours <= set(named)
    assert max(len(env.payload.get("refs", [])) for env in acks) > 1
    record = await center.http.get(f"/api/deploy/{deploy_id}", params={"wait": 30}, timeout=40)
    assert record.json()["status"] == "success"


def test_refs_that_are_not_event_ids_count_for_nothing_but_the_ref(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from deploy_core.agent.runtime import MAX_ACK_REFS, _acknowledged
    from deploy_core.transport import Envelope, Kind

    def ack(payload: dict[str, Any], ref: str | None = "ev-1") -> Envelope:
        return Envelope(kind=Kind.ACK, ref=ref, name="deploy.status", payload=payload)

    assert _acknowledged(ack({})) == ["ev-1"]
    assert _acknowledged(ack({}, ref=None)) == []
    assert _acknowledged(ack({"refs": ["ev-1", "ev-2", "ev-2"]})) == ["ev-1", "ev-2"]
    with caplog.at_level(logging.WARNING, logger="deploy_core.agent.runtime"):
        for refs in (
            "ev-2",
            ["ev-2", 3],
            [],
            ["x" * 129],
            [f"ev-{n}" for n in range(MAX_ACK_REFS + 1)],
            [["ev-2"]],
        ):
            assert _acknowledged(ack({"refs": refs})) == ["ev-1"]
    assert caplog.text.count("refs are not a list of event ids") == 6


def _lingering_agent(tmp_path: Path) -> Any:
    """What Agent._lingering reads, around a real journal: the pump's position and its
    linger deadline."""
    from types import SimpleNamespace

    from deploy_core.agent.journal import Journal
    from deploy_core.models import DeployCommand

    journal = Journal(tmp_path / "journal.db")
    journal.accept(
        DeployCommand(
            deploy_id="d1",
            command_type="deploy.shell",
            params={"script": "true"},
            issued_at=time.time(),
            expires_at=time.time() + 60,
        )
    )
    return SimpleNamespace(journal=journal, _sent_upto=0, _linger_until=None)


def _status(journal: Any, n: int) -> None:
    from deploy_core.models import EVENT_STATUS

    journal.enqueue_report("d1", f"st-{n}", EVENT_STATUS, {"n": n}, "script_running")


def test_status_reports_wait_a_moment_for_what_follows_and_no_longer(tmp_path: Path) -> None:
    from deploy_core.agent import runtime
    from deploy_core.agent.runtime import Agent
    from deploy_core.models import EVENT_CALLBACK

    agent = _lingering_agent(tmp_path)
    journal = agent.journal
    try:
        assert Agent._lingering(agent, 100.0) is False  # nothing to send
        _status(journal, 0)
        _status(journal, 1)
        # Reports alone wait, STATUS_LINGER from when the pump first saw them, however
        # often it is woken meanwhile ...
        assert Agent._lingering(agent, 100.0) is True
        assert agent._linger_until == 100.0 + runtime.STATUS_LINGER
        assert Agent._lingering(agent, 100.0 + runtime.STATUS_LINGER / 2) is True
        # ... then go.
        assert Agent._lingering(agent, 100.0 + runtime.STATUS_LINGER) is False
        assert agent._linger_until is None
        # A callback goes at once, and takes the reports before it along.
        _status(journal, 2)
        assert Agent._lingering(agent, 200.0) is True
        journal.finish("d1", "success", "cb-1", EVENT_CALLBACK, {"ok": True})
        assert Agent._lingering(agent, 200.0) is False
        assert agent._linger_until is None
    finally:
        journal.close()


def test_other_events_and_many_reports_do_not_wait(tmp_path: Path) -> None:
    from deploy_core.agent import runtime
    from deploy_core.agent.runtime import Agent

    agent = _lingering_agent(tmp_path)
    journal = agent.journal
    try:
        journal.enqueue("ev-1", "docker.event", {"x": 1})  # an agent service's event
        assert Agent._lingering(agent, 1.0) is False
        agent._sent_upto = journal.pending()[-1].seq
        for n in range(runtime.LINGER_MAX_EVENTS):  # a flood fills its batches at once
            _status(journal, n)
        assert Agent._lingering(agent, 2.0) is False
        # The feed cannot tell after a resend (back to the oldest): the pump reads and sends.
        agent._sent_upto = 0
        assert journal.committed(after=0, limit=1) is None
        assert Agent._lingering(agent, 3.0) is False
    finally:
        journal.close()


async def test_a_running_script_s_report_reaches_the_server_while_it_runs(
    center: InProcessCenter,
) -> None:
    # Reports wait STATUS_LINGER at most: "script started" is on the server long before a
    # script of a few seconds ends.
    answer = await center.http.post(
        "/api/deploy/shell", json={"client_id": "web-1", "script": "sleep 3"}
    )
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    started = time.monotonic()
    seen: dict[str, Any] = {}
    while time.monotonic() - started < 2.5:
        seen = (await center.http.get(f"/api/deploy/{deploy_id}")).json()
        if seen["status"] == "script_running":
            break
        await asyncio.sleep(0.02)
    assert seen["status"] == "script_running" and not seen["finished"]
    record = await center.http.get(f"/api/deploy/{deploy_id}", params={"wait": 30}, timeout=40)
    assert record.json()["status"] == "success"


async def test_a_short_deployment_travels_as_one_message_and_one_transaction(
    center: InProcessCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command's ACK and the reports wait for the callback (a linger longer than any
    # machine takes to run `true`, so the test does not depend on the machine's speed):
    # the agent sends them together, the server stores them in one transaction.
    from deploy_core.agent import runtime
    from deploy_core.models import EVENT_CALLBACK, EVENT_STATUS
    from deploy_core.transport import Envelope, Kind

    await _deploy_true(center)  # the first deployment makes the agent's spare shell
    await _outbox_empties(center)
    monkeypatch.setattr(runtime, "STATUS_LINGER", 30.0)
    agent = center.agent
    sent: list[tuple[str, str, str | None]] = []  # kind, name, the journal's state then
    real_send = agent.connector.send

    def send(env: Envelope) -> bool:
        deploy_id = env.payload.get("deploy_id") or env.callback_id
        entry = agent.journal.get(deploy_id) if deploy_id else None
        sent.append((env.kind.value, env.name or "", entry.state if entry else None))
        return bool(real_send(env))

    monkeypatch.setattr(agent.connector, "send", send)
    batches = center.server.ingest.stats.batches
    record = await _deploy_true(center)
    await _outbox_empties(center)
    assert record["status"] == "success"
    ack, event = Kind.ACK.value, Kind.EVENT.value
    # The ACK left only once the callback was journaled: with the reports and it.
    assert sent == [
        (ack, "deploy.shell", "finished"),
        (event, EVENT_STATUS, "finished"),
        (event, EVENT_STATUS, "finished"),
        (event, EVENT_STATUS, "finished"),
        (event, EVENT_CALLBACK, "finished"),
    ]
    assert center.server.ingest.stats.batches == batches + 1

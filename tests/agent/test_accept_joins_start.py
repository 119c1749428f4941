"""A new command's journal write, its started mark and its first report are one transaction
(one fsync before the plugin's code runs, not two in a row), and nothing of a command runs
before that write is committed as new: a failed write or a command journaled before runs
nothing and writes no callback; a command sent again while it runs still runs once.

A real journal (its SQL statements watched with sqlite3's trace callback), a real executor,
and an in-process server and agent over real QUIC."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from deploy_core.agent.executor import Executor, NotJournaled
from deploy_core.agent.journal import FINISHED, Journal
from deploy_core.models import EVENT_CALLBACK, DeployCommand
from deploy_core.plugin import DeployContext, DeployParams, DeployType, hookimpl
from deploy_core.plugins import load_plugins
from deploy_core.testing import InProcessCenter, in_process_center
from deploy_core.transport import Envelope


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def center(tmp_path: Path) -> AsyncIterator[InProcessCenter]:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        yield center


async def deploy(center: InProcessCenter, script: str) -> str:
    answer = await center.http.post(
        "/api/deploy/shell", json={"client_id": "web-1", "script": script}
    )
    assert answer.status_code == 202, answer.text
    deploy_id: str = answer.json()["deploy_id"]
    return deploy_id


async def finished(center: InProcessCenter, deploy_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        record: dict[str, Any] = (await center.http.get(f"/api/deploy/{deploy_id}")).json()
        return record if record["finished"] else None

    result: dict[str, Any] = await eventually(check)
    return result


def transactions(statements: list[str]) -> list[list[str]]:
    """The statements the journal's writer ran, one list per transaction."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for statement in statements:
        text = " ".join(statement.split())
        if text.startswith("BEGIN"):
            current = []
        elif text == "COMMIT" and current is not None:
            groups.append(current)
            current = None
        elif current is not None:
            current.append(text)
    return groups


async def test_accept_started_mark_and_first_report_share_one_commit(
    center: InProcessCenter, tmp_path: Path
) -> None:
    journal = center.agent.journal
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    try:
        ran = tmp_path / "ran"
        deploy_id = await deploy(center, f"echo run >> {ran}")
        assert (await finished(center, deploy_id))["status"] == "success"
    finally:
        journal._db.set_trace_callback(None)
    assert ran.read_text() == "run\n"
    groups = transactions(statements)
    accepting = [
        g for g in groups if any(s.startswith("INSERT OR IGNORE INTO deployments") for s in g)
    ]
    assert len(accepting) == 1, groups
    group = accepting[0]
    # The started mark and the first report (its sequence number and its outbox row) are
    # in the command's own transaction.
    assert any(s.startswith("UPDATE deployments SET state = 'started'") for s in group)
    assert any("report_seq = report_seq + 1" in s for s in group)
    assert any(s.startswith("INSERT INTO outbox") for s in group)
    entry = journal.get(deploy_id)
    assert entry is not None and entry.final_status == "success"


async def test_a_command_sent_again_while_it_runs_runs_once(
    center: InProcessCenter, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    deploy_id = await deploy(center, f"echo run >> {ran}; sleep 1")
    server, journal = center.server, center.agent.journal

    async def journaled() -> bool:
        return bool(journal.known(deploy_id))

    await eventually(journaled)
    session = server.transport.session("web-1")
    assert session is not None
    stored = await server.db(server.records.get, deploy_id)
    assert stored is not None
    original = await server.dispatcher.command_for(stored)
    session.send(original)
    session.send(Envelope(**{**original.model_dump(), "id": "replay-while-running"}))
    assert (await finished(center, deploy_id))["status"] == "success"
    await asyncio.sleep(0.5)  # what a second run would have written by now
    assert ran.read_text() == "run\n"


class Touch(DeployParams):
    path: str


class Touched(BaseModel):
    path: str


class Toucher:
    """A deploy type that writes down that it ran."""

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        async def touch(ctx: DeployContext, params: Touch) -> Touched:
            Path(params.path).write_text("ran")
            return Touched(path=params.path)

        register(DeployType("deploy.touch", Touch, touch))


def command(path: Path) -> DeployCommand:
    return DeployCommand(
        deploy_id=uuid.uuid4().hex,
        command_type="deploy.touch",
        params={"path": str(path)},
        issued_at=time.time(),
        expires_at=time.time() + 60,
    )


def executor(journal: Journal, tmp_path: Path) -> Executor:
    return Executor(
        plugins=load_plugins(extra=[("touch", Toucher())], entry_points=False),
        journal=journal,
        data_dir=tmp_path / "data",
        wake=lambda: None,
    )


async def test_nothing_runs_when_the_commands_write_failed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        marker = tmp_path / "ran"
        cmd = command(marker)
        failed: concurrent.futures.Future[bool] = concurrent.futures.Future()
        failed.set_exception(OSError("disk full"))
        with pytest.raises(NotJournaled, match="could not store"):
            await executor(journal, tmp_path).run(cmd, accepted=failed)
        assert not marker.exists()
        assert not [m for m in journal.pending() if m.name == EVENT_CALLBACK]
    finally:
        journal.close()


async def test_nothing_runs_again_when_the_command_was_journaled_before(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    try:
        marker = tmp_path / "ran"
        cmd = command(marker)
        assert journal.accept(cmd)
        journal.finish(cmd.deploy_id, "success", "cb-1", EVENT_CALLBACK, {"status": "success"})
        assert journal.ack("cb-1")
        # The same command written again: not new.
        again = journal.submit_accept(cmd)
        with pytest.raises(NotJournaled, match="journaled before"):
            await executor(journal, tmp_path).run(cmd, accepted=again)
        assert not marker.exists()
        assert not [m for m in journal.pending() if m.name == EVENT_CALLBACK]
        entry = journal.get(cmd.deploy_id)
        # Not taken for started (a restarted agent would report it interrupted).
        assert entry is not None and entry.state == FINISHED
    finally:
        journal.close()

"""A command delivered again, or past its expiry, never runs (a replayed command is refused):
an in-process server and agent over real QUIC, the server sending raw command envelopes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deploy_core.plugins import load_plugins
from deploy_core.testing import InProcessCenter, in_process_center
from deploy_core.transport import Envelope


class Pair:
    def __init__(self, center: InProcessCenter) -> None:
        self.server = center.server
        self.agent = center.agent
        self.http = center.http

    async def deploy(self, script: str, **fields: Any) -> str:
        answer = await self.http.post(
            "/api/deploy/shell", json={"client_id": "web-1", "script": script, **fields}
        )
        assert answer.status_code == 202, answer.text
        deploy_id: str = answer.json()["deploy_id"]
        return deploy_id

    async def record(self, deploy_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/api/deploy/{deploy_id}")
        record: dict[str, Any] = answer.json()
        return record


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        yield Pair(center)


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_command_sent_again_runs_once(pair: Pair, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    deploy_id = await pair.deploy(f"echo run >> {ran}")

    async def finished() -> dict[str, Any] | None:
        record = await pair.record(deploy_id)
        return record if record["finished"] else None

    assert (await eventually(finished))["status"] == "success"
    session = pair.server.transport.session("web-1")
    assert session is not None
    stored = await pair.server.db(pair.server.records.get, deploy_id)
    assert stored is not None
    original = await pair.server.dispatcher.command_for(stored)
    # The same envelope again, and the same command under a new message id.
    session.send(original)
    session.send(Envelope(**{**original.model_dump(), "id": "replay-1"}))
    await asyncio.sleep(1.5)
    assert ran.read_text() == "run\n"
    assert pair.agent.journal.get(deploy_id) is not None


async def test_a_command_past_its_expiry_is_refused_unrun(pair: Pair, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    deploy_id = await pair.deploy(f"echo run >> {ran}", deadline=600)
    stored = await pair.server.db(pair.server.records.get, deploy_id)
    assert stored is not None

    async def finished() -> dict[str, Any] | None:
        record = await pair.record(deploy_id)
        return record if record["finished"] else None

    await eventually(finished)
    ran.unlink()
    # A captured command for a new id, replayed after its expiry.
    stale = await pair.server.dispatcher.command_for(stored)
    payload = {**stale.payload, "deploy_id": "stale-1", "expires_at": time.time() - 1}
    session = pair.server.transport.session("web-1")
    assert session is not None
    session.send(
        Envelope(
            **{
                **stale.model_dump(),
                "id": "cmd-stale-1",
                "callback_id": "stale-1",
                "payload": payload,
            }
        )
    )

    def refused() -> Any:
        entry = pair.agent.journal.get("stale-1")
        return entry if entry is not None and entry.final_status else None

    async def check() -> Any:
        return refused()

    entry = await eventually(check)
    assert entry.final_status == "timeout"
    assert not ran.exists()

"""``POST /api/deploy/{kind}`` and the waiting ``GET /api/deploy/{id}?wait=`` on the hot path
(issue 13): the POST reads and checks the client on the thread that records the deployment
(an unknown client is a 404 and records nothing), and the waiting GET answers with the
record its change published, the same the plain GET then reads.  An in-process server and
agent over real QUIC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.client import DeployClient
from deploy_core.plugins import load_plugins
from deploy_core.testing import InProcessCenter, in_process_center


@pytest.fixture
async def center(tmp_path: Path) -> AsyncIterator[InProcessCenter]:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        yield center


async def post(center: InProcessCenter, client_id: str, script: str) -> Any:
    return await center.http.post(
        "/api/deploy/shell", json={"client_id": client_id, "script": script}
    )


async def test_an_unknown_client_is_a_404_and_records_nothing(center: InProcessCenter) -> None:
    answer = await post(center, "nobody", "true")
    assert answer.status_code == 404, answer.text
    assert "unknown client 'nobody'" in answer.json()["error"]
    server = center.server
    assert await server.db(server.records.get_client, "nobody") is None
    # The lock of the real client was not touched: it deploys at once.
    answer = await post(center, "web-1", "true")
    assert answer.status_code == 202, answer.text


async def test_the_waiting_get_answers_the_terminal_record(center: InProcessCenter) -> None:
    answer = await post(center, "web-1", "echo hello")
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    waited = await center.http.get(f"/api/deploy/{deploy_id}", params={"wait": 20}, timeout=30)
    assert waited.status_code == 200
    record = waited.json()
    assert record["finished"] and record["status"] == "success"
    assert record["result"]["stdout_tail"] == "hello\n"
    # What the waiting GET answered is the stored record.
    assert (await center.http.get(f"/api/deploy/{deploy_id}")).json() == record


async def test_the_waiting_get_with_since_answers_each_change(center: InProcessCenter) -> None:
    answer = await post(center, "web-1", "true")
    deploy_id = answer.json()["deploy_id"]
    record = (await center.http.get(f"/api/deploy/{deploy_id}")).json()
    seen = [record]
    end = time.monotonic() + 20
    while not record["finished"] and time.monotonic() < end:
        newer = await center.http.get(
            f"/api/deploy/{deploy_id}",
            params={"wait": 10, "since": record["updated_ts"]},
            timeout=30,
        )
        record = newer.json()
        assert record["updated_ts"] > seen[-1]["updated_ts"]
        seen.append(record)
    assert record["finished"] and record["status"] == "success"
    assert (await center.http.get(f"/api/deploy/{deploy_id}")).json() == record


async def test_a_waiting_get_of_an_unknown_deployment_is_a_404(center: InProcessCenter) -> None:
    before = center.server.listeners.count()  # the server's own subscribers
    answer = await center.http.get("/api/deploy/no-such-id", params={"wait": 5})
    assert answer.status_code == 404
    assert center.server.listeners.count() == before  # its subscription was dropped


async def test_deploy_client_wait_returns_the_final_record_or_times_out(
    center: InProcessCenter,
) -> None:
    """``DeployClient.wait`` long-polls for the end (one request, not one per change)."""
    server = center.server
    api = DeployClient(server.api_url, server.state.admin_token)
    try:
        answer = await post(center, "web-1", "sleep 0.3; echo done")
        record = await asyncio.to_thread(api.wait, answer.json()["deploy_id"], timeout=60)
        assert record["finished"] and record["status"] == "success"
        assert record["result"]["stdout_tail"] == "done\n"

        answer = await post(center, "web-1", "sleep 30")
        deploy_id = answer.json()["deploy_id"]
        with pytest.raises(TimeoutError, match="did not finish within 1s"):
            await asyncio.to_thread(api.wait, deploy_id, timeout=1)
        assert not (await center.http.get(f"/api/deploy/{deploy_id}")).json()["finished"]
    finally:
        api.close()

"""A rollback never silently undoes a newer deployment (issue 10 §3).

Deploy v3, v4 and v5 of an app directory (shell deployments with a snapshot rollback), then
roll back v4: refused with 409 naming v5, nothing changes; with ``cascade`` v5 is rolled back
first, then v4, each linked, and the directory is v3's again. ``GET /api/clients/{id}`` shows
the live deployment of the target throughout. A rollback done by the agent after the
server's deadline shows in the record's ``rollback``.

Real server and agent in the test's event loop, real QUIC, real shell scripts and files.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from deploy_core.plugins import load_plugins
from deploy_core.server.db import deployments
from deploy_core.testing import InProcessCenter, in_process_center

pytestmark = pytest.mark.asyncio
CLIENT = "web-1"


@pytest_asyncio.fixture
async def center(tmp_path: Path) -> AsyncIterator[InProcessCenter]:
    plugins = load_plugins()
    for needed in ("deploy.shell",):
        if plugins.deploy_types.get(needed) is None:
            from conftest import missing_part

            missing_part(f"the {needed} plugin is not installed")
    if plugins.rollback_strategies.get("snapshot") is None:
        from conftest import missing_part

        missing_part("the rollback_basic plugin (snapshot strategy) is not installed")
    async with in_process_center(tmp_path, plugins, client_id=CLIENT) as c:
        yield c


async def wait_finished(http: httpx.AsyncClient, deploy_id: str, timeout: float = 90) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        answer = await http.get(f"/api/deploy/{deploy_id}", params={"wait": 10})
        record = answer.json()
        if record["finished"]:
            return record
    raise AssertionError(f"deployment {deploy_id} did not finish within {timeout} s")


async def deploy_version(http: httpx.AsyncClient, app: Path, version: str, keep: int = 3) -> str:
    script = f"echo {version} > version; echo {version} > {version}.txt"
    answer = await http.post(
        "/api/deploy/shell",
        json={
            "client_id": CLIENT,
            "script": script,
            "workdir": str(app),
            "rollback": {"strategy": "snapshot", "path": str(app), "keep": keep},
        },
    )
    assert answer.status_code == 202, answer.text
    deploy_id: str = answer.json()["deploy_id"]
    record = await wait_finished(http, deploy_id)
    assert record["status"] == "success", record["error"]
    assert (app / "version").read_text() == f"{version}\n"
    return deploy_id


async def live_on(http: httpx.AsyncClient, app: Path) -> str | None:
    client = (await http.get(f"/api/clients/{CLIENT}")).json()
    target = f"deploy.shell:{app}"
    found = [live["deploy_id"] for live in client["live"] if live["target"] == target]
    assert len(found) <= 1, client["live"]
    return found[0] if found else None


async def test_rolling_back_a_superseded_deployment_is_409_or_cascades_newest_first(
    center: InProcessCenter, tmp_path: Path
) -> None:
    http = center.http
    app = tmp_path / "app"
    app.mkdir()
    v3 = await deploy_version(http, app, "v3")
    v4 = await deploy_version(http, app, "v4")
    v5 = await deploy_version(http, app, "v5")
    assert await live_on(http, app) == v5

    # Rolling back v4 would silently undo v5: refused, naming v5, and nothing moves.
    refused = await http.post(f"/api/deploy/{v4}/rollback")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert v5 in body["error"] and "cascade" in body["error"]
    assert body["detail"] == {"newer": [v5], "target": f"deploy.shell:{app}"}
    assert (app / "version").read_text() == "v5\n"
    for deploy_id in (v4, v5):
        record = (await http.get(f"/api/deploy/{deploy_id}")).json()
        assert record["status"] == "success" and record["rolled_back_by"] is None
    assert await live_on(http, app) == v5

    # A body that is not the options is refused before anything happens.
    bad = await http.post(f"/api/deploy/{v4}/rollback", json={"cascade": "yes"})
    assert bad.status_code == 422, bad.text

    # With cascade: v5 first, then v4, each its own rollback linked to what it undoes.
    accepted = await http.post(f"/api/deploy/{v4}/rollback", json={"cascade": True})
    assert accepted.status_code == 202, accepted.text
    first = accepted.json()
    assert first["rollback_of"] == v5 and first["cascade"] == [v5, v4]
    undo5 = await wait_finished(http, first["deploy_id"])
    assert undo5["status"] == "rolled_back", undo5["error"]
    assert undo5["rollback_of"] == v5

    end = time.monotonic() + 60
    while (undo4_id := (await http.get(f"/api/deploy/{v4}")).json()["rolled_back_by"]) is None:
        assert time.monotonic() < end, "the cascade did not go on to v4"
        await asyncio.sleep(0.1)
    undo4 = await wait_finished(http, undo4_id)
    assert undo4["status"] == "rolled_back", undo4["error"]
    assert undo4["rollback_of"] == v4
    assert undo4["created_at"] > undo5["created_at"]  # newest first

    # The directory is v3's again, file for file.
    assert (app / "version").read_text() == "v3\n"
    assert sorted(p.name for p in app.iterdir()) == ["v3.txt", "version"]
    assert (await http.get(f"/api/deploy/{v5}")).json()["rolled_back_by"] == first["deploy_id"]
    assert await live_on(http, app) == v3

    # The live deployment can be rolled back plainly; v4 cannot be undone twice.
    again = await http.post(f"/api/deploy/{v4}/rollback", json={"cascade": True})
    assert again.status_code == 409 and "already rolled back" in again.json()["error"]


async def test_a_cascade_stops_where_a_rollback_fails_and_says_so(
    center: InProcessCenter, tmp_path: Path
) -> None:
    http = center.http
    app = tmp_path / "app"
    app.mkdir()
    ids = []
    for version, undo in (("v1", "exit 0"), ("v2", "exit 7")):  # v2's rollback fails
        script = (
            f'if [ "$DEPLOY_ACTION" = rollback ]; then echo undo {version} >> log; {undo}; fi; '
            f"echo {version} > version"
        )
        answer = await http.post(
            "/api/deploy/shell",
            json={
                "client_id": CLIENT,
                "script": script,
                "workdir": str(app),
                "rollback": {"strategy": "inline"},
            },
        )
        assert answer.status_code == 202, answer.text
        record = await wait_finished(http, answer.json()["deploy_id"])
        assert record["status"] == "success", record["error"]
        ids.append(record["deploy_id"])
    v1, v2 = ids

    accepted = await http.post(f"/api/deploy/{v1}/rollback", json={"cascade": True})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["cascade"] == [v2, v1]
    undo2 = await wait_finished(http, accepted.json()["deploy_id"])
    assert undo2["status"] == "rollback_failed"
    await asyncio.sleep(0.5)  # a next rollback, if wrongly asked for, would be recorded by now
    assert (await http.get(f"/api/deploy/{v1}")).json()["rolled_back_by"] is None
    assert (app / "log").read_text() == "undo v2\n"  # v1 was not touched
    history = (await http.get(f"/api/deploy/{undo2['deploy_id']}/status")).json()["history"]
    notes = [row["message"] for row in history if "cascade stopped" in row["message"]]
    assert notes == [f"cascade stopped: this rollback ended rollback_failed; not rolled back: {v1}"]


async def test_other_targets_do_not_block_a_rollback(
    center: InProcessCenter, tmp_path: Path
) -> None:
    http = center.http
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    first = await deploy_version(http, one, "v1")
    await deploy_version(http, two, "v1")  # newer, but another target
    accepted = await http.post(f"/api/deploy/{first}/rollback")
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["cascade"] == [first]
    record = await wait_finished(http, accepted.json()["deploy_id"])
    assert record["status"] == "rolled_back", record["error"]
    assert sorted(p.name for p in one.iterdir()) == []
    assert (two / "version").read_text() == "v1\n"


async def test_a_rollback_whose_snapshot_was_pruned_is_refused_at_the_api(
    center: InProcessCenter, tmp_path: Path
) -> None:
    http = center.http
    app = tmp_path / "app"
    app.mkdir()
    v1 = await deploy_version(http, app, "v1", keep=1)
    v2 = await deploy_version(http, app, "v2", keep=1)  # keeps only its own snapshot
    undo2 = await http.post(f"/api/deploy/{v2}/rollback")
    assert undo2.status_code == 202, undo2.text
    record = await wait_finished(http, undo2.json()["deploy_id"])
    assert record["status"] == "rolled_back", record["error"]
    assert (app / "version").read_text() == "v1\n"
    assert await live_on(http, app) == v1

    # v1 is live again, but the snapshot taken before it is gone: refused at once.
    refused = await http.post(f"/api/deploy/{v1}/rollback")
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert f"pruned when deployment {v2} succeeded" in error
    assert "newest 1 snapshots" in error
    assert (app / "version").read_text() == "v1\n"
    assert (await http.get(f"/api/deploy/{v1}")).json()["rolled_back_by"] is None


async def test_a_rollback_after_the_servers_deadline_shows_in_the_record(
    center: InProcessCenter, tmp_path: Path
) -> None:
    http = center.http
    marks = tmp_path / "marks"
    started = tmp_path / "started"
    script = (
        f'if [ "$DEPLOY_ACTION" = rollback ]; then echo undone >> {marks}; exit 0; fi; '
        f"touch {started}; sleep 2; exit 1"
    )
    answer = await http.post(
        "/api/deploy/shell",
        json={"client_id": CLIENT, "script": script, "rollback": {"strategy": "inline"}},
    )
    assert answer.status_code == 202, answer.text
    deploy_id = answer.json()["deploy_id"]
    end = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < end, "the script did not start"
        await asyncio.sleep(0.05)
    # The server's clock runs ahead of the agent's: its deadline passes while the agent,
    # by its own clock, still has time to fail and roll back.
    with center.server.engine.begin() as conn:
        conn.execute(
            deployments.update()
            .where(deployments.c.deploy_id == deploy_id)
            .values(deadline=time.time() - 1)
        )
    record = await wait_finished(http, deploy_id)
    assert record["status"] == "timeout"  # the server's verdict
    assert record["agent_status"] is None and record["rollback"] is None
    while record["agent_status"] is None:
        assert time.monotonic() < end, "no late callback from the agent"
        await asyncio.sleep(0.2)
        record = (await http.get(f"/api/deploy/{deploy_id}")).json()
    assert record["status"] == "timeout"
    assert record["agent_status"] == "rolled_back"
    # The agent's rollback is in the record's rollback, where readers look.
    assert record["rollback"] is not None, record
    assert record["rollback"]["strategy"] == "inline" and record["rollback"]["success"]
    assert marks.read_text().startswith("undone\n")

"""Shell deployments end to end: real server process, real agent processes, real QUIC."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    """One server with agents web-1 and web-2, shared by the tests that leave them running."""
    c = DeployCenter(tmp_path_factory.mktemp("center"))
    try:
        c.start_server()
        c.start_agent("web-1")
        c.start_agent("web-2")
        yield c
    finally:
        c.close()


def statuses(center: DeployCenter, deploy_id: str) -> list[str]:
    return [row["status"] for row in center.api.history(deploy_id)]


def test_success_reports_every_stage_and_the_output(center: DeployCenter, tmp_path: Path) -> None:
    deploy_id = center.deploy(
        "shell",
        "web-1",
        script="echo hello from $RELEASE; pwd; echo oops >&2",
        env={"RELEASE": "r42"},
        workdir=str(tmp_path),
        timeout=30,
    )
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "success"
    assert record["progress"] == 100
    assert record["result"]["exit_code"] == 0
    assert "hello from r42" in record["result"]["stdout_tail"]
    assert str(tmp_path) in record["result"]["stdout_tail"]
    assert "oops" in record["result"]["stderr_tail"]
    history = statuses(center, deploy_id)
    assert history[0] == "pending"
    assert history.index("executing") < history.index("script_running") < history.index("success")
    progress = [row["progress"] for row in center.api.history(deploy_id)]
    assert progress == sorted(progress)
    lines = [line["line"] for line in center.api.logs(deploy_id)["lines"]]
    assert "hello from r42" in lines and "oops" in lines
    assert center.api.request("GET", "/api/clients/web-1")["busy_with"] is None


def test_nonzero_exit_fails_with_exit_code_and_stderr(center: DeployCenter) -> None:
    deploy_id = center.deploy(
        "shell", "web-1", script="echo about to fail; echo broken config >&2; exit 3"
    )
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "failed"
    assert record["result"]["exit_code"] == 3
    assert "broken config" in record["result"]["stderr_tail"]
    assert "exited with code 3" in record["error"]
    assert record["error"].endswith(
        "; not rolled back: deploy.shell has no default rollback and the request named none "
        '(add "rollback": {"strategy": ...} to the request, or set '
        '[defaults.rollback."deploy.shell"] in the server config)'
    )
    assert record["rollback"] is None


def test_timeout_kills_the_script_and_its_children(center: DeployCenter, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; sleep 300"
    deploy_id = center.deploy("shell", "web-1", script=script, timeout=1.5)
    record = center.wait(deploy_id, timeout=30)
    assert record["status"] == "timeout"
    assert record["result"]["timed_out"] is True
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the script's child outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_busy_client_is_refused_with_the_holder(center: DeployCenter) -> None:
    first = center.deploy("shell", "web-2", script="sleep 2", timeout=30)
    with pytest.raises(ApiError) as err:
        center.deploy("shell", "web-2", script="true")
    assert err.value.status == 409
    assert first in str(err.value) and "busy" in str(err.value)
    assert center.wait(first, timeout=30)["status"] == "success"
    # Released on the terminal state: the next one is accepted.
    assert (
        center.wait(center.deploy("shell", "web-2", script="true"), timeout=30)["status"]
        == "success"
    )


def test_two_clients_deploy_in_parallel(center: DeployCenter, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    script = f"echo start-$DEPLOY_ID >> {marks}; sleep 1.5; echo end-$DEPLOY_ID >> {marks}"
    a = center.deploy("shell", "web-1", script=script)
    b = center.deploy("shell", "web-2", script=script)
    assert center.wait(a)["status"] == "success"
    assert center.wait(b)["status"] == "success"
    lines = marks.read_text().split()
    # Both started before either ended: they ran at the same time.
    assert lines[:2] == sorted([f"start-{a}", f"start-{b}"]) or set(lines[:2]) == {
        f"start-{a}",
        f"start-{b}",
    }


def test_bad_bodies_are_refused_naming_the_field(center: DeployCenter) -> None:
    cases = [
        ({"client_id": "web-1"}, "script"),
        ({"client_id": "web-1", "script": "true", "timeout": -1}, "timeout"),
        ({"client_id": "web-1", "script": "true", "workdir": "relative/dir"}, "workdir"),
        ({"client_id": "../etc", "script": "true"}, "client_id"),
        ({"client_id": "web-1", "script": "true", "surprise": 1}, "surprise"),
        ({"client_id": "web-1", "script": "x" * (100 * 1024 + 1)}, "script"),
        ({"client_id": "web-1", "script": "true", "env": {"BAD-NAME": "1"}}, "env"),
        (
            {"client_id": "web-1", "script": "true", "health_checks": [{"type": "nope"}]},
            "health_checks",
        ),
    ]
    for body, field in cases:
        with pytest.raises(ApiError) as err:
            center.api.deploy("shell", body)
        assert err.value.status == 422, body
        assert field in str(err.value), (field, str(err.value))
    raw = httpx.post(
        f"{center.api.url}/api/deploy/shell", content=b"{not json", headers=center.api.http.headers
    )
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]


def test_unknown_names_get_404(center: DeployCenter) -> None:
    with pytest.raises(ApiError) as err:
        center.api.deploy("shell", {"client_id": "nobody", "script": "true"})
    assert err.value.status == 404 and "nobody" in str(err.value)
    with pytest.raises(ApiError) as err:
        center.api.deploy("teleport", {"client_id": "web-1"})
    assert err.value.status == 404 and "teleport" in str(err.value)
    with pytest.raises(ApiError) as err:
        center.api.get("0" * 32)
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        center.api.list("nobody")
    assert err.value.status == 404


def test_every_route_needs_the_token(center: DeployCenter) -> None:
    some_id = center.deploy("shell", "web-1", script="true")
    center.wait(some_id)
    routes = [
        ("POST", "/api/deploy/shell"),
        ("GET", f"/api/deploy/{some_id}"),
        ("GET", f"/api/deploy/{some_id}/status"),
        ("GET", f"/api/deploy/{some_id}/logs"),
        ("GET", "/api/deploy/web-1/list"),
        ("GET", "/api/clients"),
        ("GET", "/api/clients/web-1"),
        ("GET", "/api/plugins"),
        ("GET", "/api/schemas"),
        ("GET", "/api/info"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
            response = httpx.request(
                method,
                center.api.url + path,
                headers=headers,
                json={"client_id": "web-1", "script": "true"},
            )
            assert response.status_code == 401, (method, path, headers)


def test_list_is_newest_first_and_paginated(center: DeployCenter) -> None:
    ids = []
    for _ in range(3):
        ids.append(center.deploy("shell", "web-2", script="true"))
        center.wait(ids[-1])
    page = center.api.list("web-2", limit=2, offset=0)
    assert [r["deploy_id"] for r in page["items"]] == [ids[2], ids[1]]
    assert page["total"] >= 3
    assert center.api.list("web-2", limit=1, offset=2)["items"][0]["deploy_id"] == ids[0]


def test_all_deployments_are_listed_with_filters(center: DeployCenter) -> None:
    failed = center.deploy("shell", "web-1", script="exit 9")
    center.wait(failed)
    everything = center.api.request("GET", "/api/deployments", params={"limit": 500})
    ids = [r["deploy_id"] for r in everything["items"]]
    assert failed in ids and everything["total"] >= len(ids)
    created = [r["created_at"] for r in everything["items"]]
    assert created == sorted(created, reverse=True)
    only_failed = center.api.request(
        "GET", "/api/deployments", params={"status": "failed", "client_id": "web-1"}
    )
    assert only_failed["items"] and all(
        r["status"] == "failed" and r["client_id"] == "web-1" for r in only_failed["items"]
    )
    for bad in ({"status": "exploded"}, {"client_id": "../x"}, {"limit": 0}):
        with pytest.raises(ApiError) as err:
            center.api.request("GET", "/api/deployments", params=bad)
        assert err.value.status == 422


def test_clients_and_plugins_are_listed(center: DeployCenter) -> None:
    clients = {c["client_id"]: c for c in center.api.clients()}
    assert clients["web-1"]["connected"] is True
    assert "deploy.shell" in clients["web-1"]["capabilities"]["deploy_types"]
    assert "deploy_shell" in clients["web-1"]["plugins"]
    names = {p["name"]: p for p in center.api.plugins()}
    assert names["deploy_shell"]["deploy_types"] == ["deploy.shell"]
    assert "deploy_register_deploy_types" in names["deploy_shell"]["hooks"]


# ----------------------------------------------------------------------- faults


def test_agent_killed_mid_deployment_reaches_terminal_and_never_reruns(tmp_path: Path) -> None:
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        c.start_agent("a1")
        ran = tmp_path / "ran"
        deploy_id = c.deploy("shell", "a1", script=f"echo run >> {ran}; sleep 3", timeout=60)
        _wait_for(lambda: ran.exists(), 20)
        c.stop_agent("a1", signal.SIGKILL)
        c.start_agent("a1")
        record = c.wait(deploy_id, timeout=30)
        assert record["status"] == "failed"
        assert "agent restarted" in record["error"]
        time.sleep(4)  # the orphaned script finishes; nothing runs it again
        assert ran.read_text().count("run") == 1
        # The client is free again.
        assert c.wait(c.deploy("shell", "a1", script="true"))["status"] == "success"
    finally:
        c.close()


def test_server_restarted_mid_deployment_still_gets_the_callback(tmp_path: Path) -> None:
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        c.start_agent("a1")
        started = tmp_path / "started"
        deploy_id = c.deploy(
            "shell", "a1", script=f"touch {started}; sleep 3; echo finished", timeout=60
        )
        _wait_for(started.exists, 20)
        c.stop_server(signal.SIGKILL)
        time.sleep(1)
        c.start_server()
        record = c.wait(deploy_id, timeout=60)
        assert record["status"] == "success"
        assert "finished" in record["result"]["stdout_tail"]
        assert "script_running" in statuses(c, deploy_id)
    finally:
        c.close()


def test_offline_client_runs_on_reconnect_or_times_out_unrun(tmp_path: Path) -> None:
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        c.start_agent("a1")
        c.stop_agent("a1")
        c.wait_connected("a1", connected=False)
        ran = tmp_path / "ran"
        later = c.deploy("shell", "a1", script=f"echo later >> {ran}")
        assert c.api.get(later)["status"] == "pending"
        c.start_agent("a1")
        assert c.wait(later, timeout=30)["status"] == "success"
        c.stop_agent("a1")
        c.wait_connected("a1", connected=False)
        never = c.deploy("shell", "a1", script=f"echo never >> {ran}", deadline=1.5)
        record = c.wait(never, timeout=30)
        assert record["status"] == "timeout"
        assert "never started" in record["error"]
        c.start_agent("a1")
        time.sleep(2)
        assert ran.read_text().split() == ["later"]
    finally:
        c.close()


def test_wrong_join_token_is_refused_and_gets_no_command(tmp_path: Path) -> None:
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        bad = tmp_path / "bad.token"
        bad.write_text("not-the-token\n")
        c.start_agent("intruder", join_token_file=bad, wait=False)
        _wait_for(lambda: "join token refused" in c.log("agent-intruder"), 20)
        assert all(cl["client_id"] != "intruder" for cl in c.api.clients())
        with pytest.raises(ApiError) as err:
            c.deploy("shell", "intruder", script="true")
        assert err.value.status == 404
    finally:
        c.close()


def test_agent_without_the_plugin_is_refused_with_409(tmp_path: Path) -> None:
    c = DeployCenter(tmp_path / "c")
    try:
        c.start_server()
        c.env["DEPLOY_CORE_DISABLE_PLUGINS"] = "deploy_shell"
        c.start_agent("bare")
        with pytest.raises(ApiError) as err:
            c.deploy("shell", "bare", script="true")
        assert err.value.status == 409 and "deploy.shell" in str(err.value)
    finally:
        c.close()


def test_concurrent_requests_for_one_client_admit_exactly_one(center: DeployCenter) -> None:
    results: list[object] = []
    barrier = threading.Barrier(6)

    def attempt() -> None:
        barrier.wait(10)
        try:
            results.append(center.deploy("shell", "web-1", script="sleep 0.5"))
        except ApiError as exc:
            results.append(exc.status)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    accepted = [r for r in results if isinstance(r, str)]
    assert len(accepted) == 1 and results.count(409) == 5
    center.wait(accepted[0])


def _wait_for(predicate: object, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")

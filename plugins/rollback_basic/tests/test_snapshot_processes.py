"""The snapshot records what runs from its directory and, on restore, stops what the failed
release started there and keeps what ran before (SPEC deploy-29): real processes — ``sleep``
with its working directory there, ``python -m http.server`` listening on a loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rollback_bed import undo

from rollback_basic.running import processes_under, unit_states
from rollback_basic.snapshot import SNAPSHOT, SnapshotParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever is left of them is killed after it."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start(procs: list[subprocess.Popen[bytes]], cwd: Path, *argv: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        list(argv), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    procs.append(proc)
    return proc


def wait_until(what: str, done: object, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if done():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


async def test_restore_stops_what_the_failed_release_started_and_keeps_what_ran_before(
    tmp_path: Path, deployment, failed, spawned
) -> None:
    app = tmp_path / "srv" / "app"
    app.mkdir(parents=True)
    (app / "index.html").write_text("v1\n")
    port = _free_port()
    server = start(
        spawned, app, sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"
    )
    old_sleep = start(spawned, app, "sleep", "300")
    wait_until("the http.server listening", lambda: _listening(port))
    params = SnapshotParams.model_validate({"strategy": "snapshot", "path": str(app)})
    ctx, reporter = deployment("d-1")

    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))

    recorded = {p["pid"]: p for p in state["processes"]}
    assert set(recorded) == {server.pid, old_sleep.pid}
    assert recorded[server.pid]["ports"] == [f"127.0.0.1:{port}"]
    assert "http.server" in recorded[server.pid]["cmdline"]
    assert recorded[old_sleep.pid]["cmdline"] == "sleep 300"
    assert recorded[old_sleep.pid]["cwd"] == str(app)
    assert any(f"(listening 127.0.0.1:{port})" in line for line in reporter.lines())

    # The failed release: new files, and a process of its own running from the directory.
    (app / "index.html").write_text("v2\n")
    (app / "sub").mkdir()
    new_sleep = start(spawned, app / "sub", "sleep", "301")
    wait_until("the new sleep in /proc", lambda: new_sleep.pid in _pids_under(app))
    failed(ctx, "health check failed", params.model_dump(), state)

    report = await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert new_sleep.wait(15) is not None  # stopped (SIGTERM ends sleep)
    assert old_sleep.poll() is None and server.poll() is None  # what ran before still runs
    assert _listening(port)
    assert (app / "index.html").read_text() == "v1\n" and not (app / "sub").exists()
    assert report is not None
    assert [p["pid"] for p in report.details["stopped"]] == [new_sleep.pid]
    assert report.details["stopped"][0]["cmdline"] == "sleep 301"
    assert sorted(p["pid"] for p in report.details["still_running"]) == sorted(recorded)
    assert report.details["ran_before_and_gone"] == []
    assert report.message == (f"{app} restored; stopped 1 process(es) the deployment started there")
    assert any("restore: stopping pid" in line and "sleep 301" in line for line in reporter.lines())


async def test_a_process_that_ignores_sigterm_is_killed(
    tmp_path: Path, deployment, failed, spawned
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    params = SnapshotParams.model_validate({"strategy": "snapshot", "path": str(app)})
    ctx, _ = deployment("d-1")
    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    assert state["processes"] == []
    stubborn = start(spawned, app, "sh", "-c", "trap '' TERM; echo ready; sleep 300 & wait")
    wait_until("the stubborn shell in /proc", lambda: stubborn.pid in _pids_under(app))
    failed(ctx, "failed", params.model_dump(), state)

    report = await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    assert stubborn.wait(15) is not None
    assert report is not None
    stopped = {p["pid"] for p in report.details["stopped"]}
    assert stubborn.pid in stopped
    assert _pids_under(app) == set()


async def test_units_are_recorded_with_their_state_and_reported(
    tmp_path: Path, deployment, failed
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    unit = "deploy-center-test-absent.service"
    params = SnapshotParams.model_validate(
        {"strategy": "snapshot", "path": str(app), "units": [unit]}
    )
    ctx, reporter = deployment("d-1")

    state = await SNAPSHOT.prepare(ctx, undo(ctx, params))
    failed(ctx, "failed", params.model_dump(), state)
    report = await SNAPSHOT.rollback(ctx, undo(ctx, params, state))

    # Whatever systemd says here (inactive, or unknown without systemd): recorded as said,
    # and a unit that was not active is not started by the restore.
    assert state["units"] == unit_states([unit])
    assert state["units"][unit] != "active"
    assert any(line.startswith(f"snapshot: unit {unit} is ") for line in reporter.lines())
    assert report is not None and report.details["restored"] == []
    assert any(f"restore: unit {unit} was" in line for line in reporter.lines())


def test_unit_names_are_checked() -> None:
    with pytest.raises(ValueError, match="units"):
        SnapshotParams.model_validate(
            {"strategy": "snapshot", "path": "/srv/app", "units": ["--now; reboot"]}
        )


def _pids_under(root: Path) -> set[int]:
    return {p.pid for p in processes_under(str(root))}

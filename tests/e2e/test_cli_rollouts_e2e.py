"""``deployctl rollout`` as an operator types it, against a real server and four real agents
with labels (three ``role=web``, one ``role=db``), ``deployctl`` run as a process.

A rollout by selector with ``--wait`` shows a line per batch and exits 0, and the script ran
once on each web host and not on the db host; a failing one exits 1 and lists the failing
host with its error, and with ``--on-failure rollback`` undoes the host that succeeded; a
``--wait`` left running through a canary pause ends 0 after ``rollout promote`` (``resume``
is refused with the server's reason); ``pause`` holds a running rollout and ``resume`` lets
it finish; ``abort`` ends one and a second ``abort`` says it already ended.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.plugins import get_plugins
from deploy_core.testing import DeployCenter

WEB = ["web-1", "web-2", "web-3"]
LABELS = {"web-1": "web", "web-2": "web", "web-3": "web", "db-1": "db"}
WAIT = ("--wait", "--wait-timeout", "300")


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    plugins = get_plugins()
    if plugins.deploy_types.get("deploy.shell") is None:
        from conftest import missing_part

        missing_part("the deploy.shell plugin is not installed")
    c = DeployCenter(tmp_path_factory.mktemp("rollouts"))
    try:
        c.start_server()
        for client_id, role in LABELS.items():
            c.start_agent(
                client_id, config=f'[agent]\nlabels = {{role = "{role}", zone = "eu-1"}}\n'
            )
        yield c
    finally:
        c.close()


def _targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for batch in record["batches"] for t in batch["targets"]]


def _wait_for(center: DeployCenter, rollout_id: str, what: str, test: Any) -> dict[str, Any]:
    """The rollout once ``test(record)`` holds (at most 120 s)."""
    end = time.monotonic() + 120
    while True:
        record: dict[str, Any] = center.api.rollout(rollout_id)
        if test(record):
            return record
        assert time.monotonic() < end, f"rollout never {what}: {record}"
        time.sleep(0.2)


def _start(center: DeployCenter, *args: str) -> str:
    """``deployctl rollout shell ARGS`` without --wait; the rollout id it printed."""
    done = center.deployctl("rollout", "shell", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    rollout_id: str = json.loads(done.stdout)["rollout_id"]
    return rollout_id


def _rollout_and_wait(center: DeployCenter, *args: str) -> subprocess.CompletedProcess[str]:
    """``deployctl rollout shell ARGS --wait`` to its end."""
    done: subprocess.CompletedProcess[str] = center.deployctl("rollout", "shell", *args, *WAIT)
    return done


def test_rollout_by_selector_waits_shows_batches_and_exits_0(
    center: DeployCenter, tmp_path: Path
) -> None:
    done = _rollout_and_wait(
        center,
        "--selector",
        "role=web,zone=eu-1",
        "--script",
        'touch "$DIR/$DEPLOY_ID"',
        "--env",
        f"DIR={tmp_path}",
        "--batch",
        "1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "succeeded: 3 hosts" in out and "success 3" in out
    for n in (1, 2, 3):
        assert f"batch {n}/3        done       1 host   success 1" in out, out
    assert "failing hosts" not in out
    assert "Traceback" not in done.stderr
    rollout_id = out.split()[1]
    record = center.api.rollout(rollout_id)
    targets = _targets(record)
    # The script ran once on each web host, and nowhere else.
    assert sorted(t["client_id"] for t in targets) == WEB
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t["deploy_id"] for t in targets)
    for target in targets:
        assert center.api.get(target["deploy_id"])["client_id"] == target["client_id"]


FAIL_AFTER_FIRST = """
if [ "$DEPLOY_ACTION" = rollback ]; then echo "$DEPLOY_ID" >> "$DIR/undone"; exit 0; fi
if mkdir "$DIR/first" 2>/dev/null; then exit 0; fi
echo boom >&2; exit 3
"""


def test_a_failing_rollout_exits_1_lists_the_failing_host_and_rolls_back(
    center: DeployCenter, tmp_path: Path
) -> None:
    if get_plugins().rollback_strategies.get("inline") is None:
        from conftest import missing_part

        missing_part("the rollback_basic plugin (inline strategy) is not installed")
    done = _rollout_and_wait(
        center,
        "--client",
        "web-1",
        "--client",
        "web-2",
        "--client",
        "web-3",
        "--script",
        FAIL_AFTER_FIRST,
        "--env",
        f"DIR={tmp_path}",
        "--rollback",
        "inline",
        "--batch",
        "1",
        "--max-failures",
        "0",
        "--on-failure",
        "rollback",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    rollout_id = out.split()[1]
    record = center.api.rollout(rollout_id)
    assert record["status"] == "rolled_back", record
    by_client = {t["client_id"]: t for t in _targets(record)}
    failed = by_client["web-2"]
    error = center.api.get(failed["deploy_id"])["error"]
    assert error and "3" in error
    line = f"  web-2  {failed['status']} (deployment {failed['deploy_id']}): {error}"
    assert "failing hosts:" in out and line in out
    assert line in done.stderr  # the live display lists it too
    # web-1 succeeded and was rolled back by the rollout; web-3 never started.
    first = by_client["web-1"]
    assert first["status"] == "success" and first["rollback_id"]
    assert f"  web-1  rollback {first['rollback_id']}: rolled_back" in out
    assert by_client["web-3"]["deploy_id"] is None or by_client["web-3"]["state"] == "skipped"
    undone = (tmp_path / "undone").read_text().split()
    assert first["rollback_id"] in undone  # the rollback ran on the host


def rollout_argv(*args: str) -> list[str]:
    """``deployctl rollout shell --wait --wait-timeout 300 ARGS`` as a process's argv."""
    return [sys.executable, "-m", "deploy_core.cli", "rollout", "shell", *WAIT, *args]


class WaitingCli:
    """``deployctl rollout shell ARGS --wait`` left running in the background, its stderr
    read line by line as it comes (a context manager: killed if still running at the end)."""

    def __init__(self, center: DeployCenter, *args: str) -> None:
        self.proc = subprocess.Popen(
            rollout_argv(*args),
            env=center.cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.shown: list[str] = []
        stderr = self.proc.stderr
        assert stderr is not None
        self.reader = threading.Thread(target=lambda: self.shown.extend(iter(stderr.readline, "")))
        self.reader.start()

    def saw(self, text: str, timeout: float = 120) -> None:
        """Wait until it printed a line with ``text`` (fail if it ends or does not)."""
        end = time.monotonic() + timeout
        while not any(text in line for line in self.shown):
            assert self.proc.poll() is None and time.monotonic() < end, self.shown
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """Its exit code, stdout and stderr once it ends."""
        out, _ = self.proc.communicate(timeout=timeout)
        self.reader.join(timeout=30)
        return self.proc.returncode, out, "".join(self.shown)

    def __enter__(self) -> WaitingCli:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def test_a_waiting_cli_follows_a_canary_pause_through_promote(center: DeployCenter) -> None:
    args = ("--selector", "role=web", "--script", "true", "--canary", "1", "--batch", "2")
    with WaitingCli(center, *args) as waiting:
        rollout_id = _newest_active(center)
        waiting.saw(f"paused: deployctl rollout promote {rollout_id}")
        refused = center.deployctl("rollout", "resume", rollout_id)
        assert refused.returncode == 1
        assert "HTTP 409" in refused.stderr and "promote it to go on" in refused.stderr
        assert "Traceback" not in refused.stderr
        promoted = center.deployctl("rollout", "promote", rollout_id)
        assert promoted.returncode == 0, promoted.stderr
        assert promoted.stdout.startswith(f"rollout {rollout_id} ")
        returncode, out, err = waiting.finish()
    assert returncode == 0, out + err
    assert "batch 1/2 canary done       1 host   success 1" in out
    assert "batch 2/2        done       2 hosts  success 2" in out


def _newest_active(center: DeployCenter) -> str:
    end = time.monotonic() + 120
    while True:
        items = center.api.rollouts(active=True)["items"]
        if items:
            rollout_id: str = items[0]["rollout_id"]
            return rollout_id
        assert time.monotonic() < end, "no rollout was created"
        time.sleep(0.2)


HOLD_UNTIL_GO = (
    'i=0; while [ ! -e "$DIR/go" ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 9; sleep 0.1; done'
)


def test_pause_holds_a_running_rollout_and_resume_lets_it_finish(
    center: DeployCenter, tmp_path: Path
) -> None:
    rollout_id = _start(
        center,
        "--selector",
        "role=web",
        "--script",
        HOLD_UNTIL_GO,
        "--env",
        f"DIR={tmp_path}",
        "--batch",
        "1",
    )
    _wait_for(center, rollout_id, "running", lambda r: r["status"] == "running")
    paused = center.deployctl("rollout", "pause", rollout_id)
    assert paused.returncode == 0, paused.stderr
    assert f"rollout {rollout_id} paused (operator)" in paused.stdout
    (tmp_path / "go").touch()
    record = _wait_for(
        center,
        rollout_id,
        "done with its first batch",
        lambda r: r["batches"][0]["state"] == "done",
    )
    # Paused: the second host has not started, however long we look.
    assert record["status"] == "paused"
    assert [t["state"] for t in record["batches"][1]["targets"]] == ["waiting"]
    resumed = center.deployctl("rollout", "resume", rollout_id)
    assert resumed.returncode == 0, resumed.stderr
    followed = center.deployctl("rollout", "status", rollout_id, "--wait", "--wait-timeout", "240")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert f"rollout {rollout_id} succeeded: 3 hosts" in followed.stdout


def test_abort_ends_a_rollout_and_a_second_abort_says_it_already_ended(
    center: DeployCenter,
) -> None:
    rollout_id = _start(center, "--selector", "role=web", "--script", "true", "--canary", "1")
    _wait_for(center, rollout_id, "paused", lambda r: r["status"] == "paused")
    aborted = center.deployctl("rollout", "abort", rollout_id)
    assert aborted.returncode == 0, aborted.stderr
    assert f"rollout {rollout_id} aborted" in aborted.stdout
    again = center.deployctl("rollout", "abort", rollout_id)
    assert again.returncode == 1
    assert "HTTP 409" in again.stderr and "already ended aborted" in again.stderr
    status = center.deployctl("rollout", "status", rollout_id, "--wait")
    assert status.returncode == 1  # followed to its end: not a success
    assert f"rollout {rollout_id} aborted" in status.stdout
    record = center.api.rollout(rollout_id)
    assert [t["state"] for t in _targets(record)][1:] == ["skipped", "skipped"]
    as_json = center.deployctl("rollout", "status", rollout_id, "--json")
    assert json.loads(as_json.stdout)["status"] == "aborted"
    listed = center.deployctl("rollout", "list", "--status", "aborted")
    assert f"{record['created_at']}  shell    rollout {rollout_id} aborted" in listed.stdout
    for client_id, listed_there in (("web-1", True), ("db-1", False)):
        mine = center.deployctl("rollout", "list", "--client", client_id, "--json")
        ids = [item["rollout_id"] for item in json.loads(mine.stdout)["items"]]
        assert (rollout_id in ids) is listed_there


def test_a_selector_matching_nothing_is_refused_with_the_servers_reason(
    center: DeployCenter,
) -> None:
    done = center.deployctl("rollout", "shell", "--selector", "role=nosuch", "--script", "true")
    assert done.returncode == 1
    assert "HTTP 422" in done.stderr and "the rollout has no targets" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_rollout_id_is_one_path_segment_whatever_is_typed(center: DeployCenter) -> None:
    rollout_id = _start(center, "--selector", "role=web", "--script", "true", "--canary", "1")
    _wait_for(center, rollout_id, "paused", lambda r: r["status"] == "paused")
    # "x/../ID" must not reach ID's route: it names no rollout.
    for command, typed in (("abort", f"x/../{rollout_id}"), ("status", f"x/../{rollout_id}")):
        done = center.deployctl("rollout", command, typed)
        assert done.returncode == 1
        assert "HTTP 404" in done.stderr and "Traceback" not in done.stderr
    for typed in ("..", "."):  # not the list route, nor /api/abort
        done = center.deployctl("rollout", "abort", typed)
        assert done.returncode == 1 and f"no rollout '{typed}'" in done.stderr, done.stderr
    assert center.api.rollout(rollout_id)["status"] == "paused"
    assert center.deployctl("rollout", "abort", rollout_id).returncode == 0


def test_on_a_terminal_the_display_is_redrawn_in_place_within_its_width(
    center: DeployCenter, tmp_path: Path
) -> None:
    """stderr on a pseudo-terminal 60 columns wide: each frame moves up exactly the rows
    the one before took, and no line is wider than the terminal (a wrapped line would
    take two rows and the redraw would climb into what was printed above)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    # Batches of one, each host waiting for its own file.
    script, env = HOLD_UNTIL_GO.replace("go", "go-$DEPLOY_ID"), ("--env", f"DIR={tmp_path}")
    proc = subprocess.Popen(
        rollout_argv("--selector", "role=web", "--batch", "1", "--script", script, *env),
        env=center.cli_env(),
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = bytearray()
    try:
        rollout_id = _newest_active(center)
        for batch in range(3):  # let each host go only after the CLI has had time to show it
            target = _wait_for(
                center,
                rollout_id,
                f"running batch {batch + 1}",
                lambda r, b=batch: r["batches"][b]["targets"][0]["deploy_id"] is not None,
            )["batches"][batch]["targets"][0]
            end = time.monotonic() + 60
            while f">batch {batch + 1}/3".encode() not in seen:
                assert time.monotonic() < end, seen.decode(errors="replace")
                if select.select([master], [], [], 0.2)[0]:
                    seen += os.read(master, 65536)
            (tmp_path / f"go-{target['deploy_id']}").touch()
        end = time.monotonic() + 120
        while proc.poll() is None or select.select([master], [], [], 0.2)[0]:
            assert time.monotonic() < end, seen.decode(errors="replace")
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # EIO: the other end is closed
                    break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        os.close(master)
    assert proc.returncode == 0
    parts = re.split(r"(?:\x1b\[(\d+)A)?\r\x1b\[J", seen.decode().replace("\r\n", "\n"))
    frames = [part.rstrip("\n").split("\n") for part in parts[2::2]]
    ups = parts[3::2]
    assert len(frames) >= 3, parts
    for before, up in zip(frames, ups, strict=False):
        assert up is not None and int(up) == len(before)
    for frame in frames:
        assert all(len(line) <= 59 for line in frame), frame
    assert any(line.endswith("…") for frame in frames for line in frame)  # cut, not wrapped


def test_rollout_tar_uploads_once_and_takes_the_deploy_commands_options(
    center: DeployCenter, tmp_path: Path
) -> None:
    if get_plugins().deploy_types.get("deploy.tar") is None:
        from conftest import missing_part

        missing_part("the deploy_tar plugin is not installed")
    package = tmp_path / "app.tar.gz"
    with tarfile.open(package, "w:gz") as tar:
        data = b"v1\n"
        info = tarfile.TarInfo("app.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    target_dir = tmp_path / "srv"
    done = center.deployctl(
        "rollout", "tar", "--client", "web-1", "--client", "web-2", "--package", str(package),
        "--target-dir", str(target_dir), "--keep-releases", "3", "--batch", "1", *WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count(" uploaded (") == 1  # the plugin's own code ran, once
    rollout_id = done.stdout.split()[1]
    targets = _targets(center.api.rollout(rollout_id))
    assert [t["client_id"] for t in targets] == ["web-1", "web-2"]
    for target in targets:
        release = target_dir / "releases" / target["deploy_id"]
        assert (release / "app.txt").read_text() == "v1\n"
    assert os.readlink(target_dir / "current") == f"releases/{targets[-1]['deploy_id']}"


def test_a_waiting_cli_rides_out_a_server_restart(center: DeployCenter, tmp_path: Path) -> None:
    """It stops and starts the module's server (the later tests find it back)."""
    script = HOLD_UNTIL_GO + '; echo ran >> "$DIR/ran-$DEPLOY_ID"'
    args = ("--selector", "role=web", "--script", script, "--env", f"DIR={tmp_path}")
    with WaitingCli(center, *args, "--batch", "1") as waiting:
        rollout_id = _newest_active(center)
        _wait_for(center, rollout_id, "running", lambda r: r["status"] == "running")
        center.stop_server()
        waiting.saw("cannot reach the server")
        center.start_server()
        (tmp_path / "go").touch()
        returncode, out, err = waiting.finish()
    assert returncode == 0, out + err
    assert "(still watching until the wait timeout)" in err
    assert f"rollout {rollout_id} succeeded: 3 hosts" in out
    targets = _targets(center.api.rollout(rollout_id))
    # Each web host ran the script once, restart or not.
    for target in targets:
        assert (tmp_path / f"ran-{target['deploy_id']}").read_text() == "ran\n"
    assert len(list(tmp_path.glob("ran-*"))) == 3


def test_following_a_rollout_that_does_not_change_asks_less_and_less_often(
    center: DeployCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canary waiting for approval, watched: the reads space out (1, 2, 4, then every 5
    seconds), on a clock the test moves, against the real server."""
    rollout_id = _start(center, "--selector", "role=web", "--script", "true", "--canary", "1")
    _wait_for(center, rollout_id, "paused", lambda r: r["status"] == "paused")
    now = [0.0]
    slept: list[float] = []

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

    monkeypatch.setattr("deploy_core.client.time", Clock)
    with pytest.raises(TimeoutError, match="did not finish within 30s"):
        for record in center.api.watch_rollout(rollout_id, timeout=30):
            assert record["status"] == "paused"
    assert slept == [1, 2, 4, 5, 5, 5, 5, 3]  # 30 s of a rollout that stayed the same
    assert center.deployctl("rollout", "abort", rollout_id).returncode == 0

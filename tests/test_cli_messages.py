"""What ``deployctl`` says when something is missing or wrong: a missing database driver, a
server that does not answer, durations in retention messages, and the user guide's copy of
``db upgrade``'s output (issue 11, "Docs that are wrong")."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.durations import human_duration
from deploy_core.server import db
from deploy_core.testing import DeployCenter, free_port

ROOT = Path(__file__).resolve().parent.parent
# deployctl with psycopg made unimportable, as on a machine without the postgres extra.
WITHOUT_PSYCOPG = [
    sys.executable,
    "-c",
    "import sys; sys.modules['psycopg'] = None; from deploy_core.cli import main; main()",
]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.2 s"),
        (2.0, "2 s"),
        (2.31481e-05 * 86400, "2 s"),
        (30, "30 s"),
        (90, "1.5 min"),
        (12 * 3600, "12 h"),
        (86400, "1 day"),
        (30 * 86400, "30 days"),
    ],
)
def test_durations_read_as_a_person_writes_them(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    "command",
    [
        ["db", "upgrade", "--db", "postgresql://deploy:pw@127.0.0.1:1/deploy"],
        ["db", "prune", "--older-than", "30d", "--db", "postgres://deploy:pw@127.0.0.1:1/deploy"],
        ["server", "--db", "postgresql://deploy:pw@127.0.0.1:1/deploy", "--api-port", "0"],
    ],
    ids=["db-upgrade", "db-prune", "server"],
)
def test_a_missing_postgres_driver_says_what_to_install(tmp_path: Path, command: list[str]) -> None:
    done = subprocess.run(
        [*WITHOUT_PSYCOPG, *command, "--state-dir", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "needs the postgresql driver psycopg" in done.stderr
    assert "pip install 'deploy-core[postgres]'" in done.stderr
    assert "pw@" not in done.stderr  # the password stays hidden
    assert not (tmp_path / "s" / "server.json").exists()


def test_a_database_url_sqlalchemy_cannot_use_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["db", "upgrade", "--db", "nosuchdb://x/y", "--state-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "'nosuchdb://x/y' is not a database URL" in result.output


def test_a_relative_sqlite_path_is_made_absolute(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "db", "upgrade", "--db", "sqlite:///rel.db"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rel.db").stat().st_size > 0


@pytest.mark.parametrize("command", [["list"], ["logs", "-f", "abc"], ["status", "abc"]])
def test_a_server_that_does_not_answer_is_named_with_what_to_check(command: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, [*command, "--url", url, "--token", "t"])
    assert result.exit_code == 1
    assert "HTTP 0" not in result.output
    assert f"cannot reach the server at {url}: " in result.output
    assert "Connection refused" in result.output
    assert "Check that the server is running" in result.output
    assert "--url, DEPLOY_CENTER_URL, or server.json" in result.output


def _finish_one_deployment(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    center = DeployCenter(tmp_path / "center")
    center.server_dir = state
    try:
        center.start_server(timeout=90)  # generous: busy machines start slowly
        center.start_agent("old-1", timeout=90)
        assert center.wait(center.deploy("shell", "old-1", script="true"))["status"] == "success"
    finally:
        center.close()
    return state


def test_prune_and_retention_say_durations_humanly(tmp_path: Path) -> None:
    state = _finish_one_deployment(tmp_path)
    time.sleep(2.2)  # the deployment is now more than 2 s old
    prune = [sys.executable, "-m", "deploy_core.cli", "db", "prune", "--state-dir", str(state)]
    dry = subprocess.run(
        [*prune, "--older-than", "30", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    assert dry.stdout == (
        "would delete 0 deployments and 0 rollouts finished more than 30 s ago\n"
    ), dry.stderr

    center = DeployCenter(tmp_path / "center")
    center.server_dir = state
    center.server_args = ["--retention", "2s"]
    try:
        center.start_server(timeout=90)
        end = time.monotonic() + 60
        while "retention:" not in center.log("server") and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        center.close()
    assert "retention: deleted 1 deployments finished more than 2 s ago" in center.log("server")
    assert "e-05" not in center.log("server")


def test_the_user_guide_shows_what_db_upgrade_prints(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "deploy_core.cli", "db", "upgrade", "--state-dir", str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=60, check=True).stdout
    engine = db.make_engine(db.sqlite_url(tmp_path / "deploy-center.db"))
    try:
        head = db.current_revision(engine)
    finally:
        engine.dispose()
    assert (first, again) == (f"schema empty -> {head}\n", f"schema {head} -> {head}\n")
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    shown = re.findall(r"\$ deployctl db upgrade[^\n]*\n([^\n]+)", guide)
    assert shown == [first.strip(), again.strip()], "docs/user-guide.md shows other output"

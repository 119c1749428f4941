"""Replicas share one identity through the database (issue 15 item 1): two real ``deployctl
server`` processes on one fresh PostgreSQL schema, the second started with ``--join-cluster``
and an empty state directory; real agents over QUIC on loopback verify replica B's own
certificate against the CA replica A made, enrolled with A's join token."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy_core.client import DeployClient
from deploy_core.testing import DeployCenter, tree_fingerprint

SHARED = ("ca.pem", "ca.key", "admin.token", "join.token", "secrets.key")


def deployctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_in_log(center: DeployCenter, name: str, text: str, seconds: float = 120) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        log = center.log(name)
        if text in log:
            return log
        time.sleep(0.2)
    raise TimeoutError(
        f"{text!r} not in {name}'s log within {seconds}s: {center.log(name)[-3000:]}"
    )


def start_agent(
    center: DeployCenter, client_id: str, port: int, ca: Path, join: Path, name: str
) -> None:
    center.agents[client_id] = center._spawn(
        [
            "agent",
            "--client-id",
            client_id,
            "--server",
            f"127.0.0.1:{port}",
            "--server-name",
            name,
            "--state-dir",
            str(center.root.parent / f"agent-{client_id}"),
            "--ca",
            str(ca),
            "--join-token-file",
            str(join),
        ],
        f"agent-{client_id}.log",
    )


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[tuple[DeployCenter, DeployCenter, Path]]:
    key = tmp_path / "cluster.key"
    made = deployctl("cluster", "key", "--out", str(key))
    assert made.returncode == 0, made.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    a = DeployCenter(tmp_path / "a", db_url=pg_url)
    b = DeployCenter(tmp_path / "b", db_url=pg_url)
    a.server_args = ["--cluster-key-file", str(key), "--cert-name", "replica-a.test"]
    b.server_args = [
        "--cluster-key-file",
        str(key),
        "--join-cluster",
        "--cert-name",
        "replica-b.test",
    ]
    try:
        yield a, b, key
    finally:
        for center in (a, b):
            center.close()


def test_a_replica_joins_from_the_database_and_serves_agents_enrolled_through_the_other(
    cluster: tuple[DeployCenter, DeployCenter, Path], tmp_path: Path
) -> None:
    a, b, _key = cluster
    # B first, on a database without an identity: refused, nothing written.
    b.root.mkdir(parents=True)
    b.server_dir.mkdir()
    b.server_proc = b._spawn(
        ["server", "--state-dir", str(b.server_dir), "--db", str(a.db_url), *b.server_args],
        "early.log",
    )
    assert b.server_proc.wait(timeout=120) == 1
    assert "no cluster identity is published" in b.log("early"), b.log("early")
    assert list(b.server_dir.iterdir()) == []

    a.start_server(timeout=120)
    b.start_server(timeout=120)
    for name in SHARED:
        assert (a.server_dir / name).read_text() == (b.server_dir / name).read_text(), name
        assert (b.server_dir / name).stat().st_mode & 0o777 == 0o600, name
    a_id = (a.server_dir / "server.id").read_text()
    b_id = (b.server_dir / "server.id").read_text()
    assert a_id != b_id
    assert (a.server_dir / "server.pem").read_bytes() != (b.server_dir / "server.pem").read_bytes()
    # A's admin token works on B's API (one token for the cluster).
    a_token = (a.server_dir / "admin.token").read_text().strip()
    via_b = DeployClient(f"http://127.0.0.1:{b.api_port}", a_token, timeout=60)
    view = via_b.request("GET", "/api/cluster")
    assert view["server_id"] == b_id.strip()
    assert {r["server_id"] for r in view["replicas"]} == {a_id.strip(), b_id.strip()}

    # An agent enrolled with A's join token and A's CA connects to B, checking B's own
    # certificate (which names replica-b.test) against that CA.
    ca, join = a.server_dir / "ca.pem", a.server_dir / "join.token"
    start_agent(b, "web-1", b.quic_port, ca, join, "replica-b.test")
    b.wait_connected("web-1", timeout=120)
    deploy_id = b.deploy("shell", "web-1", script="echo via-b", timeout=60)
    assert b.wait(deploy_id, timeout=120)["status"] == "success"
    lines = [line["line"] for line in b.api.logs(deploy_id)["lines"]]
    assert "via-b" in lines
    # The same agent (its state directory, its credential from B) is let in by A too; the
    # join token it is given now is refused by both, so it does not enrol again.
    b.stop_agent("web-1")
    bogus = tmp_path / "bogus.token"
    bogus.write_text("not-a-join-token\n")
    start_agent(a, "web-1", a.quic_port, ca, bogus, "replica-a.test")
    a.wait_connected("web-1", timeout=120)

    # B's certificate does not name replica-a.test: an agent expecting that name is refused,
    # so the check above was a real one.
    start_agent(b, "web-2", b.quic_port, ca, join, "replica-a.test")
    log = wait_in_log(b, "agent-web-2", "replica-a.test' doesn't match")
    assert "connected to" not in log, log[-3000:]

    # B restarted: nothing of its state directory changes, and its id stays.
    b.stop_agent("web-2")
    b.stop_server()
    # (Only the identity files, the certificate and the id: other parts of a state directory,
    # such as the artifact store, may change at a start.)
    kept = {*SHARED, "server.pem", "server.key", "server.id"}

    def identity_files() -> dict[str, str]:
        return {
            name: value
            for name, value in tree_fingerprint(b.server_dir).items()
            if Path(name).name in kept
        }

    before = identity_files()
    assert len(before) == len(kept)
    b.start_server(timeout=120)
    assert identity_files() == before
    assert (b.server_dir / "server.id").read_text() == b_id
    assert "the state directory already holds the shared one" in b.log("server")


def test_a_replica_with_another_identity_or_key_is_refused(
    cluster: tuple[DeployCenter, DeployCenter, Path], tmp_path: Path
) -> None:
    a, _b, key = cluster
    a.start_server(timeout=120)
    db = str(a.db_url)

    # A state directory of a server of its own (its own CA and tokens) is never overwritten.
    own = DeployCenter(tmp_path / "own")
    try:
        own.start_server(timeout=120)
        own.stop_server()
    finally:
        own.close()
    before = tree_fingerprint(own.server_dir)
    done = deployctl(
        "server",
        "--state-dir",
        str(own.server_dir),
        "--db",
        db,
        "--api-port",
        "0",
        "--quic-port",
        "0",
        "--cluster-key-file",
        str(key),
        "--join-cluster",
    )
    assert done.returncode == 1, done.stderr
    assert "refusing to overwrite" in done.stderr and "ca.pem" in done.stderr, done.stderr
    assert tree_fingerprint(own.server_dir) == before

    # Another cluster key: refused, nothing written.
    other = tmp_path / "other.key"
    assert deployctl("cluster", "key", "--out", str(other)).returncode == 0
    fresh = tmp_path / "fresh"
    done = deployctl(
        "server",
        "--state-dir",
        str(fresh),
        "--db",
        db,
        "--api-port",
        "0",
        "--quic-port",
        "0",
        "--cluster-key-file",
        str(other),
        "--join-cluster",
    )
    assert done.returncode == 1
    assert "wrong cluster key" in done.stderr, done.stderr
    assert not [p for p in fresh.iterdir() if p.name in SHARED]

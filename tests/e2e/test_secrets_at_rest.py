"""Secret environment values at rest and in output (issue 10 §4, "Secrets").

A multi-line secret (a PEM key) never shows in the logs, the result, the error or the
history, neither whole nor one line of it; the server's database holds it only sealed (the
raw file bytes are read); the agent's journal drops it when the deployment ends; state
directories are 0700 and database files 0600 at start, even when they existed before.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from deploy_core.testing import DeployCenter

PEM_LINES = [
    "-----BEGIN PRIVATE KEY-----",
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj",
    "MzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuictGeurT8jNbvJZHtCSuYEvu",
    "NMoSfm76oqFvAp8Gy0iz5sxjZmSnXyCdPEovGhLa0VzMaQ8s+CLOyS56YyCFGeJZ",
    "-----END PRIVATE KEY-----",
]
PEM = "\n".join(PEM_LINES) + "\n"
TOKEN = "tok-9f8e7d6c5b4a3210"
SECRETS = {"DEPLOY_KEY": PEM, "API_TOKEN": TOKEN}
# What must never be found: the token, and each line of the key but the armour lines
# (masked in output all the same, but they are no secret and may appear in docs or tests).
NEEDLES = [TOKEN.encode(), *(line.encode() for line in PEM_LINES[1:-1])]


def raw_bytes(database: Path) -> bytes:
    """A SQLite database's bytes as they lie on disk, with its WAL and rollback journal."""
    data = b""
    for suffix in ("", "-wal", "-journal"):
        path = database.with_name(database.name + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


def found(data: bytes) -> list[bytes]:
    return [needle for needle in NEEDLES if needle in data]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_pem_key_is_masked_line_by_line_and_whole(deploy_center: DeployCenter) -> None:
    deploy_center.start_agent("sec-1")
    script = (
        'echo "key follows"; printf "%s" "$DEPLOY_KEY"; '
        'printf "%s" "$DEPLOY_KEY" | sed -n 3p >&2; '
        'echo "token=$API_TOKEN"; printf "%s" "$DEPLOY_KEY" >&2; exit 3'
    )
    deploy_id = deploy_center.deploy("shell", "sec-1", script=script, secret_env=SECRETS)
    record = deploy_center.wait(deploy_id)
    assert record["status"] == "failed"
    lines = [entry["line"] for entry in deploy_center.api.logs(deploy_id)["lines"]]
    assert "key follows" in lines and "token=***" in lines
    everything = repr(record) + repr(lines) + repr(deploy_center.api.history(deploy_id))
    assert not found(everything.encode())
    assert not found(everything.replace("\\n", "\n").encode())
    assert "-----BEGIN PRIVATE KEY-----" not in everything  # every line of the value goes
    assert "***" in record["result"]["stderr_tail"]
    assert not found((deploy_center.log("server") + deploy_center.log("agent-sec-1")).encode())


def test_secrets_are_sealed_in_the_server_database_and_gone_from_the_journal(
    deploy_center: DeployCenter,
) -> None:
    deploy_center.start_agent("sec-2")
    server_db = deploy_center.server_dir / "deploy-center.db"
    journal = deploy_center.root / "agent-sec-2" / "journal.db"
    flag = deploy_center.root / "sec-2-running"
    script = f'touch {flag}; sleep 3; test -n "$DEPLOY_KEY" && echo done'
    deploy_id = deploy_center.deploy("shell", "sec-2", script=script, secret_env=SECRETS)
    end = time.monotonic() + 30
    while not flag.exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert flag.exists(), deploy_center.log("agent-sec-2")[-2000:]
    # While it runs the server must keep the secrets (to send again), but only sealed.
    assert not found(raw_bytes(server_db))
    assert found(raw_bytes(journal))  # the agent holds them while the script runs
    record = deploy_center.wait(deploy_id)
    assert record["status"] == "success", record["error"]
    end = time.monotonic() + 10
    while found(raw_bytes(journal)) and time.monotonic() < end:
        time.sleep(0.1)
    assert not found(raw_bytes(journal))
    assert not found(raw_bytes(server_db))
    key = deploy_center.server_dir / "secrets.key"
    assert mode(key) == 0o600 and len(key.read_bytes().strip()) == 44


def test_state_directories_and_databases_are_tightened_at_start(tmp_path: Path) -> None:
    center = DeployCenter(tmp_path / "center")
    agent_dir = center.root / "agent-sec-3"
    for directory in (center.server_dir, agent_dir):
        directory.mkdir(parents=True)
        os.chmod(directory, 0o755)  # as an older version (or a loose umask) left them
    loose = center.server_dir / "deploy-center.db"
    loose.touch()
    os.chmod(loose, 0o644)
    try:
        center.start_server()
        center.start_agent("sec-3")
        center.wait(
            center.deploy("shell", "sec-3", script="echo hi", secret_env={"A_SECRET": TOKEN})
        )
        assert mode(center.server_dir) == 0o700
        assert mode(agent_dir) == 0o700
        files = [
            path
            for base in (center.server_dir / "deploy-center.db", agent_dir / "journal.db")
            for path in (
                base,
                base.with_name(base.name + "-wal"),
                base.with_name(base.name + "-shm"),
            )
            if path.exists()
        ]
        assert len(files) >= 4  # both databases, with their WAL files
        assert {path.name: mode(path) for path in files} == {path.name: 0o600 for path in files}
    finally:
        center.close()

"""Sealed secret environments: the key file, sealing, and rows an older server left in
plaintext."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from deploy_core.server import db
from deploy_core.server.records import RecordStore
from deploy_core.server.secret_box import KEY_FILE, SecretBox, SecretKeyMismatch, is_sealed

VALUES = {"DB_PASSWORD": "hunter2-but-longer", "PEM": "-----BEGIN-----\nAAAA\n-----END-----\n"}


def _store(tmp_path: Path, box: SecretBox) -> RecordStore:
    engine = db.make_engine(db.sqlite_url(tmp_path / "server.db"))
    db.upgrade(engine)
    return RecordStore(engine, secret_box=box)


def _create(store: RecordStore, deploy_id: str, secret_env: dict[str, str] | None) -> None:
    store.create_deployment(
        deploy_id=deploy_id,
        client_id=f"c-{deploy_id}",
        command_type="deploy.shell",
        request={"params": {}, "secret_env_names": sorted(secret_env or {})},
        deadline=time.time() + 60,
        secret_env=secret_env,
    )


def test_the_key_file_is_made_private_once_and_reused(tmp_path: Path) -> None:
    sealed = SecretBox.from_state_dir(tmp_path).seal(VALUES)
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_bytes()
    key.chmod(0o644)
    again = SecretBox.from_state_dir(tmp_path)  # a restarted server
    assert key.read_bytes() == first and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert again.open(sealed) == VALUES


def test_a_key_file_that_is_no_key_is_named(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(ValueError, match=f"{KEY_FILE} does not hold a Fernet key"):
        SecretBox.from_state_dir(tmp_path)


def test_secrets_are_stored_sealed_and_read_back(tmp_path: Path) -> None:
    store = _store(tmp_path, SecretBox.from_state_dir(tmp_path))
    _create(store, "d1", VALUES)
    with store.engine.connect() as conn:
        (stored,) = conn.execute(sa.select(db.deploy_secrets.c.secret_env)).one()
    assert is_sealed(stored) and "hunter2" not in str(stored)
    assert store.secret_env("d1") == VALUES


def test_another_key_cannot_open_them(tmp_path: Path) -> None:
    store = _store(tmp_path, SecretBox())
    _create(store, "d1", VALUES)
    other = RecordStore(store.engine, secret_box=SecretBox())
    with pytest.raises(SecretKeyMismatch, match="every replica sharing the database"):
        other.secret_env("d1")


def test_plaintext_rows_of_an_older_server_are_read_and_sealed(tmp_path: Path) -> None:
    store = _store(tmp_path, SecretBox.from_state_dir(tmp_path))
    _create(store, "old", None)
    _create(store, "new", {"TOKEN": "already-sealed"})
    with store.engine.begin() as conn:  # as a server before sealing wrote it
        conn.execute(db.deploy_secrets.insert().values(deploy_id="old", secret_env=VALUES))
    assert store.secret_env("old") == VALUES
    assert store.seal_plaintext_secrets() == 1
    assert store.seal_plaintext_secrets() == 0
    with store.engine.connect() as conn:
        rows = {row.deploy_id: row.secret_env for row in conn.execute(sa.select(db.deploy_secrets))}
    assert all(is_sealed(value) for value in rows.values())
    assert store.secret_env("old") == VALUES
    assert store.secret_env("new") == {"TOKEN": "already-sealed"}
    store.engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("server.db*") if p.is_file())
    assert b"hunter2" not in raw  # secure_delete: the plaintext row left no trace

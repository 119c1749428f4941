"""The identity replicas share, sealed in the database under a cluster key (issue 15 item 1).

Replicas of one deployment must share the agents' CA (``ca.pem``, ``ca.key``), the admin
token, the state directory's join token and the secrets key (``secrets.key``, which seals
secret environments in the database).  They do NOT share the server certificate: each
replica issues its own from the shared CA for its own ``--cert-name`` values (agents verify
the server against the CA, so a replica on another host needs a certificate naming that
host), nor ``server.id`` (each replica's own) and ``server.json``.

The shared files are one row of ``cluster_secrets`` (name ``identity``): a JSON object of the
files' contents, sealed with Fernet under the cluster key, a file given to every replica
(``deployctl cluster key --out PATH``).  The row's first bytes name the key that sealed it
(an HMAC of the key, which reveals nothing of it), so a wrong key and a damaged row get
different errors.

A replica started with a cluster key on a database without an identity publishes one:
``INSERT ... ON CONFLICT DO NOTHING`` then read back, so two first replicas racing end with
one identity, and the loser takes the winner's.  A replica started with ``--join-cluster``
only takes an identity, never publishes one.  Taking it writes the missing files into the
state directory (mode 0600); a file already there must hold the same value, else the
replica refuses to start and writes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from deploy_core.private import private_dir
from deploy_core.server import db
from deploy_core.transport import ensure_server_certs
from deploy_core.transport.certs import write_private_file

log = logging.getLogger(__name__)

#: The one row of ``cluster_secrets`` this module writes.
IDENTITY_ROW = "identity"
#: The state directory's files replicas share (server.pem/server.key are each replica's own).
SHARED_FILES = ("ca.pem", "ca.key", "admin.token", "join.token", "secrets.key")
_FORMAT = b"dc-cluster-1"
_KEY_ID_LABEL = b"deploy-center cluster key id"


class ClusterIdentityError(Exception):
    """The shared identity cannot be taken or published; the message says what to do."""


@dataclass(frozen=True)
class ClusterSettings:
    """``deployctl server --cluster-key-file PATH [--join-cluster]`` (or ``[cluster]`` of its
    configuration file)."""

    key_file: Path
    # Only take the identity the database holds; never publish a new one.
    join: bool = False


# ---------------------------------------------------------------------- the cluster key


def create_key_file(path: Path) -> str:
    """Write a new cluster key to ``path`` (mode 0600); an existing file is never replaced.

    :returns: the key's id (what errors and logs name it by).
    :raises ClusterIdentityError: ``path`` exists or cannot be written."""
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ClusterIdentityError(
            f"{path} exists; a cluster key is never overwritten (replicas sealed with it "
            "would be locked out): choose another path, or remove it yourself"
        ) from None
    except OSError as exc:
        raise ClusterIdentityError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    os.chmod(path, 0o600)
    return key_id(key)


def key_id(key: bytes) -> str:
    """A short public name of a cluster key (an HMAC under it: reveals nothing of it)."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


def load_key(path: Path) -> bytes:
    """The cluster key in ``path``.

    Refused when the file is readable or writable by group or others: the key opens the
    CA's private key and the admin token, so a loose mode is a leak to fix, not to warn of.

    :raises ClusterIdentityError: unreadable, loose permissions, or not a key."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ClusterIdentityError(f"cluster key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ClusterIdentityError(
                f"cluster key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others "
                f"than its owner may read it, and it opens the cluster's CA key and tokens; "
                f"run: chmod 600 {path}"
            )
        key = path.read_bytes().strip()
    except ClusterIdentityError:
        raise
    except OSError as exc:
        raise ClusterIdentityError(
            f"cannot read the cluster key file {path}: {exc.strerror or exc}"
        ) from None
    try:
        Fernet(key)
    except ValueError:
        raise ClusterIdentityError(
            f"{path} does not hold a cluster key (a line of 44 url-safe base64 characters, "
            "as `deployctl cluster key --out PATH` writes)"
        ) from None
    return key


# ---------------------------------------------------------------------- sealing


def seal(key: bytes, identity: dict[str, str]) -> bytes:
    """The ``sealed`` column for ``identity`` (file name -> content)."""
    payload = json.dumps({"format": 1, "files": identity}, sort_keys=True).encode()
    return b" ".join((_FORMAT, key_id(key).encode(), Fernet(key).encrypt(payload)))


def unseal(key: bytes, sealed: bytes, *, key_file: Path | None = None) -> dict[str, str]:
    """The identity a sealed row holds.

    :raises ClusterIdentityError: sealed under another key, or damaged (altered)."""
    damaged = (
        f"the cluster identity in the database (table cluster_secrets, row {IDENTITY_ROW!r}) "
        "is damaged or was altered"
    )
    parts = bytes(sealed).split(b" ")
    if len(parts) != 3 or parts[0] != _FORMAT:
        raise ClusterIdentityError(f"{damaged}: it is not in a format this server knows")
    sealed_by, token = parts[1].decode("ascii", "replace"), parts[2]
    mine = key_id(key)
    if not hmac.compare_digest(sealed_by, mine):
        named = f" in {key_file}" if key_file else ""
        raise ClusterIdentityError(
            f"wrong cluster key: the cluster identity in the database was sealed with key "
            f"{sealed_by}, and the key{named} is {mine}; give this replica the key file the "
            "first replica was started with"
        )
    try:
        payload = json.loads(Fernet(key).decrypt(token))
    except (InvalidToken, ValueError):
        raise ClusterIdentityError(
            f"{damaged}: it names this cluster key ({mine}) but does not open with it; "
            "restore it from a backup, or delete the row and start the replica whose state "
            "directory holds the cluster's files to publish them again"
        ) from None
    files = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(files, dict) or set(files) != set(SHARED_FILES):
        raise ClusterIdentityError(f"{damaged}: it does not hold the files {SHARED_FILES}")
    if not all(isinstance(v, str) and v.strip() for v in files.values()):
        raise ClusterIdentityError(f"{damaged}: a file in it is empty")
    return {name: files[name] for name in SHARED_FILES}


# ---------------------------------------------------------------------- the database


def _insert(conn: Connection) -> postgresql.Insert | sqlite.Insert:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(db.cluster_secrets)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(db.cluster_secrets)
    raise ClusterIdentityError(f"a cluster identity needs PostgreSQL, not {conn.dialect.name}")


def read_sealed(engine: Engine) -> bytes | None:
    """The sealed identity row, or ``None`` when none is published."""
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(db.cluster_secrets.c.sealed).where(db.cluster_secrets.c.name == IDENTITY_ROW)
        ).scalar()
    return None if value is None else bytes(value)


def publish(engine: Engine, sealed: bytes) -> bytes:
    """Store ``sealed`` unless an identity is there already; the row stored either way."""
    with engine.begin() as conn:
        stmt = _insert(conn).values(name=IDENTITY_ROW, sealed=sealed, updated_at=time.time())
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    stored = read_sealed(engine)
    if stored is None:  # pragma: no cover - deleted between the two statements
        raise ClusterIdentityError("the cluster identity vanished while it was published")
    return stored


# ---------------------------------------------------------------------- the state directory


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def install(root: Path, identity: dict[str, str]) -> list[str]:
    """Write the identity's files missing from ``root`` (mode 0600).

    Every file is checked before any is written: one already there with another value
    (another CA, another token) stops it all, and nothing is written or overwritten.

    :returns: the names written.
    :raises ClusterIdentityError: a file differs, or cannot be read."""
    missing, differ = [], []
    for name in SHARED_FILES:
        path = root / name
        try:
            present = path.read_text()
        except FileNotFoundError:
            missing.append(name)
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise ClusterIdentityError(f"cannot read {path}: {exc}") from None
        if not _same(present, identity[name]):
            differ.append(name)
    if differ:
        raise ClusterIdentityError(
            f"the state directory {root} already holds another {', '.join(differ)} than the "
            "cluster identity in the database; refusing to overwrite it (nothing was "
            "written). It belongs to another server or cluster: start this replica with a "
            "new, empty --state-dir, or point --db at the database of its own cluster"
        )
    for name in missing:
        write_private_file(root / name, identity[name].encode())
    return missing


def _token_file(path: Path) -> None:
    if not path.exists():
        write_private_file(path, (secrets.token_urlsafe(32) + "\n").encode())


def _key_file(path: Path) -> None:
    if not path.exists():
        write_private_file(path, Fernet.generate_key() + b"\n")


def _complete(root: Path, hostnames: Sequence[str]) -> None:
    """Make whatever shared file ``root`` lacks, as a first start would (never replacing
    one)."""
    ensure_server_certs(root, hostnames=hostnames)
    _token_file(root / "admin.token")
    _token_file(root / "join.token")
    _key_file(root / "secrets.key")


def _read_files(root: Path) -> dict[str, str]:
    return {name: (root / name).read_text() for name in SHARED_FILES}


def candidate(root: Path, hostnames: Sequence[str]) -> dict[str, str]:
    """The identity this replica would publish: its state directory's when it has one
    (completed in place), else a new one made aside and not kept (the state directory gets
    whichever identity wins the race to publish)."""
    if any((root / name).exists() for name in SHARED_FILES):
        _complete(root, hostnames)
        return _read_files(root)
    for stale in root.glob(".cluster-new-*"):  # left by a start killed at this point
        shutil.rmtree(stale, ignore_errors=True)
    scratch = root / f".cluster-new-{secrets.token_hex(4)}"
    scratch.mkdir(mode=0o700)
    try:
        _complete(scratch, hostnames)
        return _read_files(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def is_postgresql(db_url: str | None) -> bool:
    """Whether ``db_url`` names a PostgreSQL database."""
    return db_url is not None and db.normalise_url(db_url).startswith("postgresql")


def take_identity(
    root: Path,
    settings: ClusterSettings,
    *,
    db_url: str | None,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    migrate: bool = True,
) -> str:
    """Bring the cluster's identity into the state directory ``root`` (publishing this
    replica's first when the database has none and ``settings.join`` is false).

    :returns: ``"published"``, ``"joined"`` (files written) or ``"unchanged"``.
    :raises ClusterIdentityError: with what to do."""
    flag = "--join-cluster" if settings.join else "--cluster-key-file"
    if not is_postgresql(db_url):
        raise ClusterIdentityError(
            f"{flag} needs the PostgreSQL database the replicas share (--db "
            "postgresql://user@host/dbname); replicas cannot share SQLite"
            + (", and this server would use SQLite in its state directory" if not db_url else "")
        )
    key = load_key(settings.key_file)
    private_dir(root)
    assert db_url is not None
    engine = db.make_engine(db_url)
    try:
        if migrate:
            db.upgrade(engine)
        try:
            sealed = read_sealed(engine)
        except sa.exc.ProgrammingError:
            raise ClusterIdentityError(
                "the database has no cluster_secrets table: bring its schema up to date "
                "(migration 0010) or start the server with migrations on"
            ) from None
        outcome = "joined"
        if sealed is None:
            if settings.join:
                raise ClusterIdentityError(
                    "no cluster identity is published in this database yet: start the first "
                    "replica with --cluster-key-file and without --join-cluster (it publishes "
                    "its CA, tokens and secrets key), then start the others with "
                    "--join-cluster"
                )
            mine = seal(key, candidate(root, hostnames))
            sealed = publish(engine, mine)
            outcome = "published" if sealed == mine else "joined"
        identity = unseal(key, sealed, key_file=settings.key_file)
        written = install(root, identity)
    finally:
        engine.dispose()
    if outcome == "joined" and not written:
        outcome = "unchanged"
    log.info(
        "cluster identity (key %s): %s%s",
        key_id(key),
        {
            "published": "published this replica's CA, tokens and secrets key",
            "joined": "took the shared CA, tokens and secrets key from the database",
            "unchanged": "the state directory already holds the shared one",
        }[outcome],
        f" ({', '.join(written)} written)" if written else "",
    )
    return outcome

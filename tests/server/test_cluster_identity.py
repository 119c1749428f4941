"""The identity replicas share through the database (issue 15 item 1): real PostgreSQL (a
fresh schema per test), real state directories, real certificates."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from deploy_core.server import db
from deploy_core.server.cluster_identity import (
    IDENTITY_ROW,
    SHARED_FILES,
    ClusterIdentityError,
    ClusterSettings,
    create_key_file,
    key_id,
    load_key,
    publish,
    read_sealed,
    seal,
    take_identity,
    unseal,
)
from deploy_core.server.secret_box import SecretBox
from deploy_core.server.state import init_state
from deploy_core.testing import tree_fingerprint


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    create_key_file(path)
    return path


def shared(root: Path) -> dict[str, str]:
    return {name: (root / name).read_text() for name in SHARED_FILES}


def sans(cert_file: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)]


def verify_against(ca_file: Path, cert_file: Path) -> None:
    """Raises unless ``cert_file`` is signed by the CA of ``ca_file``."""
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)


def row_count(pg_url: str) -> int:
    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(db.cluster_secrets)
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_first_replica_publishes_and_a_second_joins_with_its_own_certificate(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    state_a = init_state(
        a, hostnames=("localhost", "a.example"), cluster=ClusterSettings(key_file), db_url=pg_url
    )
    assert row_count(pg_url) == 1
    state_b = init_state(
        b,
        hostnames=("localhost", "b.example"),
        cluster=ClusterSettings(key_file, join=True),
        db_url=pg_url,
    )
    assert shared(a) == shared(b)
    for name in SHARED_FILES:
        assert stat.S_IMODE((b / name).stat().st_mode) == 0o600, name
    assert state_a.admin_token == state_b.admin_token
    assert state_a.join_token == state_b.join_token
    # Each replica's own server certificate, from the one CA, naming its own host.
    assert (a / "server.pem").read_bytes() != (b / "server.pem").read_bytes()
    assert "b.example" in sans(b / "server.pem")
    assert "a.example" not in sans(b / "server.pem")
    verify_against(a / "ca.pem", b / "server.pem")
    # The secrets key is the same: what A sealed, B opens.
    sealed = SecretBox.from_state_dir(a).seal({"PASSWORD": "hunter2"})
    assert SecretBox.from_state_dir(b).open(sealed) == {"PASSWORD": "hunter2"}
    assert not (b / "server.id").exists()  # made by the server itself, never shared


def test_an_existing_server_publishes_its_own_files(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    a = tmp_path / "a"
    init_state(a)  # a single server that has run before
    SecretBox.from_state_dir(a)
    before = shared(a)
    outcome = take_identity(a, ClusterSettings(key_file), db_url=pg_url)
    assert outcome == "published"
    assert shared(a) == before
    sealed = read_sealed(db.make_engine(pg_url))
    assert sealed is not None
    assert unseal(load_key(key_file), sealed) == before
    # Started again: nothing to publish or write.
    assert take_identity(a, ClusterSettings(key_file), db_url=pg_url) == "unchanged"


def test_a_joined_replica_restarts_unchanged(tmp_path: Path, pg_url: str, key_file: Path) -> None:
    init_state(tmp_path / "a", cluster=ClusterSettings(key_file), db_url=pg_url)
    b = tmp_path / "b"
    settings = ClusterSettings(key_file, join=True)
    assert take_identity(b, settings, db_url=pg_url) == "joined"
    init_state(b, cluster=settings, db_url=pg_url)
    (b / "server.id").write_text("replica-b\n")
    before = tree_fingerprint(b)
    assert take_identity(b, settings, db_url=pg_url) == "unchanged"
    init_state(b, cluster=settings, db_url=pg_url)
    assert tree_fingerprint(b) == before
    assert (b / "server.id").read_text() == "replica-b\n"


def test_wrong_key_is_refused_and_nothing_is_written(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    init_state(tmp_path / "a", cluster=ClusterSettings(key_file), db_url=pg_url)
    other = tmp_path / "other.key"
    create_key_file(other)
    b = tmp_path / "b"
    for join in (True, False):
        with pytest.raises(ClusterIdentityError, match="wrong cluster key") as info:
            init_state(b, cluster=ClusterSettings(other, join=join), db_url=pg_url)
        assert key_id(load_key(key_file)) in str(info.value)
        assert str(other) in str(info.value)
        assert sorted(p.name for p in b.iterdir()) == []
    assert row_count(pg_url) == 1


def test_a_tampered_row_is_refused(tmp_path: Path, pg_url: str, key_file: Path) -> None:
    init_state(tmp_path / "a", cluster=ClusterSettings(key_file), db_url=pg_url)
    engine = db.make_engine(pg_url)
    sealed = read_sealed(engine)
    assert sealed is not None
    head, token = sealed.rsplit(b" ", 1)
    # Flip one character in the middle of the Fernet token (its ciphertext).
    i = len(token) // 2
    flipped = token[:i] + (b"A" if token[i : i + 1] != b"A" else b"B") + token[i + 1 :]
    with engine.begin() as conn:
        conn.execute(
            db.cluster_secrets.update()
            .where(db.cluster_secrets.c.name == IDENTITY_ROW)
            .values(sealed=head + b" " + flipped)
        )
    b = tmp_path / "b"
    with pytest.raises(ClusterIdentityError, match="damaged or was altered"):
        init_state(b, cluster=ClusterSettings(key_file, join=True), db_url=pg_url)
    assert list(b.iterdir()) == []
    with engine.begin() as conn:
        conn.execute(db.cluster_secrets.update().values(sealed=b"garbage"))
    with pytest.raises(ClusterIdentityError, match="not in a format"):
        init_state(b, cluster=ClusterSettings(key_file, join=True), db_url=pg_url)
    assert list(b.iterdir()) == []
    engine.dispose()


def test_a_state_dir_with_another_ca_is_refused_unchanged(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    init_state(tmp_path / "a", cluster=ClusterSettings(key_file), db_url=pg_url)
    b = tmp_path / "b"
    init_state(b)  # a server of its own: its own CA and tokens
    (b / "server.id").write_text("b\n")
    before = tree_fingerprint(b)
    for join in (True, False):
        with pytest.raises(ClusterIdentityError, match="refusing to overwrite") as info:
            init_state(b, cluster=ClusterSettings(key_file, join=join), db_url=pg_url)
        assert "ca.pem" in str(info.value) and "admin.token" in str(info.value)
        assert tree_fingerprint(b) == before


def test_one_differing_token_refuses_even_when_the_ca_matches(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    a = tmp_path / "a"
    init_state(a, cluster=ClusterSettings(key_file), db_url=pg_url)
    b = tmp_path / "b"
    b.mkdir(mode=0o700)
    (b / "ca.pem").write_text((a / "ca.pem").read_text())
    (b / "join.token").write_text("not-the-cluster-one\n")
    before = tree_fingerprint(b)
    with pytest.raises(ClusterIdentityError, match=r"another join\.token"):
        take_identity(b, ClusterSettings(key_file, join=True), db_url=pg_url)
    assert tree_fingerprint(b) == before


def test_join_before_anything_is_published(tmp_path: Path, pg_url: str, key_file: Path) -> None:
    b = tmp_path / "b"
    with pytest.raises(ClusterIdentityError, match="no cluster identity is published"):
        init_state(b, cluster=ClusterSettings(key_file, join=True), db_url=pg_url)
    assert list(b.iterdir()) == []
    assert row_count(pg_url) == 0


@pytest.mark.parametrize("join", [True, False])
def test_sqlite_is_refused(tmp_path: Path, key_file: Path, join: bool) -> None:
    for url in (None, f"sqlite:///{tmp_path / 'x.db'}"):
        with pytest.raises(ClusterIdentityError, match="PostgreSQL"):
            init_state(tmp_path / "s", cluster=ClusterSettings(key_file, join=join), db_url=url)
        assert list((tmp_path / "s").iterdir()) == []
    assert not (tmp_path / "x.db").exists()


def test_two_first_replicas_racing_end_with_one_identity(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    key = load_key(key_file)
    # The compare-and-set itself: the second publisher gets the first one's row back.
    first, second = (
        seal(key, {n: f"one {n}" for n in SHARED_FILES}),
        seal(key, {n: f"two {n}" for n in SHARED_FILES}),
    )
    assert publish(engine, first) == first
    assert publish(engine, second) == first
    with engine.begin() as conn:
        conn.execute(db.cluster_secrets.delete())
    engine.dispose()

    # Four fresh replicas started at once (threads, one barrier before they publish).
    roots = [tmp_path / f"r{i}" for i in range(4)]
    outcomes: dict[Path, str] = {}
    errors: list[BaseException] = []

    def start(root: Path) -> None:
        try:
            outcomes[root] = take_identity(
                root, ClusterSettings(key_file), db_url=pg_url, migrate=False
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(r,)) for r in roots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(outcomes.values()).count("published") == 1, outcomes
    assert all(shared(r) == shared(roots[0]) for r in roots)
    assert row_count(pg_url) == 1
    assert not [p for r in roots for p in r.iterdir() if p.name.startswith(".cluster-new")]


def test_an_existing_server_losing_the_race_is_refused(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    init_state(tmp_path / "a", cluster=ClusterSettings(key_file), db_url=pg_url)
    b = tmp_path / "b"
    init_state(b)
    before = tree_fingerprint(b)
    with pytest.raises(ClusterIdentityError, match="refusing to overwrite"):
        take_identity(b, ClusterSettings(key_file), db_url=pg_url)
    assert tree_fingerprint(b) == before


def test_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "k"
    ident = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_key(path)) == ident
    before = path.read_bytes()
    with pytest.raises(ClusterIdentityError, match="never overwritten"):
        create_key_file(path)
    assert path.read_bytes() == before

    os.chmod(path, 0o640)
    with pytest.raises(ClusterIdentityError, match=r"mode 0640.*chmod 600"):
        load_key(path)
    os.chmod(path, 0o600)
    with pytest.raises(ClusterIdentityError, match="cannot read the cluster key file"):
        load_key(tmp_path / "missing")
    with pytest.raises(ClusterIdentityError, match="not a regular file"):
        load_key(tmp_path)
    bad = tmp_path / "bad"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    with pytest.raises(ClusterIdentityError, match="does not hold a cluster key"):
        load_key(bad)
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        path.chmod(0o000)
        with pytest.raises(ClusterIdentityError, match="cannot read"):
            load_key(path)


def test_unreadable_key_is_refused_before_the_database_is_touched(
    tmp_path: Path, pg_url: str
) -> None:
    with pytest.raises(ClusterIdentityError, match="cannot read the cluster key file"):
        init_state(tmp_path / "a", cluster=ClusterSettings(tmp_path / "nope.key"), db_url=pg_url)
    assert list((tmp_path / "a").iterdir()) == []


def test_the_shared_directory_way_symlinked_files(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    """Without a cluster key: each replica's own state directory links the five shared files
    from one directory (e.g. on NFS); the certificate and server.id stay each replica's."""
    share = tmp_path / "share"
    first = init_state(share)
    SecretBox.from_state_dir(share)
    for name in ("server.pem", "server.key"):
        (share / name).unlink()
    replicas = [tmp_path / "a", tmp_path / "b"]
    for root in replicas:
        root.mkdir(mode=0o700)
        for name in SHARED_FILES:
            (root / name).symlink_to(share / name)
    a = init_state(replicas[0], hostnames=("localhost", "a.example"))
    b = init_state(replicas[1], hostnames=("localhost", "b.example"))
    assert a.admin_token == b.admin_token == first.admin_token
    assert "b.example" in sans(replicas[1] / "server.pem")
    verify_against(share / "ca.pem", replicas[1] / "server.pem")
    assert not (replicas[1] / "server.pem").is_symlink()
    sealed = SecretBox.from_state_dir(replicas[0]).seal({"K": "v"})
    assert SecretBox.from_state_dir(replicas[1]).open(sealed) == {"K": "v"}
    # The two ways together: the linked files are published, then recognised as the same.
    assert take_identity(replicas[0], ClusterSettings(key_file), db_url=pg_url) == "published"
    assert take_identity(replicas[1], ClusterSettings(key_file, join=True), db_url=pg_url) == (
        "unchanged"
    )
    assert all((r / n).is_symlink() for r in replicas for n in SHARED_FILES)


def test_changing_a_shared_file_and_the_key_as_documented(
    tmp_path: Path, pg_url: str, key_file: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init_state(a, cluster=ClusterSettings(key_file), db_url=pg_url)
    init_state(b, cluster=ClusterSettings(key_file, join=True), db_url=pg_url)
    engine = db.make_engine(pg_url)

    def delete_row() -> None:
        with engine.begin() as conn:
            conn.execute(
                db.cluster_secrets.delete().where(db.cluster_secrets.c.name == IDENTITY_ROW)
            )

    # A new admin token on A: B keeps the old one, so A alone refuses until it republishes.
    (a / "admin.token").write_text("new-admin-token\n")
    with pytest.raises(ClusterIdentityError, match=r"another admin\.token"):
        take_identity(a, ClusterSettings(key_file), db_url=pg_url)
    delete_row()
    assert take_identity(a, ClusterSettings(key_file), db_url=pg_url) == "published"
    (b / "admin.token").unlink()
    assert take_identity(b, ClusterSettings(key_file, join=True), db_url=pg_url) == "joined"
    assert (b / "admin.token").read_text() == "new-admin-token\n"

    # A new cluster key: republished by A, B's files match under it.
    new_key = tmp_path / "new.key"
    create_key_file(new_key)
    delete_row()
    assert take_identity(a, ClusterSettings(new_key), db_url=pg_url) == "published"
    assert take_identity(b, ClusterSettings(new_key, join=True), db_url=pg_url) == "unchanged"
    with pytest.raises(ClusterIdentityError, match="wrong cluster key"):
        take_identity(b, ClusterSettings(key_file, join=True), db_url=pg_url)
    engine.dispose()

"""The server's state directory: certificates, the admin token and the join token.

Created on first start; every secret is written with mode 0600 and never overwritten.
With a cluster key (``deployctl server --cluster-key-file``), the CA, the tokens and the
secrets key are the cluster's, taken from (or first published to) the shared database by
:mod:`deploy_core.server.cluster_identity`; the server certificate and ``server.id`` stay
each replica's own.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from deploy_core.private import private_dir
from deploy_core.server.cluster_identity import ClusterSettings, take_identity
from deploy_core.transport import ServerCerts, ensure_server_certs

ADMIN_TOKEN = "admin.token"
JOIN_TOKEN = "join.token"
SERVER_INFO = "server.json"


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0600, atomically; an existing file is kept."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def read_secret(path: Path) -> str:
    """A secret file's value, stripped."""
    return path.read_text().strip()


def ensure_secret(path: Path) -> str:
    """Read the secret at ``path``, creating a random one first if there is none."""
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(32))
    return read_secret(path)


@dataclass(frozen=True)
class ServerState:
    """Paths and secrets of one server's state directory."""

    root: Path
    certs: ServerCerts
    admin_token: str
    join_token: str

    @property
    def admin_token_file(self) -> Path:
        """Where the admin API token lies."""
        return self.root / ADMIN_TOKEN

    @property
    def join_token_file(self) -> Path:
        """Where the agents' join token lies."""
        return self.root / JOIN_TOKEN

    @property
    def database_file(self) -> Path:
        """The default SQLite database."""
        return self.root / "deploy-center.db"


def init_state(
    root: Path,
    *,
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    cluster: ClusterSettings | None = None,
    db_url: str | None = None,
    migrate: bool = True,
) -> ServerState:
    """Create (or open) a state directory: CA and server certificate, admin and join tokens.
    The directory is made 0700 even when it already existed.

    :param cluster: take the shared identity from the database ``db_url`` first (publishing
        this one's when it has none, unless ``cluster.join``); ``migrate``: bring the
        database's schema up to date for it.
    :raises ClusterIdentityError: the identity cannot be taken; nothing was overwritten."""
    private_dir(root)
    if cluster is not None:
        take_identity(root, cluster, db_url=db_url, hostnames=hostnames, migrate=migrate)
    certs = ensure_server_certs(root, hostnames=hostnames)
    return ServerState(
        root=root,
        certs=certs,
        admin_token=ensure_secret(root / ADMIN_TOKEN),
        join_token=ensure_secret(root / JOIN_TOKEN),
    )

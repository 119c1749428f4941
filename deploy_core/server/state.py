"""The server's state directory: certificates, the admin token and the join token.

Created on first start; every secret is written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from deploy_core.private import private_dir
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
    root: Path, *, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
) -> ServerState:
    """Create (or open) a state directory: CA and server certificate, admin and join tokens.
    The directory is made 0700 even when it already existed."""
    private_dir(root)
    certs = ensure_server_certs(root, hostnames=hostnames)
    return ServerState(
        root=root,
        certs=certs,
        admin_token=ensure_secret(root / ADMIN_TOKEN),
        join_token=ensure_secret(root / JOIN_TOKEN),
    )

"""Secret environment values at rest: sealed with Fernet under a key of the state directory.

The server keeps a deployment's ``secret_env`` until the deployment finishes (it must send
it again if the agent reconnects).  In the database it is one Fernet token (AES-128-CBC and
HMAC-SHA256) under ``secrets.key`` of the server's state directory, made on first start
with mode 0600.  Replicas that share a database need the same key file.  Rows written in
plaintext by an older server are still read, and sealed when the server starts
(``RecordStore.seal_plaintext_secrets``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secrets.key"
# The one key of a sealed row: not a valid variable name, so never a real secret's name.
SEALED = "$fernet"


class SecretKeyMismatch(Exception):
    """A sealed value cannot be opened with this server's key."""


class SecretBox:
    """Seals and opens secret environments (``{name: value}``) for the database."""

    def __init__(self, key: bytes | None = None) -> None:
        """:param key: a Fernet key; ``None`` makes a random one that lives only as long as
        this object (for tools and tests that never read secrets back later)."""
        self._fernet = Fernet(key if key is not None else Fernet.generate_key())

    @classmethod
    def from_state_dir(cls, root: Path) -> SecretBox:
        """The box of a state directory, creating its key file (0600) on first use."""
        path = root / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            os.chmod(path, 0o600)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key() + b"\n")
        key = path.read_bytes().strip()
        try:
            return cls(key)
        except ValueError:
            raise ValueError(
                f"{path} does not hold a Fernet key (32 url-safe base64 bytes); restore it "
                "from a backup, or delete it only if no unfinished deployment has secrets"
            ) from None

    def seal(self, values: dict[str, str]) -> dict[str, str]:
        """What the database stores for ``values``."""
        return {SEALED: self._fernet.encrypt(json.dumps(values).encode()).decode()}

    def open(self, stored: dict[str, str]) -> dict[str, str]:
        """The values a stored row holds (a plaintext row of an older server as it is).

        :raises SecretKeyMismatch: the row was sealed under another key."""
        if not is_sealed(stored):
            return dict(stored)
        try:
            values: dict[str, str] = json.loads(self._fernet.decrypt(stored[SEALED].encode()))
        except InvalidToken:
            raise SecretKeyMismatch(
                f"a deployment's secret_env was sealed with another key than {KEY_FILE} of "
                "this server's state directory; every replica sharing the database needs the "
                "same key file"
            ) from None
        return values


def is_sealed(stored: dict[str, str]) -> bool:
    """Whether a stored secret environment is sealed (not plaintext of an older server)."""
    return set(stored) == {SEALED}

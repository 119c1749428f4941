"""API tokens with scopes and agents' join tokens, stored hashed (SHA-256).

Scopes are ordered: ``admin`` can do what ``deploy`` can, which can do what ``read`` can,
which can do what ``metrics`` can (scrape ``/metrics`` and nothing else).
The state directory's ``admin.token`` is an admin token that always works (the operator's
key to create the others); its ``join.token``, while the file exists, is a join token without
expiry or use limit, for the embedded default — delete it to accept only join tokens made
with ``deployctl token create --join``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from deploy_core.server.db import api_tokens, join_tokens
from deploy_core.server.rows import ApiTokenRow, JoinTokenRow

#: How stale a token's ``last_used`` may get: it is written at most this often (seconds).
LAST_USED_EVERY = 60.0

SCOPES = ("metrics", "read", "deploy", "admin")
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def digest(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def allows(granted: str, needed: str) -> bool:
    """Whether a token of scope ``granted`` may do what needs ``needed``."""
    return SCOPES.index(granted) >= SCOPES.index(needed)


class TokenError(ValueError):
    """A token request was refused; the message says why."""


@dataclass(frozen=True)
class Caller:
    """Who an API request comes from."""

    name: str
    scope: str


class TokenStore:
    """API tokens and join tokens in the server's database."""

    def __init__(self, engine: Engine, *, admin_token: str, join_token_file: Any = None) -> None:
        self.engine = engine
        self._admin = admin_token
        self._join_file = join_token_file

    # ------------------------------------------------------------------ API tokens

    def create_api_token(self, name: str, scope: str) -> str:
        """Make a named token; the only time its value is seen."""
        if not TOKEN_NAME.match(name):
            raise TokenError(f"token name {name!r}: letters, digits, '.', '_', '-', at most 64")
        if scope not in SCOPES:
            raise TokenError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        token = "dct_" + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    api_tokens.insert().values(
                        name=name, token_hash=digest(token), scope=scope, created_at=time.time()
                    )
                )
        except IntegrityError:
            raise TokenError(f"a token named {name!r} exists; revoke it first") from None
        return token

    def admin(self, token: str) -> Caller | None:
        """The admin caller if ``token`` is the admin token, else ``None``: no query, so the
        API checks it on the event loop before it asks the database (:meth:`verify`)."""
        if hmac.compare_digest(token.encode(), self._admin.encode()):
            return Caller("admin-file", "admin")
        return None

    def verify(self, token: str) -> Caller | None:
        """The caller a token belongs to, or ``None``."""
        caller = self.admin(token)
        if caller is not None:
            return caller
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(api_tokens.c.name, api_tokens.c.scope, api_tokens.c.last_used).where(
                    api_tokens.c.token_hash == digest(token)
                )
            ).first()
        if row is None:
            return None
        now = time.time()
        if row.last_used is None or now - row.last_used >= LAST_USED_EVERY:
            # A write at most once a minute per token, not one per API request.
            with self.engine.begin() as conn:
                conn.execute(
                    api_tokens.update().where(api_tokens.c.name == row.name).values(last_used=now)
                )
        return Caller(row.name, row.scope)

    def list_api_tokens(self) -> list[ApiTokenRow]:
        """Named tokens, without their hashes."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    api_tokens.c.name,
                    api_tokens.c.scope,
                    api_tokens.c.created_at,
                    api_tokens.c.last_used,
                ).order_by(api_tokens.c.name)
            )
            return [ApiTokenRow.from_row(r) for r in rows]

    def revoke_api_token(self, name: str) -> bool:
        """Delete a named token; ``False`` when there was none."""
        with self.engine.begin() as conn:
            return bool(conn.execute(api_tokens.delete().where(api_tokens.c.name == name)).rowcount)

    # ------------------------------------------------------------------ join tokens

    def create_join_token(
        self, *, ttl: float | None = None, uses: int | None = None, note: str = ""
    ) -> tuple[str, str, float | None]:
        """Make a join token that expires after ``ttl`` seconds and/or ``uses`` enrolments.

        :returns: its id (for listing and revoking), its value (shown once), and when it
            expires.
        """
        if ttl is not None and ttl <= 0:
            raise TokenError("ttl must be positive")
        if uses is not None and uses < 1:
            raise TokenError("uses must be at least 1")
        token_id = secrets.token_hex(6)
        token = "dcj_" + secrets.token_urlsafe(32)
        now = time.time()
        expires_at = now + ttl if ttl else None
        with self.engine.begin() as conn:
            conn.execute(
                join_tokens.insert().values(
                    token_id=token_id,
                    token_hash=digest(token),
                    created_at=now,
                    expires_at=expires_at,
                    uses_left=uses,
                    note=note[:200],
                )
            )
        return token_id, token, expires_at

    def consume_join_token(self, token: str) -> None:
        """Spend one use of a join token.

        :raises TokenError: unknown, expired or used up (the reason is told to the agent).
        """
        with self.engine.begin() as conn:
            self.spend_join_token(conn, token)

    def spend_join_token(self, conn: Connection, token: str) -> None:
        """Spend one use of a join token inside the caller's transaction ``conn`` (so that
        the use and what it pays for commit together, or neither does).

        :raises TokenError: unknown, expired or used up (the reason is told to the agent).
        """
        if self._join_file is not None and self._join_file.exists():
            file_token = self._join_file.read_text().strip()
            if file_token and hmac.compare_digest(token.encode(), file_token.encode()):
                return
        now = time.time()
        row = conn.execute(
            sa.select(join_tokens).where(join_tokens.c.token_hash == digest(token))
        ).first()
        if row is None:
            raise TokenError("join token refused")
        if row.expires_at is not None and row.expires_at < now:
            raise TokenError("join token expired")
        if row.uses_left is not None:
            if row.uses_left < 1:
                raise TokenError("join token used up")
            done = conn.execute(
                join_tokens.update()
                .where(join_tokens.c.token_id == row.token_id, join_tokens.c.uses_left > 0)
                .values(uses_left=join_tokens.c.uses_left - 1)
            ).rowcount
            if not done:
                raise TokenError("join token used up")

    def list_join_tokens(self) -> list[JoinTokenRow]:
        """Join tokens, without their hashes."""
        cols = [c for c in join_tokens.c if c.name != "token_hash"]
        with self.engine.connect() as conn:
            return [
                JoinTokenRow.from_row(r)
                for r in conn.execute(sa.select(*cols).order_by(join_tokens.c.created_at))
            ]

    def revoke_join_token(self, token_id: str) -> bool:
        """Delete a join token; ``False`` when there was none."""
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    join_tokens.delete().where(join_tokens.c.token_id == token_id)
                ).rowcount
            )

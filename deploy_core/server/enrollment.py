"""Agents' credentials as the QUIC handshake needs them: lookups, enrollment, upgrades.

:class:`AgentRegistry` is the server's :class:`~deploy_core.transport.AgentAuthority`. An
agent enrolls with a join token and the public half of a key pair it made itself; the
database keeps that public key and no secret. Enrolling again with the same key is a
sign-in that spends nothing, whatever the token's state (the key proves the agent), so an
agent whose WELCOME was lost gets in on its next try. Another key for an enrolled id is
refused until an operator runs ``deployctl clients forget``. An agent enrolled before key
pairs still proves its shared key, and :meth:`AgentRegistry.upgrade` replaces that key by
its public key.

While the database is unreachable no credential can be checked: the handshake is refused
for now with a clear reason and a retry-after hint (:data:`UNAVAILABLE_REASON`), which the
agent honours as it does a busy server's, and the server logs it in a few lines
(:class:`~deploy_core.server.db_health.OutageLog`), however many agents retry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from deploy_core.server.clients import AlreadyEnrolled
from deploy_core.server.db_health import RETRY_AFTER, OutageLog
from deploy_core.server.records import RecordStore
from deploy_core.server.tokens import TokenError, TokenStore
from deploy_core.transport import AgentCredential, AuthError

log = logging.getLogger(__name__)

#: Runs a blocking records call off the event loop (``DeployServer.db``).
RunBlocking = Callable[..., Awaitable[Any]]
#: What an agent is told when its handshake meets a database outage.
UNAVAILABLE_REASON = "the server cannot reach its database; retry later"
#: ``payload.code`` of that refusal.
UNAVAILABLE = "unavailable"

T = TypeVar("T")


def revoked_reason(client_id: str) -> str:
    """What a revoked agent that proved its key is told."""
    return (
        f"client {client_id} was revoked by an operator; an operator may enroll it again "
        "after 'deployctl clients forget'"
    )


class AgentRegistry:
    """Checks agents' credentials: join tokens to enroll, then each agent's own key."""

    def __init__(self, records: RecordStore, tokens: TokenStore, run: RunBlocking) -> None:
        """:param run: ``await run(fn, *args)`` runs a blocking call in a worker thread."""
        self._records = records
        self._tokens = tokens
        self._blocking = run
        self.outage = OutageLog(log, "agent handshakes", failures="refused")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread; a database outage refuses the handshake for now."""
        try:
            result: T = await self._blocking(fn, *args, **kwargs)
        except Exception as exc:
            if not self.outage.failed(exc):
                raise
            raise AuthError(UNAVAILABLE_REASON, UNAVAILABLE, retry_after=RETRY_AFTER) from None
        self.outage.ok()
        return result

    async def credential(self, client_id: str) -> AgentCredential | None:
        """What the server holds for ``client_id`` (see ``AgentAuthority.credential``)."""
        row = await self._run(self._records.client_credentials, client_id)
        if row is None:
            return None
        public_key, shared_key = row.public_key, row.agent_key
        return AgentCredential(
            public_key=bytes.fromhex(public_key) if public_key else None,
            shared_key=bytes.fromhex(shared_key) if shared_key else None,
            revoked=revoked_reason(client_id) if row.revoked_at is not None else None,
        )

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        """Enroll ``public_key`` for ``client_id`` with ``join_token``; the same key again
        signs in without spending the token (see ``AgentAuthority.enroll``)."""
        held = await self.credential(client_id)
        if held is not None and held.public_key == public_key:
            if held.revoked is not None:
                raise AuthError(held.revoked, "revoked")
            log.info("agent %s enrolled again with its key; no join-token use spent", client_id)
            return
        if held is not None:
            raise AuthError(
                f"client id {client_id} is already enrolled with another key; use the agent's "
                "existing state directory, or have an operator run 'deployctl clients forget "
                f"{client_id}' first"
            )

        def spend(conn: Connection) -> None:
            self._tokens.spend_join_token(conn, join_token)

        try:
            added = await self._run(
                self._records.enroll, client_id, public_key=public_key.hex(), spend=spend
            )
        except TokenError as exc:
            raise AuthError(str(exc)) from None
        except AlreadyEnrolled:
            raise AuthError(
                f"client id {client_id} is already enrolled with another key; have an operator "
                f"run 'deployctl clients forget {client_id}' first"
            ) from None
        log.info(
            "agent %s enrolled%s",
            client_id,
            "" if added else " (by a concurrent attempt with the same key)",
        )

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        """Keep ``public_key`` for an agent that proved its shared key; forget that key."""
        if await self._run(self._records.set_public_key, client_id, public_key.hex()):
            log.info("agent %s upgraded to its own key pair; shared key forgotten", client_id)

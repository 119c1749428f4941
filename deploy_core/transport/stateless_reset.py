"""QUIC stateless resets (RFC 9000 section 10.3): a restarted server tells agents at once
that their connection is gone.

After a ``kill -9`` and restart the server no longer knows any connection. Each agent went
on sending heartbeats into the void and noticed only after three were missed (15-20 s with
the default 5 s heartbeat), which delayed the whole fleet's return by that long. aioquic
neither sends nor recognises stateless resets, so this module does both:

- **The server** gives every connection id it issues a reset token derived from a key that
  survives a restart (:class:`StatelessResets`; :class:`~.server.QuicServer` derives the key
  from its TLS private key, so no new secret is stored). A short-header packet for a
  connection id it does not know is answered with a stateless reset carrying that id's
  token: a datagram that looks like any other short-header packet and ends with the token.
  The reset is always shorter than the packet it answers (never an amplifier, and two
  endpoints cannot keep resetting each other), never sent for packets too short to allow
  that, and at most :data:`RESET_RATE` per second.
- **The agent** (:func:`is_stateless_reset`) compares the last 16 bytes of each datagram
  with the tokens of the server's connection ids it holds. On a match the connection ends at
  once, without a packet sent (:func:`drain_after_reset`), and the agent reconnects as after
  any loss.

Only the holder of the key can make a valid token, and the tokens travel inside the
encrypted handshake and NEW_CONNECTION_ID frames, so an attacker on the path who sees
connection ids cannot forge a reset.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode

if TYPE_CHECKING:
    from aioquic.quic.connection import QuicConnection

__all__ = [
    "MIN_RESET_SIZE",
    "RESET_RATE",
    "RESET_REASON",
    "StatelessResets",
    "drain_after_reset",
    "is_stateless_reset",
    "reset_key_from",
]

#: The token's size and the smallest stateless reset (5 unpredictable bytes, then the token).
TOKEN_SIZE = 16
MIN_RESET_SIZE = 21
#: Above this a reset need not mimic the size of what it answers (RFC 9000 section 10.3).
_LONGEST_RESET = 43
#: Resets a server sends per second at most (burst the same): after a restart each agent's
#: next heartbeat (2,000 agents: 400 a second) and its retransmissions are answered.
RESET_RATE = 2000.0
#: Why the agent's connection ended, in its log.
RESET_REASON = "stateless reset: the server no longer knows this connection (it restarted)"
_KEY_LABEL = b"deploy-center quic stateless reset v1\0"


def reset_key_from(secret: bytes) -> bytes:
    """A 32-byte reset key derived from a secret the server keeps across restarts (its TLS
    private key), separate from any other use of that secret."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


class StatelessResets:
    """The server's reset tokens and the resets it sends.

    :param key: 32 bytes or more that survive a restart; with ``None`` a random key, so
        tokens still work while this process lives but a restarted server's resets are
        not recognised.
    :param rate: resets per second at most (also the burst).
    :param clock: monotonic seconds (a parameter for tests only).
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        rate: float = RESET_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if key is not None and len(key) < 32:
            raise ValueError(f"a stateless reset key needs 32 bytes or more, got {len(key)}")
        if rate <= 0:
            raise ValueError(f"the reset rate must be positive, got {rate}")
        self._key = key if key is not None else os.urandom(32)
        self._rate = rate
        self._clock = clock
        self._allowance = rate
        self._checked = clock()
        #: Resets sent, and resets not sent because of the rate, since the start.
        self.sent = 0
        self.limited = 0

    def token(self, cid: bytes) -> bytes:
        """The reset token of connection id ``cid``."""
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:TOKEN_SIZE]

    def issue(self, quic: QuicConnection) -> None:
        """Give ``quic`` (a server connection, before its handshake) this key's tokens, for
        the connection id it starts with and for every one it issues later.

        Replaces the random tokens aioquic makes (``_host_cids``, and those its
        ``_replenish_connection_ids`` adds); on an aioquic without them nothing changes."""
        host_cids = getattr(quic, "_host_cids", None)
        replenish = getattr(quic, "_replenish_connection_ids", None)
        if not isinstance(host_cids, list) or not callable(replenish):
            return
        self._retoken(host_cids)

        def replenish_with_our_tokens() -> None:
            replenish()
            self._retoken(host_cids)

        quic._replenish_connection_ids = replenish_with_our_tokens  # type: ignore[method-assign]

    def _retoken(self, host_cids: list[Any]) -> None:
        # A token depends only on its id, so one already announced is set to what it was:
        # the first id's goes out with the handshake (which has not begun when issue()
        # runs), the others' in NEW_CONNECTION_ID frames written after replenishing.
        for connection_id in host_cids:
            connection_id.stateless_reset_token = self.token(connection_id.cid)

    def reset_for(self, data: bytes, cid_length: int) -> bytes | None:
        """The stateless reset answering ``data``, a datagram for an unknown connection, or
        ``None`` when none may be sent: not a short-header packet, too short to answer with
        a smaller datagram, or over the rate."""
        if len(data) <= MIN_RESET_SIZE or data[0] & 0x80 or len(data) < 1 + cid_length:
            return None
        now = self._clock()
        self._allowance = min(self._rate, self._allowance + (now - self._checked) * self._rate)
        self._checked = now
        if self._allowance < 1.0:
            self.limited += 1
            return None
        self._allowance -= 1.0
        self.sent += 1
        size = min(len(data) - 1, _LONGEST_RESET)
        cid = data[1 : 1 + cid_length]
        unpredictable = os.urandom(size - TOKEN_SIZE)
        # A short header's first bits: form 0, fixed bit 1; the rest unpredictable.
        first = 0x40 | (unpredictable[0] & 0x3F)
        return bytes([first]) + unpredictable[1:] + self.token(cid)


def is_stateless_reset(quic: QuicConnection, data: bytes) -> bool:
    """Whether ``data``, a datagram from the server, is a stateless reset of ``quic`` (an
    agent's connection): a short-header packet ending with the token of one of the server's
    connection ids this connection holds. ``False`` on an aioquic that keeps no tokens."""
    if len(data) < MIN_RESET_SIZE or data[0] & 0x80:
        return False
    tail = data[-TOKEN_SIZE:]
    current = getattr(quic, "_peer_cid", None)
    available = getattr(quic, "_peer_cid_available", None)
    candidates = [current, *(available if isinstance(available, list) else ())]
    found = False
    for connection_id in candidates:
        token = getattr(connection_id, "stateless_reset_token", None)
        if isinstance(token, bytes) and len(token) == TOKEN_SIZE:
            found |= hmac.compare_digest(token, tail)
    return found


def drain_after_reset(quic: QuicConnection, now: float) -> None:
    """End ``quic`` after a stateless reset: no packet is sent any more (RFC 9000 section
    10.3.1), and its end, with :data:`RESET_REASON`, is what
    :func:`~.quic_settings.peer_closed` reports from now on."""
    if getattr(quic, "_close_event", None) is not None:
        return
    quic._close_event = ConnectionTerminated(  # type: ignore[attr-defined]
        error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase=RESET_REASON
    )
    close_begin = getattr(quic, "_close_begin", None)
    if callable(close_begin):
        close_begin(is_initiator=False, now=now)

"""What a QUIC server counts about its connections, for the server's metrics.

Plain integers, bumped in the event loop and read when metrics are scraped
(:mod:`deploy_core.server.metrics`); the transport imports no metrics library.  Every key is
from a small fixed set (message kinds, the reasons below), never a client id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: Why the server refused a connection (``refusals``); ``busy`` is counted by the handshake
#: gate (admission.py), before any connection exists; ``unavailable``: the server could not
#: check the agent's credentials for now (its database is unreachable; the agent retries).
REFUSAL_REASONS = ("auth", "unavailable", "handshake_timeout", "protocol", "flood", "internal")
#: Who ended an authenticated connection (``disconnects``): the ``agent`` (or the network),
#: the ``server`` (revoked, shutting down, a protocol breach), its ``idle_timeout``, or a
#: newer connection of the same client that ``replaced`` it.
DISCONNECT_REASONS = ("agent", "server", "idle_timeout", "replaced")


@dataclass
class TransportStats:
    """Counts since the server started."""

    connects: int = 0
    disconnects: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    #: Control-stream envelopes and their framed bytes, by kind, from and to agents.
    messages_received: Counter[str] = field(default_factory=Counter)
    bytes_received: Counter[str] = field(default_factory=Counter)
    messages_sent: Counter[str] = field(default_factory=Counter)
    bytes_sent: Counter[str] = field(default_factory=Counter)
    #: Artifact bytes sent on file streams of connections that have closed (live ones are
    #: added by :meth:`QuicServer.artifact_bytes_sent`).
    artifact_bytes_closed: int = 0

    def received(self, kind: str, size: int) -> None:
        """One envelope of ``size`` framed bytes arrived."""
        self.messages_received[kind] += 1
        self.bytes_received[kind] += size

    def sent(self, kind: str, size: int) -> None:
        """One envelope of ``size`` framed bytes was queued for an agent."""
        self.messages_sent[kind] += 1
        self.bytes_sent[kind] += size

"""The QUIC settings both ends use: flow-control windows, datagram sizes, congestion control
and UDP socket buffers.

Apart from :mod:`.server` so that an agent, which needs only these, does not import the server
endpoint (issue 12 item 6); :mod:`.server` re-exports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

from aioquic import tls
from aioquic.quic.events import ConnectionTerminated

if TYPE_CHECKING:
    from aioquic.quic.connection import QuicConnection

__all__ = [
    "ANSWERLESS_ACK_DELAY",
    "CONGESTION_CONTROL",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_DATA",
    "MAX_DATAGRAM_SIZE",
    "MAX_STREAM_DATA",
    "MESSAGE_ACK_DELAY",
    "PROBE_FLOOR",
    "SOCKET_BUFFER_BYTES",
    "ack_due",
    "acknowledge_with_answer",
    "datagram_size_for",
    "defer_acknowledgement",
    "enlarge_socket_buffers",
    "pace_acknowledgement",
    "patient_probes",
    "peer_closed",
]

#: Connection-wide and per-stream flow-control windows (both ends use the same).
MAX_DATA = 16 << 20
MAX_STREAM_DATA = 8 << 20
#: Fits a 1500-byte Ethernet MTU with room for tunnels.
MAX_DATAGRAM_SIZE = 1350
#: On loopback there is no path to fit: the largest datagram of a 1500-byte MTU (IPv4).
LOOPBACK_DATAGRAM_SIZE = 1472
#: aioquic offers "reno" and "cubic" (measured by bench/transfer.py).
CONGESTION_CONTROL = "reno"
#: UDP socket buffers; the kernel's default (~208 KiB) drops bursts of a fast sender.
#: Linux caps the request at net.core.rmem_max / wmem_max.
SOCKET_BUFFER_BYTES = 4 << 20


def datagram_size_for(host: str) -> int:
    """The datagram size to use towards or on ``host``: larger on loopback only."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return LOOPBACK_DATAGRAM_SIZE if loopback else MAX_DATAGRAM_SIZE


def enlarge_socket_buffers(transport: asyncio.BaseTransport, size: int) -> None:
    """Ask for ``size``-byte send and receive buffers on a UDP transport's socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


#: How long the acknowledgement of a message may wait for the answer to ride with: kept
#: under the 25 ms ``max_ack_delay`` aioquic announces, so the peer's loss timers stay right.
MESSAGE_ACK_DELAY = 0.020
#: Below this a datagram holds no message (a heartbeat's PING frame, ~33 bytes).
_TINY_DATAGRAM = 64
#: From this size a datagram is part of a stream of bytes (an artifact, output): a full
#: packet is 1,350 bytes (1,472 on loopback); one of a few messages is smaller.
_BULK_DATAGRAM = 1300


def pace_acknowledgement(quic: QuicConnection, size: int, now: float, *, at_once: float) -> None:
    """Call before ``quic`` takes in a datagram of ``size`` bytes: set how soon it is
    acknowledged.

    aioquic acknowledges a packet 1 ms after it arrives. A message is answered a few
    milliseconds later (once journaled or committed), so each one cost the other end a
    packet carrying only the ACK, and this end a timer: 7 of the 14 datagrams of one
    ``true`` deployment. A message's ACK now waits up to :data:`MESSAGE_ACK_DELAY` for the
    answer, which carries it (:func:`acknowledge_with_answer`), or leaves on its own as before
    if none comes. A heartbeat (tiny) and bytes in bulk (large; the sender's window must keep
    moving) are acknowledged ``at_once`` seconds after they arrive, bulk also what waited.

    Sets aioquic's ``_ack_delay`` (read where an ack-eliciting packet arrives) and may bring
    forward the 1-RTT space's ``ack_at``; on an aioquic without them it does nothing."""
    if not isinstance(getattr(quic, "_ack_delay", None), float):
        return
    if _TINY_DATAGRAM <= size < _BULK_DATAGRAM:
        quic._ack_delay = MESSAGE_ACK_DELAY
        return
    quic._ack_delay = at_once
    if size >= _BULK_DATAGRAM:
        _ack_by(quic, now + at_once)


#: The least time either end waits for an acknowledgement before it sends again what is
#: unacknowledged (a probe, RFC 9002 section 6.2).
PROBE_FLOOR = 0.5


def patient_probes(quic: QuicConnection) -> None:
    """Call once the handshake is over: wait at least :data:`PROBE_FLOOR` before a probe.

    aioquic probes after the round-trip time plus the peer's ``max_ack_delay`` (25 ms): on
    loopback or a LAN about 30 ms, doubling each time. A server busy with a rollout to
    thousands of agents answers seconds late, not never; every agent then resent each
    unacknowledged message six or seven times (30 ms, 60 ms ... 4 s), and each copy was one
    more datagram for that same server to decrypt and acknowledge. Counting the peer's
    ``max_ack_delay`` as at least the floor keeps a real loss recovered within a second and
    the copies to two or three. Loss found by reordering (later packets acknowledged) is not
    touched: a lost packet amid a transfer is resent as soon as before.

    Sets aioquic's ``_loss.max_ack_delay``; on an aioquic without it, nothing changes."""
    loss = getattr(quic, "_loss", None)
    max_ack_delay = getattr(loss, "max_ack_delay", None)
    if isinstance(max_ack_delay, float) and max_ack_delay < PROBE_FLOOR:
        loss.max_ack_delay = PROBE_FLOOR  # type: ignore[union-attr]


def peer_closed(quic: QuicConnection) -> ConnectionTerminated | None:
    """The connection's end (the peer's CONNECTION_CLOSE) as soon as it arrived.

    aioquic hands the ConnectionTerminated event over only when its draining period ends,
    three probe timeouts later (with :data:`PROBE_FLOOR`, 1.5 s or more): meanwhile an agent
    would not know the server had closed, nor why. Reads aioquic's ``_close_event``."""
    event = getattr(quic, "_close_event", None)
    return event if isinstance(event, ConnectionTerminated) else None


#: How long an agent's acknowledgement of a datagram that gets no answer from it (the
#: server's ACKs of its events) may wait for the agent's next packet to carry it: under
#: :data:`PROBE_FLOOR`, the least the server waits before it probes (patient_probes counts
#: the agent's delay as legitimate up to there, so its RTT estimate stays right).
ANSWERLESS_ACK_DELAY = 0.2


def ack_due(quic: QuicConnection) -> float | None:
    """When this end's next acknowledgement is due (loop time), if one is owed."""
    space = _one_rtt(quic)
    ack_at = getattr(space, "ack_at", None)
    return ack_at if isinstance(ack_at, float) else None


def defer_acknowledgement(quic: QuicConnection, until: float) -> None:
    """Let the acknowledgement owed wait until ``until`` (loop time) for a packet of this
    end's own to carry it: for datagrams nothing here will answer (the caller knows that only
    once it has read them, after aioquic set the usual delay).  The caller makes sure nothing
    owed from before is delayed."""
    space = _one_rtt(quic)
    ack_at = getattr(space, "ack_at", None)
    if isinstance(ack_at, float) and ack_at < until:
        space.ack_at = until


def _one_rtt(quic: QuicConnection) -> Any:
    spaces = getattr(quic, "_spaces", None)
    return spaces.get(tls.Epoch.ONE_RTT) if isinstance(spaces, dict) else None


def acknowledge_with_answer(quic: QuicConnection, now: float) -> None:
    """Call before transmitting what this end sends: the packet carries the ACK of what
    arrived (aioquic writes an ACK only once it is due)."""
    _ack_by(quic, now)


def _ack_by(quic: QuicConnection, when: float) -> None:
    space = _one_rtt(quic)
    ack_at = getattr(space, "ack_at", None)
    if isinstance(ack_at, float) and ack_at > when:
        space.ack_at = when

"""Admission of new QUIC connections under storms (issue 13 §2).

A server restart with thousands of agents connected sends them all back at once. Each
handshake costs TLS, a signature check and a database lookup, so the server lets at most
``limit`` connections be in their handshake (QUIC/TLS up to the agent's WELCOME or its
refusal) at one time. The Initial packet of any further new connection is answered at once
with a stateless QUIC ``CONNECTION_CLOSE`` (error ``CONNECTION_REFUSED``) whose reason says
how long to wait::

    server busy: 64 handshakes in progress; retry after 2.0 s

No connection state, no TLS work: one small packet per refused Initial. The hint is a
reservation in a virtual queue: each refusal books the next free moment at the pace the
gate can give slots back (the larger of the handshakes ended over the last 2 s and
``limit`` slots turning over at the median time a handshake held one lately), so the
refused of a large storm are told to come back one after another at about the pace they can
be admitted, instead of all retrying into the same second; never less than
``retry_after``, never more than :data:`MAX_RETRY_AFTER`. Counting only the handshakes that
ended would keep the hints as long as they made the arrivals slow. Agents (:mod:`.client`)
read the hint with :func:`parse_busy_reason` and wait at least that long, plus a jitter of
at most a quarter of it.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable

from aioquic.buffer import UINT_VAR_MAX_SIZE
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType
from aioquic.quic.packet_builder import QuicPacketBuilder

__all__ = [
    "DEFAULT_BUSY_RETRY_AFTER",
    "DEFAULT_MAX_HANDSHAKES",
    "MAX_RETRY_AFTER",
    "HandshakeGate",
    "busy_close_packet",
    "busy_reason",
    "parse_busy_reason",
]

#: Connections in their handshake at once; sized for a 2-core server (a handshake costs a
#: few ms of CPU, so 64 keep it busy without queueing seconds of work).
DEFAULT_MAX_HANDSHAKES = 64
#: The shortest hint; with no handshake measured yet, also what one handshake is assumed
#: to take (``limit`` slots turn over in this long).
DEFAULT_BUSY_RETRY_AFTER = 0.5
#: The longest hint the server gives (and the longest an agent honours).
MAX_RETRY_AFTER = 30.0

_BUSY = re.compile(r"server busy: .*retry after (\d+(?:\.\d+)?) s")


def busy_reason(in_progress: int, retry_after: float) -> str:
    """The reason phrase of a busy refusal (what :func:`parse_busy_reason` reads)."""
    return f"server busy: {in_progress} handshakes in progress; retry after {retry_after:.1f} s"


def parse_busy_reason(reason: str) -> float | None:
    """The seconds a busy refusal asks to wait, capped at :data:`MAX_RETRY_AFTER`; ``None``
    when ``reason`` is not a busy refusal."""
    match = _BUSY.search(reason)
    if match is None:
        return None
    return min(float(match.group(1)), MAX_RETRY_AFTER)


def busy_close_packet(version: int, client_dcid: bytes, client_scid: bytes, reason: str) -> bytes:
    """A server Initial packet closing a connection attempt with ``CONNECTION_REFUSED``.

    Stateless: the Initial keys derive from the destination connection id the client chose
    (``client_dcid``), as in aioquic's own INVALID_TOKEN close after a bad Retry token.
    """
    crypto = CryptoPair()
    crypto.setup_initial(cid=client_dcid, is_client=False, version=version)
    builder = QuicPacketBuilder(
        host_cid=client_dcid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=client_scid,
        version=version,
    )
    phrase = reason.encode("utf-8")[:300]
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    buf = builder.start_frame(
        QuicFrameType.TRANSPORT_CLOSE, capacity=1 + 3 * UINT_VAR_MAX_SIZE + len(phrase)
    )
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


class HandshakeGate:
    """Counts the connections in their handshake and decides who may start one.

    :param limit: at most this many at once (at least 1).
    :param retry_after: the base of the hint given to the refused, in seconds (> 0).
    :param clock: monotonic seconds (a parameter for tests only).
    """

    def __init__(
        self,
        limit: int = DEFAULT_MAX_HANDSHAKES,
        retry_after: float = DEFAULT_BUSY_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"the handshake limit must be at least 1, got {limit}")
        if not 0 < retry_after <= MAX_RETRY_AFTER:
            raise ValueError(
                f"the busy retry-after must be in (0, {MAX_RETRY_AFTER:g}] s, got {retry_after}"
            )
        self.limit = limit
        self.base_retry_after = retry_after
        self._clock = clock
        #: Connections in their handshake now (a gauge).
        self.in_progress = 0
        #: The most that were ever in their handshake at once.
        self.peak = 0
        #: New connections refused because the gate was full, since the start.
        self.refused = 0
        # When handshakes ended (slots given back), for the turnover rate.
        self._ended: collections.deque[float] = collections.deque(maxlen=4096)
        # How long the last handshakes held their slot (seconds), for the capacity.
        self._durations: collections.deque[float] = collections.deque(maxlen=256)
        self._capacity = 0.0  # slots a second at their median hold; 0 before 8 measures
        # The virtual queue's end: the moment the last refused agent was told to come back.
        self._reserved = clock()
        self._last_hint = retry_after

    def try_enter(self) -> bool:
        """Take a handshake slot; ``False`` (and a refusal counted) when all are taken."""
        if self.in_progress >= self.limit:
            now = self._clock()
            self._reserved = max(self._reserved, now) + 1.0 / self._turnover_rate(now)
            self._last_hint = min(max(self._reserved - now, self.base_retry_after), MAX_RETRY_AFTER)
            self.refused += 1
            return False
        self.in_progress += 1
        self.peak = max(self.peak, self.in_progress)
        return True

    def leave(self, held: float | None = None) -> None:
        """Give a slot back (the handshake ended, either way), held for ``held`` seconds
        when known."""
        self.in_progress = max(0, self.in_progress - 1)
        self._ended.append(self._clock())
        if held is not None and held >= 0:
            self._durations.append(held)
            if len(self._durations) >= 8:
                median = sorted(self._durations)[len(self._durations) // 2]
                self._capacity = self.limit / max(median, 0.01)

    def pace(self) -> float:
        """Slots the gate gives back per second, as the hints count on (see
        :meth:`try_enter`)."""
        return self._turnover_rate(self._clock())

    def queued(self) -> int:
        """About how many refused agents were told to come back and are not due yet: the
        virtual queue's length at the rate slots are given back."""
        now = self._clock()
        ahead = self._reserved - now
        if ahead <= 0:
            return 0
        return int(ahead * self._turnover_rate(now))

    def retry_after(self) -> float:
        """The hint for the refusal just counted, in seconds: how long until the slot it
        booked in the virtual queue, at least the base, at most :data:`MAX_RETRY_AFTER`."""
        return self._last_hint

    def _turnover_rate(self, now: float) -> float:
        """Slots the gate can give back per second: the larger of those given back over
        the last 2 s and what ``limit`` slots turn over at the median time a handshake held
        one lately (with fewer arrivals than the gate could take, the refused are told to
        come back as soon as they could be admitted, not at the pace they arrived; the
        pace of arrivals alone would keep the hints as long as they made it); before any
        measure, ``limit`` per base retry-after."""
        while self._ended and now - self._ended[0] > 2.0:
            self._ended.popleft()
        capacity = self._capacity
        if len(self._ended) < 2:
            return capacity or self.limit / self.base_retry_after
        return max(capacity, len(self._ended) / max(now - self._ended[0], 0.25))

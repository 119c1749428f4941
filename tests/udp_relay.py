"""A UDP relay on loopback that stands between one QUIC client and ``127.0.0.1:target_port``:
it can drop every datagram for a while (:meth:`UdpRelay.blackhole`) or forget its upstream
sockets so that the server sees the client come from a new port (:meth:`UdpRelay.reset`).

Used by the chaos harness (``tests/chaos_harness.py``) and the enrollment tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import cast

Address = tuple[str, int]

# --------------------------------------------------------------------------- the relay


class _Upstream(asyncio.DatagramProtocol):
    """The relay's socket towards the server for one client address."""

    def __init__(self, relay: UdpRelay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        if self.closed:  # reset while the socket was being made
            self.transport.close()
            return
        for data in self.waiting:
            self.transport.sendto(data)
        self.waiting.clear()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.waiting.append(data)
        elif not self.transport.is_closing():
            self.transport.sendto(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_server(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the server is down (ICMP port unreachable): like a lost datagram


class _Downstream(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class UdpRelay:
    """Forwards UDP datagrams between clients and ``127.0.0.1:target_port``, in a thread of
    its own.  Its listening port (:attr:`port`) stays the same for its whole life."""

    def __init__(self, target_port: int) -> None:
        if not 0 < target_port < 65536:
            raise ValueError(f"target_port must be a UDP port, got {target_port}")
        self.target_port = target_port
        self.port = 0
        self.forwarded = 0
        self.dropped = 0
        self._blocked_until = {"to_server": 0.0, "to_client": 0.0}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"udp-relay-{target_port}", daemon=True
        )
        self._downstream: asyncio.DatagramTransport | None = None
        self._upstreams: dict[Address, _Upstream] = {}

    def start(self) -> UdpRelay:
        """Bind 127.0.0.1 on a free port and start forwarding."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)
        return self

    async def _open(self) -> None:
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Downstream(self), local_addr=("127.0.0.1", 0)
        )
        self._downstream = transport
        self.port = transport.get_extra_info("sockname")[1]

    def blackhole(self, seconds: float, *, direction: str = "both") -> None:
        """Drop every datagram for ``seconds`` from now (0 ends a blackhole): both ways, or
        only ``"to_server"`` or ``"to_client"``."""
        ways = ("to_server", "to_client") if direction == "both" else (direction,)
        if not set(ways) <= set(self._blocked_until):
            raise ValueError(f"direction must be both, to_server or to_client, not {direction!r}")
        for way in ways:
            self._blocked_until[way] = time.monotonic() + seconds

    def blocked(self, direction: str) -> bool:
        """Whether datagrams going ``direction`` are being dropped right now."""
        return time.monotonic() < self._blocked_until[direction]

    def reset(self) -> None:
        """Close the sockets towards the server: the next datagrams leave from new ports, as
        after a NAT rebinding or a restarted middlebox."""
        self._loop.call_soon_threadsafe(self._close_upstreams)

    def _close_upstreams(self) -> None:
        for upstream in self._upstreams.values():
            upstream.close()
        self._upstreams.clear()

    def _from_client(self, data: bytes, addr: Address) -> None:
        if self.blocked("to_server"):
            self.dropped += 1
            return
        upstream = self._upstreams.get(addr)
        if upstream is None:
            upstream = self._upstreams[addr] = _Upstream(self, addr)
            self._loop.create_task(
                self._loop.create_datagram_endpoint(
                    lambda: upstream, remote_addr=("127.0.0.1", self.target_port)
                )
            )
        self.forwarded += 1
        upstream.send(data)

    def _from_server(self, data: bytes, client: Address) -> None:
        if self.blocked("to_client") or self._downstream is None:
            self.dropped += 1
            return
        self.forwarded += 1
        self._downstream.sendto(data, client)

    def close(self) -> None:
        """Stop forwarding and end the thread."""
        if not self._thread.is_alive():
            return

        def shut() -> None:
            self._close_upstreams()
            if self._downstream is not None:
                self._downstream.close()
            self._loop.call_later(0.05, self._loop.stop)

        self._loop.call_soon_threadsafe(shut)
        self._thread.join(10)
        self._loop.close()

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

__all__ = [
    "CONGESTION_CONTROL",
    "LOOPBACK_DATAGRAM_SIZE",
    "MAX_DATA",
    "MAX_DATAGRAM_SIZE",
    "MAX_STREAM_DATA",
    "SOCKET_BUFFER_BYTES",
    "datagram_size_for",
    "enlarge_socket_buffers",
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

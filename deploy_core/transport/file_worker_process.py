"""One file worker process (:mod:`.file_workers`): QUIC on a port of its own, serving artifact
file streams from the store directory to requests that carry a ticket of the server's.

Apart from :mod:`.file_workers` (which the server imports) because it builds on the server's
endpoint (:mod:`.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol, QuicStreamHandler
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

from .admission import HandshakeGate
from .envelope import ALPN_PROTOCOL
from .file_workers import TicketSigner, stored_file
from .files import FileRequest, FileStreamServer, TransferGate
from .quic_settings import (
    CONGESTION_CONTROL,
    MAX_DATA,
    MAX_STREAM_DATA,
    SOCKET_BUFFER_BYTES,
    datagram_size_for,
    enlarge_socket_buffers,
)
from .server import _AdmittingEndpoint, size_receive_buffer

__all__ = ["worker_main"]

# Handshakes a worker takes at once (agents connect to it only to fetch).
_MAX_HANDSHAKES = 256
_PR_SET_PDEATHSIG = 1


class _StoreFiles:
    """A worker's artifact source: the store directory, complete files only."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def locate(self, sha256: str) -> Path | None:
        return stored_file(self._root, sha256)


class _WorkerConnection(QuicConnectionProtocol):
    """One agent's connection to a worker: file streams only, each with its ticket."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: QuicStreamHandler | None = None,
        *,
        worker: _Worker,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._worker = worker
        self._flush_scheduled = False
        self._in_handshake = True
        self.files = FileStreamServer(
            quic,
            self.transmit,
            source=worker.source,
            client_id="(no ticket yet)",
            gate=worker.gate,
            queue_notices=True,
            tickets=worker.check,
        )

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        # As the server's agent connections: transmit once per loop turn, not per datagram.
        self._quic.receive_datagram(cast(bytes, data), addr, now=self._loop.time())
        self._process_events()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.transmit()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.files.data_received(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, StreamReset | StopSendingReceived):
            self.files.stream_reset(event.stream_id)
        elif isinstance(event, HandshakeCompleted):
            self._handshake_ended()
        elif isinstance(event, ConnectionTerminated):
            self._handshake_ended()
            self.files.close()

    def _handshake_ended(self) -> None:
        if self._in_handshake:
            self._in_handshake = False
            self._worker.handshakes.leave()


class _Worker:
    """What a worker process serves with."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.signer = TicketSigner(bytes.fromhex(config["secret"]), float(config["lifetime"]))
        self.source = _StoreFiles(Path(config["store"]))
        self.gate = TransferGate(int(config["max_transfers"]))
        self.handshakes = HandshakeGate(_MAX_HANDSHAKES)

    def check(self, request: FileRequest) -> str:
        return self.signer.check(request.ticket, request.sha256)


async def _serve_worker(config: dict[str, Any]) -> None:
    worker = _Worker(config)
    host = str(config["host"])
    configuration = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN_PROTOCOL],
        idle_timeout=float(config["idle_timeout"]),
        max_data=MAX_DATA,
        max_stream_data=MAX_STREAM_DATA,
        max_datagram_size=datagram_size_for(host),
        congestion_control_algorithm=CONGESTION_CONTROL,
    )
    configuration.load_cert_chain(config["cert"], config["key"])
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, int(config["port"]), type=socket.SOCK_DGRAM)
    family, _, proto, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    sock.setblocking(False)
    try:
        sock.bind(address)
    except OSError as exc:
        logging.getLogger(__name__).error("cannot listen on %s:%s: %s", host, config["port"], exc)
        sys.exit(1)
    transport, endpoint = await loop.create_datagram_endpoint(
        lambda: _AdmittingEndpoint(
            configuration=configuration,
            create_protocol=functools.partial(_WorkerConnection, worker=worker),
            gate=worker.handshakes,
            sock=sock,
        ),
        sock=sock,
    )
    enlarge_socket_buffers(transport, SOCKET_BUFFER_BYTES)
    size_receive_buffer(transport, SOCKET_BUFFER_BYTES * 2)
    port = int(transport.get_extra_info("sockname")[1])
    sys.stdout.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The server holds the other end of stdin: EOF means it is gone (or asks us to stop).
    eof = loop.run_in_executor(None, sys.stdin.buffer.read)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    endpoint.close()
    transport.close()
    # The reading thread may still block on stdin (a signal stopped us): do not wait for it.
    os._exit(0)


def _die_with_parent() -> None:
    """Linux: SIGTERM when the parent dies (besides the stdin EOF, which always works)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def worker_main() -> None:
    """One worker process (the server runs it with ``python -c``): its configuration is the
    first line of stdin (JSON), and it runs until stdin closes."""
    _die_with_parent()
    line = sys.stdin.buffer.readline()
    if not line:
        return
    config = json.loads(line)
    if os.getppid() != int(config["parent"]):
        return  # the server died before we started
    logging.basicConfig(
        level=int(config.get("log_level", logging.WARNING)),
        format=f"%(asctime)s file-worker-{config['index']} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aioquic's own lines (one per handshake) are noise, as in the server (cli/groups.py).
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(_serve_worker(config))

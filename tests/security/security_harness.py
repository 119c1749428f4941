"""Real parts for the hostile-input tests: an event loop in a thread (so that hypothesis and
schemathesis, which are synchronous, can drive async servers), a QUIC peer that follows no
rules, and agent credentials made by hand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.transport import ALPN_PROTOCOL, Envelope, FrameDecoder, Kind, ProtocolError, encode

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread; :meth:`run` waits for a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the loop and return its result (raising what it raised)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class RawPeer(QuicConnectionProtocol):
    """A QUIC client that speaks the framing but follows no rules: it sends whatever bytes
    it is told to, and records what comes back and how the connection ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder = FrameDecoder()
        self.received: asyncio.Queue[Envelope] = asyncio.Queue()
        self.stream_id: int | None = None
        self.terminated = asyncio.Event()
        self.close_reason = ""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            with contextlib.suppress(ProtocolError):
                for env in self.decoder.feed(event.data):
                    self.received.put_nowait(env)
        elif isinstance(event, ConnectionTerminated):
            self.close_reason = event.reason_phrase
            self.terminated.set()

    def send_raw(self, data: bytes, *, end: bool = False) -> None:
        """Write ``data`` on the control stream (the first bidirectional one)."""
        if self.stream_id is None:
            self.stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self.stream_id, data, end_stream=end)
        self.transmit()

    def send_env(self, env: Envelope) -> None:
        """Frame and send one envelope."""
        self.send_raw(encode(env))

    async def recv(self, timeout: float = 3.0) -> Envelope:
        """The next envelope from the server."""
        return await asyncio.wait_for(self.received.get(), timeout)

    async def refused(self, timeout: float = 8.0) -> str:
        """Wait until the connection is closed; the reason of the server's ERROR if it sent
        one, else the QUIC close reason.  (A close frame lost on the way is not sent again:
        then the peer's short idle timeout ends the connection, within ``timeout``.)"""
        try:
            await asyncio.wait_for(self.terminated.wait(), timeout)
        except TimeoutError:
            got = [env.kind.value for env in self.received._queue]  # type: ignore[attr-defined]
            raise AssertionError(
                f"the server did not close the connection within {timeout} s (got {got})"
            ) from None
        reasons = []
        while not self.received.empty():
            env = self.received.get_nowait()
            if env.kind is Kind.ERROR:
                reasons.append(str(env.payload.get("reason", "")))
        return reasons[0] if reasons else self.close_reason

    async def hello(self, client_id: str) -> bytes:
        """Send HELLO; the challenge's nonce."""
        self.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": client_id, "protocol": 1}))
        challenge = await self.recv()
        assert challenge.kind is Kind.CHALLENGE, challenge
        return bytes.fromhex(challenge.payload["nonce"])

    async def authenticate(self, client_id: str, key: bytes, **extra: Any) -> Envelope:
        """The whole handshake with an agent key; the server's answer to AUTH."""
        nonce = await self.hello(client_id)
        payload = {"method": "key", "mac": mac_for(key, nonce, client_id), **extra}
        self.send_env(Envelope(kind=Kind.AUTH, payload=payload))
        return await self.recv()

    async def round_trip(self, timeout: float = 3.0) -> None:
        """PING and wait for the PONG that answers it."""
        ping = Envelope(kind=Kind.PING)
        self.send_env(ping)
        while True:
            env = await self.recv(timeout)
            if env.kind is Kind.PONG and env.ref == ping.id:
                return


def mac_for(key: bytes, nonce: bytes, client_id: str) -> str:
    """The AUTH proof an agent with ``key`` sends for ``nonce``."""
    return hmac.new(key, nonce + client_id.encode(), hashlib.sha256).hexdigest()


@contextlib.asynccontextmanager
async def raw_peer(
    port: int, ca_cert: Path, timeout: float = 5.0, idle_timeout: float = 4.0
) -> AsyncIterator[RawPeer]:
    """A :class:`RawPeer` connected (TLS done, nothing sent) to 127.0.0.1:``port``."""
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN_PROTOCOL],
        cafile=str(ca_cert),
        verify_mode=ssl.CERT_REQUIRED,
        server_name="localhost",
        idle_timeout=idle_timeout,
    )
    client = connect("127.0.0.1", port, configuration=configuration, create_protocol=RawPeer)
    try:
        async with asyncio.timeout(timeout):
            peer = await client.__aenter__()
    except TimeoutError:
        raise AssertionError(f"no QUIC handshake with 127.0.0.1:{port} in {timeout} s") from None
    try:
        assert isinstance(peer, RawPeer)
        yield peer
    finally:
        # Leaving never waits long: a closed peer may not answer the close.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.__aexit__(None, None, None)


@contextlib.contextmanager
def running_server(state_dir: Path) -> Iterator[tuple[DeployServer, LoopThread]]:
    """A real :class:`DeployServer` (HTTP API and QUIC on free loopback ports, SQLite in
    ``state_dir``) running in a :class:`LoopThread`, and that thread."""
    loop = LoopThread()
    server = DeployServer(ServerConfig(state_dir=state_dir, api_port=0, quic_port=0))
    try:
        loop.run(server.start())
        yield server, loop
    finally:
        loop.run(server.stop())
        loop.close()

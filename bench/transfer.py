"""Artifact transfer goodput over QUIC on loopback, beside bare aioquic, in one run.

Three transfers of the same number of bytes, each from a server process to this process:

- **ours**: the agent's fetcher pulling an artifact from the server's store over a file stream
  (QuicServer + AgentConnector + ArtifactFetcher: disk reads, credits, SHA-256, disk writes);
- **bare tuned**: one aioquic stream from memory to a byte counter, with the QUIC settings the
  transport uses (windows, datagram size, congestion control, socket buffers);
- **bare default**: the same with aioquic's default configuration.

Rounds alternate the three so that a busy machine slows them alike; the figures are medians.
``--sweep`` also measures bare aioquic at other datagram sizes and congestion controls.

    python bench/transfer.py [--size-mb 50] [--rounds 5] [--sweep]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent, StreamDataReceived

from deploy_core.agent.artifacts import ArtifactFetcher
from deploy_core.server.artifacts import ArtifactStore
from deploy_core.testing import MemoryCredentials
from deploy_core.transport import (
    AgentConnector,
    AgentCredential,
    AuthError,
    QuicServer,
    ensure_server_certs,
)
from deploy_core.transport import server as transport_server
from deploy_core.transport.files import DEFAULT_CHUNK_SIZE

MB = 1 << 20
BARE_ALPN = "bench"


@dataclass(frozen=True)
class Settings:
    """QUIC settings of one bare run; ``None`` fields keep aioquic's defaults."""

    name: str
    max_data: int | None = None
    max_stream_data: int | None = None
    datagram: int | None = None
    congestion: str | None = None
    socket_buffer: int | None = None

    def configuration(self, *, is_client: bool) -> QuicConfiguration:
        options: dict[str, Any] = {}
        if self.max_data:
            options["max_data"] = self.max_data
        if self.max_stream_data:
            options["max_stream_data"] = self.max_stream_data
        if self.datagram:
            options["max_datagram_size"] = self.datagram
        if self.congestion:
            options["congestion_control_algorithm"] = self.congestion
        return QuicConfiguration(is_client=is_client, alpn_protocols=[BARE_ALPN], **options)


def transport_settings(name: str = "bare tuned", **changes: Any) -> Settings:
    """The settings deploy_core.transport uses, with ``changes``."""
    base = {
        "max_data": transport_server.MAX_DATA,
        "max_stream_data": transport_server.MAX_STREAM_DATA,
        "datagram": transport_server.datagram_size_for("127.0.0.1"),
        "congestion": transport_server.CONGESTION_CONTROL,
        "socket_buffer": transport_server.SOCKET_BUFFER_BYTES,
    }
    return Settings(name, **(base | changes))


def set_buffers(transport: Any, size: int | None) -> None:
    if size:
        transport_server.enlarge_socket_buffers(transport, size)


CpuClock = Callable[[], float]


@dataclass
class Sample:
    """Wall time of one transfer, and the CPU time both processes spent on it."""

    wall: float
    cpu: float

    @classmethod
    def start(cls, server_cpu: CpuClock) -> Sample:
        return cls(-time.perf_counter(), -time.process_time() - server_cpu())

    def stop(self, server_cpu: CpuClock) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time() + server_cpu()


# --------------------------------------------------------------------------- bare aioquic


class _Pusher(QuicConnectionProtocol):
    """Answers a stream carrying a decimal byte count with that many bytes, from memory."""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived) and event.data:
            left = int(event.data)
            block = secrets.token_bytes(MB)
            while left > 0:
                piece = block[: min(left, MB)]
                left -= len(piece)
                self._quic.send_stream_data(event.stream_id, piece, end_stream=left == 0)
            self.transmit()


class _Counter(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self.received += len(event.data)
            if event.end_stream and not self.done.done():
                self.done.set_result(None)


def _bare_server(certs_dir: str, settings: Settings, ready: Any) -> None:
    async def main() -> None:
        certs = ensure_server_certs(Path(certs_dir))
        configuration = settings.configuration(is_client=False)
        configuration.load_cert_chain(certs.cert, certs.key)
        endpoint = await serve("127.0.0.1", 0, configuration=configuration, create_protocol=_Pusher)
        set_buffers(endpoint._transport, settings.socket_buffer)
        ready.put(endpoint._transport.get_extra_info("sockname")[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


async def _bare_client(
    port: int, certs_dir: Path, settings: Settings, size: int, server_cpu: CpuClock
) -> Sample:
    configuration = settings.configuration(is_client=True)
    configuration.cafile = str(certs_dir / "ca.pem")
    configuration.verify_mode = ssl.CERT_REQUIRED
    configuration.server_name = "localhost"
    async with connect(
        "127.0.0.1", port, configuration=configuration, create_protocol=_Counter
    ) as client:
        assert isinstance(client, _Counter)
        set_buffers(client._transport, settings.socket_buffer)
        stream = client._quic.get_next_available_stream_id()
        sample = Sample.start(server_cpu)
        client._quic.send_stream_data(stream, str(size).encode())
        client.transmit()
        await client.done
        sample.stop(server_cpu)
        assert client.received == size
    return sample


# --------------------------------------------------------------------------- ours


class _Authority:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, bytes] = {}

    async def credential(self, client_id: str) -> AgentCredential | None:
        if client_id in self.public_keys:
            return AgentCredential(public_key=self.public_keys[client_id])
        key = self.keys.get(client_id)
        return None if key is None else AgentCredential(shared_key=key)

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        if join_token != "bench":
            raise AuthError("wrong token")
        self.public_keys[client_id] = public_key

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.keys.pop(client_id, None)
        self.public_keys[client_id] = public_key


async def _nothing(*args: Any) -> None:
    return None


def _our_server(certs_dir: str, store_dir: str, ready: Any) -> None:
    async def main() -> None:
        server = QuicServer(
            host="127.0.0.1",
            port=0,
            certs=ensure_server_certs(Path(certs_dir)),
            authority=_Authority(),
            on_connect=_nothing,
            on_message=_nothing,
            on_disconnect=_nothing,
            files=ArtifactStore(Path(store_dir)),
        )
        await server.start()
        ready.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _our_fetch(
    port: int, certs_dir: Path, cache: Path, sha: str, chunk: int, server_cpu: CpuClock
) -> Sample:
    connector = AgentConnector(
        host="127.0.0.1",
        port=port,
        ca_file=certs_dir / "ca.pem",
        client_id="bench",
        credentials=MemoryCredentials(token="bench"),
        capabilities=dict,
        on_message=_nothing,
    )
    task = asyncio.create_task(connector.run())
    try:
        if not await connector.wait_connected(15):
            raise RuntimeError(f"cannot connect: {connector.last_error}")
        shutil.rmtree(cache, ignore_errors=True)
        fetcher = ArtifactFetcher(connector, cache, chunk_size=chunk)
        sample = Sample.start(server_cpu)
        fetched = await fetcher.fetch(sha)
        sample.stop(server_cpu)
        assert fetched.bytes_transferred == fetched.size and not fetched.from_cache
        return sample
    finally:
        await connector.stop()
        await task


# --------------------------------------------------------------------------- driver


class ServerProcess:
    """A server in its own process (so both ends get a CPU), stopped on exit."""

    def __init__(self, target: Any, *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Queue()
        self.process = context.Process(target=target, args=(*args, ready), daemon=True)
        self.process.start()
        self.port: int = ready.get(timeout=60)

    def cpu(self) -> float:
        """CPU seconds the server process has used (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


async def _store(root: Path, size: int) -> str:
    async def body() -> AsyncIterator[bytes]:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MB))
            left -= len(block)
            yield block

    info, _ = await ArtifactStore(root).receive(body())
    return info.sha256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=50, help="bytes per transfer, in MiB")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three transfers")
    parser.add_argument("--chunk-kb", type=int, default=DEFAULT_CHUNK_SIZE // 1024)
    parser.add_argument("--sweep", action="store_true", help="also try other bare settings")
    args = parser.parse_args()
    size = args.size_mb * MB
    tuned = transport_settings()
    default = Settings("bare default")
    sweep = []
    if args.sweep:
        sweep = [
            transport_settings("tuned, datagram 1350", datagram=1350),
            transport_settings("tuned, datagram 1200", datagram=1200),
            transport_settings("tuned, datagram 1472", datagram=1472),
            transport_settings(
                "tuned, cubic" if tuned.congestion != "cubic" else "tuned, reno",
                congestion="reno" if tuned.congestion == "cubic" else "cubic",
            ),
            transport_settings("tuned, default socket buffers", socket_buffer=None),
            transport_settings("tuned, default windows", max_data=None, max_stream_data=None),
        ]
    chunks = [args.chunk_kb]
    if args.sweep:
        chunks += [kb for kb in (64, 1024) if kb != args.chunk_kb]
    samples: dict[str, list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        root = Path(tmp)
        certs_dir = root / "certs"
        ensure_server_certs(certs_dir)
        sha = asyncio.run(_store(root / "store", size))
        runs: list[tuple[str, Any]] = []
        for kb in chunks:
            name = "ours" if kb == args.chunk_kb else f"ours, chunk {kb} KiB"
            runs.append((name, kb))
        runs += [(settings.name, settings) for settings in [tuned, default, *sweep]]
        for round_ in range(args.rounds):
            # Rotate the order: a machine that gets busier or quieter favours no one.
            shift = round_ % len(runs)
            for name, what in runs[shift:] + runs[:shift]:
                if isinstance(what, Settings):
                    with ServerProcess(_bare_server, str(certs_dir), what) as server:
                        sample = asyncio.run(
                            _bare_client(server.port, certs_dir, what, size, server.cpu)
                        )
                else:
                    with ServerProcess(_our_server, str(certs_dir), str(root / "store")) as server:
                        sample = asyncio.run(
                            _our_fetch(
                                server.port, certs_dir, root / "cache", sha, what * 1024, server.cpu
                            )
                        )
                samples.setdefault(name, []).append(sample)
            print(
                f"round {round_ + 1}: "
                + ", ".join(f"{name} {size / s[-1].wall / 1e6:.1f}" for name, s in samples.items())
                + " MB/s",
                file=sys.stderr,
            )

    def goodput(name: str) -> float:
        return size / statistics.median(s.wall for s in samples[name]) / 1e6

    def cpu_per_mb(name: str) -> float:
        return statistics.median(s.cpu for s in samples[name]) / (size / 1e6) * 1e3

    print(
        f"transfer of {args.size_mb} MiB over QUIC on loopback, {args.rounds} rounds, "
        f"chunk {args.chunk_kb} KiB; medians (best goodput in brackets); CPU is both "
        "processes together"
    )
    print(
        f"settings: max_data {tuned.max_data}, max_stream_data {tuned.max_stream_data}, "
        f"datagram {tuned.datagram}, congestion {tuned.congestion}, "
        f"socket buffers {tuned.socket_buffer}"
    )
    for name, values in samples.items():
        best = size / min(s.wall for s in values) / 1e6
        print(
            f"  {name:30s} {goodput(name):7.1f} MB/s ({best:5.1f})   "
            f"{cpu_per_mb(name):6.1f} ms CPU per MB"
        )
    ours_ratio = goodput("ours") / goodput("bare tuned")
    tuned_ratio = goodput("bare tuned") / goodput("bare default")
    print(f"goodput ours / bare tuned:          {ours_ratio:5.2f}   (target >= 0.85)")
    print(f"goodput bare tuned / bare default:  {tuned_ratio:5.2f}   (target >= 1.5)")
    ours_cpu = cpu_per_mb("bare tuned") / cpu_per_mb("ours")
    tuned_cpu = cpu_per_mb("bare default") / cpu_per_mb("bare tuned")
    print(f"CPU efficiency ours / bare tuned:   {ours_cpu:5.2f}")
    print(f"CPU efficiency tuned / default:     {tuned_cpu:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

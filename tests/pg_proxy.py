"""A TCP proxy on loopback in front of the real PostgreSQL, which a test can cut and restore
(issue 15 item 6: the database unreachable).

- :meth:`PgProxy.cut`: every connection through the proxy is closed and new ones are closed
  as soon as they are accepted (the client sees "server closed the connection").
- :meth:`PgProxy.stall`: a black hole for new connections: they are accepted and never
  answered (the open ones are closed, as a restarted firewall or NAT would reset them).  An
  open connection whose packets are dropped cannot be shown on loopback (the proxy's kernel
  acknowledges them): the server's TCP keepalives and user timeout are for that.
- :meth:`PgProxy.restore`: connections work again (those held by a stall are closed).

It runs its own event loop in a thread, so a test on the asyncio loop and a test driving
processes both use it the same way.  It holds at most :data:`MAX_CONNECTIONS` connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any

MAX_CONNECTIONS = 200
CHUNK = 65536


class PgProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` until cut (see the module's text)."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.port = 0
        self.mode = "open"
        #: Connections accepted, in total and while not open (cut or stalled).
        self.accepted = 0
        self.accepted_while_down = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> PgProxy:
        self._thread.start()
        self._run(self._start())
        return self

    def cut(self) -> None:
        """Close every connection and refuse new ones."""
        self._run(self._set("cut"))

    def stall(self) -> None:
        """Close every connection; accept new ones but never answer them."""
        self._run(self._set("stall"))

    def restore(self) -> None:
        """Forward again."""
        self._run(self._set("open"))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def url(self, url: str) -> str:
        """``url`` (of the upstream) pointed at the proxy instead."""
        host, port = self.upstream
        return url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ------------------------------------------------------------------ in the loop

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()

    async def _set(self, mode: str) -> None:
        previous, self.mode = self.mode, mode
        if mode != "open" or previous == "stall":
            self._close_all()

    def _close_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode != "open":
            self.accepted_while_down += 1
        if self.mode == "cut" or len(self._writers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._writers.add(writer)
        if self.mode == "stall":
            return  # held, unanswered, until restore or cut closes it
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), 10
            )
        except (OSError, TimeoutError):
            self._writers.discard(writer)
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, writer), self._pipe(up_reader, writer, up_writer)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: Any
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if writer not in self._writers:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, other):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()

"""A real HTTP(S) server on loopback (stdlib, threaded) serving packages the way CDNs do, or
misbehaving on purpose: dropping the connection mid-body, stalling, ignoring ``Range``,
lying about or leaving out ``Content-Length``, redirecting. It records every request and
the body bytes it wrote."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Route:
    """How one path is served."""

    body: bytes = b""
    etag: str | None = '"v1"'
    #: The first ``cuts`` responses stop (connection closed) after this many body bytes.
    drop_after: int | None = None
    cuts: int = 1
    #: The first ``stalls`` responses pause this long after ``drop_after`` bytes, then go on.
    stall: float = 0.0
    stalls: int = 1
    ignore_range: bool = False
    #: ``None``: the true length; ``"missing"``: none (the connection closes at the end);
    #: a number: that value, whatever the body is.
    length: int | str | None = None
    redirect: str | None = None
    status: int = 200
    #: Answer a Range request with a range starting here instead (a broken cache).
    wrong_start: int | None = None
    #: Answer every Range request with 416.
    refuse_ranges: bool = False
    #: Send the body chunked (no Content-Length).
    chunked: bool = False


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class PackageServer:
    """Routes by path; ``url(path)`` for the address; ``seen`` and ``bytes_sent``."""

    port: int = 0
    scheme: str = "http"
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def ranges(self) -> list[str | None]:
        return [s.headers.get("Range") for s in self.seen]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.seen.append(Seen(self.path, dict(self.headers.items())))
        route = state.routes.get(urlsplit(self.path).path)
        if route is None:
            self._plain(404, b"not found")
            return
        if route.redirect is not None:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            self._plain(route.status, b"no")
            return
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted and route.refuse_ranges:
            self._plain(416, b"")
            return
        if wanted and not route.ignore_range and (if_range is None or if_range == route.etag):
            start, status = int(wanted.removeprefix("bytes=").rstrip("-")), 206
            if route.wrong_start is not None:
                start = route.wrong_start
        part = route.body[start:]
        self.send_response(status)
        if route.etag:
            self.send_header("ETag", route.etag)
        if status == 206:
            size = len(route.body)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        if route.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for at in range(0, len(part), 64 * 1024):
                    chunk = part[at : at + 64 * 1024]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    with state.lock:
                        state.bytes_sent += len(chunk)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        if route.length == "missing":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            length = len(part) if route.length is None else route.length
            self.send_header("Content-Length", str(length))
        self.end_headers()
        cut = stall = False
        with state.lock:
            if route.drop_after is not None and route.cuts > 0:
                route.cuts -= 1
                cut = True
            if route.drop_after is not None and route.stall and route.stalls > 0:
                route.stalls -= 1
                stall = True
        try:
            if cut or stall:
                assert route.drop_after is not None
                self._write(part[: route.drop_after])
                if cut:
                    self.close_connection = True
                    return
                time.sleep(route.stall)
                part = part[route.drop_after :]
            self._write(part)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _write(self, data: bytes) -> None:
        for at in range(0, len(data), 64 * 1024):
            chunk = data[at : at + 64 * 1024]
            self.wfile.write(chunk)
            with self.server.state.lock:
                self.server.state.bytes_sent += len(chunk)
        self.wfile.flush()

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: PackageServer

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet: clients hanging up on purpose (limits, cancellations) are expected."""


@contextmanager
def serve(tls: tuple[Path, Path] | None = None) -> Iterator[PackageServer]:
    """A :class:`PackageServer` on 127.0.0.1, https with ``tls`` = (cert, key)."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    state = PackageServer(port=httpd.server_address[1], scheme="https" if tls else "http")
    httpd.state = state
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1/localhost: (ca, cert, key)
    (the core's own certificate maker, as the server uses for QUIC)."""
    from deploy_core.transport.certs import ensure_server_certs

    certs = ensure_server_certs(directory / "tls", hostnames=("localhost", "127.0.0.1"))
    return certs.ca_cert, certs.cert, certs.key

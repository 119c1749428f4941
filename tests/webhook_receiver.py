"""A webhook receiver for tests: a stdlib HTTP server on 127.0.0.1 in a thread that checks
each delivery's signature with the snippet docs/operating.md gives users (run from the
document itself, so the document cannot drift from what the server sends), and answers as
the test says: 200, an error status, a redirect, a huge body, or not until released."""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deploy_core.testing import free_port

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operating.md"


def documented_verifier() -> Callable[..., bool]:
    """``verify_signature`` as docs/operating.md defines it."""
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def verify_signature" in b)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify_signature"]
    return verify


@dataclass
class Delivery:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    answered: int
    received_at: float = field(default_factory=time.time)

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver:
    """Start with :meth:`start`; ``mode`` is ``ok``, ``error`` (500), ``redirect`` (302),
    ``slow`` (200 after 0.2 s), ``huge`` (200 with a 50 MB body it never finishes),
    ``drip`` (200, then its body a byte every 0.2 s, for at most 60 s) or ``hold`` (answers
    when :attr:`release` is set, at most 60 s later)."""

    def __init__(
        self,
        secret: str,
        port: int | None = None,
        mode: str = "ok",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """:param tls: a certificate and key file: serve https:// with them."""
        self.secret = secret.encode()
        self.port = port or free_port()
        self.mode = mode
        self.tls = tls
        self.got: list[Delivery] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._verify = documented_verifier()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(min(length, 1 << 20))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = receiver._verify(
                    receiver.secret,
                    headers.get("x-deploy-center-timestamp", ""),
                    body,
                    headers.get("x-deploy-center-signature", ""),
                )
                mode = receiver.mode
                status = {"error": 500, "redirect": 302}.get(mode, 200)
                if not verified:
                    status = 401
                with receiver._cond:
                    receiver.got.append(Delivery(self.path, headers, body, verified, status))
                    receiver._cond.notify_all()
                if mode == "slow":
                    time.sleep(0.2)
                if mode == "hold":
                    receiver.holding.set()
                    receiver.release.wait(60)
                self.send_response(status)
                if mode == "redirect":
                    self.send_header("Location", f"http://127.0.0.1:{receiver.port}/elsewhere")
                if mode == "drip":
                    self.send_header("Content-Length", "300")
                    self.end_headers()
                    try:
                        for _ in range(300):
                            if receiver.release.wait(0.2):
                                break
                            self.wfile.write(b"x")
                            self.wfile.flush()
                    except OSError:
                        pass
                    return
                if mode == "huge":
                    self.send_header("Content-Length", str(50_000_000))
                    self.end_headers()
                    try:
                        for _ in range(200):  # bounded: 200 x 64 KiB, then the socket closes
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        pass
                    return
                try:
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"no" if status >= 300 else b"ok")
                except OSError:
                    pass  # the server gave up waiting (hold) and closed the connection

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused from now on."""
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(
        self, predicate: Callable[[list[Delivery]], bool], timeout: float = 60.0
    ) -> list[Delivery]:
        """Wait until ``predicate(deliveries so far)``; the deliveries (AssertionError if
        it does not come true in time)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.got):
                left = end - time.monotonic()
                if left <= 0:
                    seen = [(d.headers.get("x-deploy-center-event"), d.answered) for d in self.got]
                    raise AssertionError(f"receiver: condition not met in {timeout} s; got {seen}")
                self._cond.wait(min(left, 0.5))
            return list(self.got)

    def events(self, name: str) -> list[Delivery]:
        """The verified deliveries of event ``name`` so far."""
        with self._cond:
            return [
                d for d in self.got if d.verified and d.headers["x-deploy-center-event"] == name
            ]

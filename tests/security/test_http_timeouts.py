"""Slow and half-sent HTTP requests are closed, and strangers' connections are capped
(issue 10 §4, docs/security.md "HTTP").

A real :class:`~deploy_core.server.app.DeployServer` with short limits, driven by raw TCP
sockets on loopback: a slowloris client sending its headers a byte at a time, an upload whose
body stops, and more unauthenticated connections than the server keeps.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from security_harness import LoopThread
from websockets.sync.client import connect as ws_connect

from deploy_core.server.app import DeployServer, ServerConfig
from deploy_core.server.http.http_limits import HttpLimits
from deploy_core.testing import DeployCenter

# How long a test waits for the server at most before calling it a failure (not a speed
# target: the limits under test are seconds shorter).
GIVE_UP = 60.0


@contextlib.contextmanager
def serving(state_dir: Path, limits: HttpLimits) -> Iterator[DeployServer]:
    loop = LoopThread()
    server = DeployServer(
        ServerConfig(state_dir=state_dir, api_port=0, quic_port=0, http_limits=limits)
    )
    try:
        loop.run(server.start())
        yield server
    finally:
        loop.run(server.stop())
        loop.close()


def connect(server: DeployServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.api_port), timeout=GIVE_UP)
    sock.settimeout(GIVE_UP)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response on a kept-alive connection: status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def get(path: str, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n".encode()


def test_a_slowloris_client_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    limits = HttpLimits(header_timeout=2.0, body_timeout=30.0)
    with serving(tmp_path / "server", limits) as server:
        sock = connect(server)
        started = time.monotonic()
        request = get("/api/clients", server.state.admin_token)[:-2]  # never ends
        header = b"X-Slow: " + b"a" * 100
        sent = 0
        closed_by_server = False
        # One byte a second (well, every 0.25 s), far longer than the header timeout.
        for byte in (request + header)[:200]:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_by_server = True
                break
            sent += 1
            time.sleep(0.25)
            if sent > 20 and _closed(sock):
                closed_by_server = True
                break
        elapsed = time.monotonic() - started
        assert closed_by_server, f"still open after {sent} bytes over {elapsed:.1f} s"
        assert elapsed >= limits.header_timeout
        sock.close()

        # The server still answers a client that sends its request at once.
        with connect(server) as fresh:
            fresh.sendall(get("/api/clients", server.state.admin_token))
            status, _, _ = read_response(fresh)
        assert status == 200


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed (reading what it sent last: a 408 or nothing)."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)
        sock.settimeout(GIVE_UP)
    if data:
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"headers did not arrive within 2 s" in data
        return True
    return True  # EOF


def test_a_stalled_request_body_is_closed_after_the_body_timeout(tmp_path: Path) -> None:
    limits = HttpLimits(header_timeout=30.0, body_timeout=2.0)
    with serving(tmp_path / "server", limits) as server:
        sock = connect(server)
        started = time.monotonic()
        sock.sendall(
            b"POST /api/artifacts HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {server.state.admin_token}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n"
            + b"x" * 300_000
        )
        answer = read_until_closed(sock)  # then nothing more is sent
        elapsed = time.monotonic() - started
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b"no bytes of the request body arrived for 2 s" in answer
        assert elapsed >= limits.body_timeout
        # The half upload is gone from the store's temporary directory, nothing was stored.
        tmp = server.artifacts.root / "tmp"
        deadline = time.monotonic() + GIVE_UP
        while any(p.is_file() for p in tmp.rglob("*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in tmp.rglob("*") if p.is_file()] == []
        assert list((server.artifacts.root / "sha256").rglob("*")) == []


def test_strangers_past_the_cap_get_503_with_retry_after(tmp_path: Path) -> None:
    limits = HttpLimits(header_timeout=30.0, max_unauthenticated=3, retry_after=7)
    token = None
    with serving(tmp_path / "server", limits) as server:
        token = server.state.admin_token
        # A client that authenticated on its connection is not a stranger any more.
        operator = connect(server)
        operator.sendall(get("/api/clients", token))
        assert read_response(operator)[0] == 200

        idle = [connect(server) for _ in range(3)]  # three strangers, saying nothing
        try:
            time.sleep(0.3)  # the server has accepted them
            with connect(server) as fourth:
                fourth.sendall(get("/api/clients", token))
                answer = read_until_closed(fourth)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert b"retry-after: 7" in head
            assert b"3 connections that have not authenticated" in answer

            # The operator's kept-alive connection is still served.
            operator.sendall(get("/api/clients", token))
            assert read_response(operator)[0] == 200
        finally:
            for sock in idle:
                sock.close()
        operator.close()

        # Once the strangers are gone, a new client gets in.
        deadline = time.monotonic() + GIVE_UP
        while True:
            with connect(server) as again:
                again.sendall(get("/api/clients", token))
                status = read_response(again)[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200


def test_the_live_socket_outlives_both_timeouts(tmp_path: Path) -> None:
    limits = HttpLimits(header_timeout=1.0, body_timeout=1.0)
    with serving(tmp_path / "server", limits) as server:
        url = f"ws://127.0.0.1:{server.api_port}/api/live"
        with ws_connect(url, open_timeout=GIVE_UP) as ws:
            ws.send(json.dumps({"type": "auth", "token": server.state.admin_token}))
            assert json.loads(ws.recv(timeout=GIVE_UP))["type"] == "hello"
            time.sleep(3)  # past the header and the body timeout
            ws.ping().wait(GIVE_UP)  # answered: the socket is still open


def _slowloris_answer(port: int) -> bytes:
    """Start a request, never finish its headers; what the server says before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP) as sock:
        sock.settimeout(GIVE_UP)
        sock.sendall(b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
        return read_until_closed(sock)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], "within 1 s"), (["--http-header-timeout", "2"], "within 2 s")],
)
def test_the_server_config_sets_the_limits_and_a_flag_wins(
    tmp_path: Path, flags: list[str], expected: str
) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[http]\nheader_timeout = 1\nmax_unauthenticated = 50\n")
    center = DeployCenter(tmp_path / "c")
    center.server_args = ["--config", str(config), *flags]
    try:
        center.start_server()
        answer = _slowloris_answer(center.api_port)
    finally:
        center.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert f"headers did not arrive {expected}".encode() in answer


def test_a_bad_http_table_stops_the_server_before_it_starts(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[http]\nheader_timeout = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", "server", "--state-dir", str(tmp_path / "s"),
         "--config", str(config), "--api-port", "0", "--quic-port", "0"],
        capture_output=True,
        text=True,
        timeout=GIVE_UP,
    )  # fmt: skip
    assert done.returncode == 2
    assert "[http]: HTTP header_timeout must be a positive number" in done.stderr
    assert not (tmp_path / "s" / "server.json").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("header_timeout", 0.0), ("body_timeout", -1.0), ("max_unauthenticated", 0)],
)
def test_limits_refuse_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        HttpLimits(**{field: value})  # type: ignore[arg-type]

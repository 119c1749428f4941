"""The ``http`` check against real servers, run through the core's health loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from deploy_core.models import HealthCheckResult
from deploy_core.testing import RecordingReporter

RunCheck = Callable[[dict[str, Any]], Awaitable[HealthCheckResult]]


def reply(
    status: int,
    body: bytes = b"",
    *,
    framing: str = "length",
    chunk: int = 4,
    reason: str = "Whatever",
) -> bytes:
    """A raw HTTP/1.1 response whose body is framed by ``length`` (Content-Length),
    ``chunked`` (``chunk`` bytes per chunk) or ``close`` (read until the server closes)."""
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
    if framing == "length":
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    if framing == "chunked":
        chunks = b"".join(
            f"{len(body[i : i + chunk]):x};ext=1\r\n".encode() + body[i : i + chunk] + b"\r\n"
            for i in range(0, len(body), chunk)
        )
        return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
    assert framing == "close"
    return f"{head}Connection: close\r\n\r\n".encode() + body


@dataclass
class Request:
    at: float
    head: str


@dataclass
class HttpServer:
    """A started server: its port and every request head it received, with the time."""

    port: int = 0
    requests: list[Request] = field(default_factory=list)


StartHttpServer = Callable[..., Awaitable[HttpServer]]


@pytest.fixture
async def http_server() -> AsyncIterator[StartHttpServer]:
    """``server = await http_server(respond, delay=0.0)``: a real server on 127.0.0.1 that
    answers request number ``n`` (from 1) with the raw bytes ``respond(n)``, after ``delay``
    seconds, then closes the connection."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def start(respond: Callable[[int], bytes], *, delay: float = 0.0) -> HttpServer:
        record = HttpServer()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                record.requests.append(Request(time.monotonic(), head.decode("latin-1")))
                await asyncio.sleep(delay)
                writer.write(respond(len(record.requests)))
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the probe gave up first, as some tests intend
            finally:
                writer.close()
                handlers.discard(task)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        record.port = server.sockets[0].getsockname()[1]
        return record

    yield start
    for server in servers:
        server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


@pytest.fixture
def stdlib_server() -> Iterator[Callable[[str], int]]:
    """``port = stdlib_server("HTTP/1.0")``: :mod:`http.server` in a thread, answering
    ``/healthz`` with 200 "status: ok" and anything else with 503."""
    started: list[ThreadingHTTPServer] = []

    def start(protocol: str) -> int:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = protocol

            def do_GET(self) -> None:
                body = b"status: ok\n" if self.path == "/healthz" else b"down for maintenance\n"
                self.send_response(200 if self.path == "/healthz" else 503)
                if protocol == "HTTP/1.1":  # 1.0: no length, the body ends when we close
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server.server_address[1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def http(port: int, **options: Any) -> dict[str, Any]:
    """An ``http`` check spec as it appears in a deploy request, fast retries by default."""
    return {"type": "http", "port": port, "retries": 0, "interval": 0.05, **options}


# --------------------------------------------------------------------------- verdicts


async def test_http_200_is_healthy_at_the_first_attempt(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(200, b"ok"))

    result = await run_check(http(server.port, path="/healthz?full=1", retries=3))

    assert result.success is True
    assert result.check_type == "http"
    assert (result.attempts, result.retry_count, result.error) == (1, 0, None)
    assert result.response_time > 0
    [request] = server.requests
    lines = request.head.split("\r\n")
    assert lines[0] == "GET /healthz?full=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines
    assert "Connection: close" in lines


async def test_http_503_fails_after_every_retry_is_spent(
    run_check: RunCheck, http_server: StartHttpServer, reporter: RecordingReporter
) -> None:
    server = await http_server(lambda n: reply(503, b"starting"))

    result = await run_check(http(server.port, path="/healthz", retries=2, interval=0.05))

    assert result.success is False
    assert (result.attempts, result.retry_count) == (3, 2)
    assert result.error == f"HTTP 503 from 127.0.0.1:{server.port}/healthz"
    assert len(server.requests) == 3
    gaps = [b.at - a.at for a, b in zip(server.requests, server.requests[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps), gaps
    assert len(reporter.lines("health")) == 3


async def test_http_turning_healthy_on_the_second_request_succeeds_with_one_retry(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(503) if n == 1 else reply(200, b"ok"))

    result = await run_check(http(server.port, retries=3))

    assert result.success is True
    assert (result.attempts, result.retry_count, result.error) == (2, 1, None)
    assert len(server.requests) == 2


async def test_any_2xx_is_healthy_by_default(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(204))

    assert (await run_check(http(server.port))).success is True


async def test_expect_status_replaces_the_2xx_default(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(204))

    refused = await run_check(http(server.port, expect_status=[200]))
    accepted = await run_check(http(server.port, expect_status=[200, 204]))

    assert refused.error == f"HTTP 204 from 127.0.0.1:{server.port}/ (expected 200)"
    assert accepted.success is True


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_expect_body_reads_the_body_however_it_is_framed(
    run_check: RunCheck, http_server: StartHttpServer, framing: str
) -> None:
    good = await http_server(lambda n: reply(200, b'{"status": "ok"}', framing=framing))
    bad = await http_server(lambda n: reply(200, b'{"status": "degraded"}', framing=framing))

    healthy = await run_check(http(good.port, path="/healthz", expect_body='"ok"'))
    unhealthy = await run_check(http(bad.port, path="/healthz", expect_body='"ok"'))

    assert healthy.success is True, healthy.error
    assert unhealthy.success is False
    assert unhealthy.error == (
        f"""body does not contain '"ok"' (HTTP 200 from 127.0.0.1:{bad.port}/healthz)"""
    )


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_expect_body_looks_at_the_first_64_kb_only(
    run_check: RunCheck, http_server: StartHttpServer, framing: str
) -> None:
    early = await http_server(
        lambda n: reply(200, b"x" * 60_000 + b"ok" + b"x" * 10_000, framing=framing, chunk=7000)
    )
    late = await http_server(
        lambda n: reply(200, b"x" * 70_000 + b"ok", framing=framing, chunk=7000)
    )

    assert (await run_check(http(early.port, expect_body="ok"))).success is True
    result = await run_check(http(late.port, expect_body="ok"))
    assert result.error is not None and result.error.startswith("body does not contain 'ok'")


async def test_interim_1xx_responses_are_skipped(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"
    server = await http_server(lambda n: early_hints + reply(200, b"ok"))

    assert (await run_check(http(server.port, expect_body="ok"))).success is True


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1"])
async def test_works_against_the_stdlib_http_server(
    run_check: RunCheck, stdlib_server: Callable[[str], int], protocol: str
) -> None:
    port = stdlib_server(protocol)

    healthy = await run_check(http(port, path="/healthz", expect_body="status: ok"))
    down = await run_check(http(port, path="/", expect_body="status: ok"))

    assert healthy.success is True, healthy.error
    assert down.error == f"HTTP 503 from 127.0.0.1:{port}/"


# --------------------------------------------------------------------------- failures


async def test_closed_port_is_connection_refused_on_every_attempt(
    run_check: RunCheck, closed_port: int
) -> None:
    result = await run_check(http(closed_port, retries=1))

    assert result.success is False
    assert result.attempts == 2
    assert result.error == f"connection refused to 127.0.0.1:{closed_port}"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", "connection closed by {where} before a response"),
        (b"garbage\r\n\r\n", "bad HTTP response from {where}: status line 'garbage'"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
            "bad HTTP response from {where}: connection closed after 2 of 10 expected bytes",
        ),
    ],
    ids=["silent-close", "not-http", "short-body"],
)
async def test_broken_responses_are_reported_not_raised(
    run_check: RunCheck, http_server: StartHttpServer, raw: bytes, error: str
) -> None:
    server = await http_server(lambda n: raw)

    result = await run_check(http(server.port, expect_body="ok"))

    assert result.error == error.format(where=f"127.0.0.1:{server.port}/")


async def test_slow_server_attempts_time_out_and_are_retried(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(200, b"ok"), delay=2.0)

    result = await run_check(http(server.port, attempt_timeout=0.2, retries=1, interval=0))

    assert result.success is False
    assert (result.attempts, result.retry_count) == (2, 1)
    assert result.error == "attempt timed out after 0.2s"
    assert len(server.requests) == 2
    # No ceiling on the elapsed time (busy machines): the error above says each attempt
    # was cut at 0.2 s rather than waiting the server's 2 s.


# --------------------------------------------------------------------------- the core's loop


async def test_overall_timeout_stops_the_retries(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(503))
    started = time.monotonic()

    result = await run_check(http(server.port, retries=50, interval=0.1, timeout=0.5))

    elapsed = time.monotonic() - started
    assert result.success is False
    # Stopped by the overall timeout, not by running out of its 50 retries.
    assert 1 <= result.attempts < 51
    assert len(server.requests) == result.attempts
    assert result.error is not None
    assert result.error.startswith("overall timeout of 0.5s reached; last error: HTTP 503")
    assert elapsed >= 0.45


async def test_initial_delay_comes_before_the_first_request(
    run_check: RunCheck, http_server: StartHttpServer
) -> None:
    server = await http_server(lambda n: reply(200))
    started = time.monotonic()

    result = await run_check(http(server.port, initial_delay=0.3))

    assert result.success is True
    assert server.requests[0].at - started >= 0.25

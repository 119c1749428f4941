"""The ``http`` check: one HTTP/1.1 GET, healthy on an expected status (and body).

Plain asyncio streams, no client library: the check needs a status line, a few headers and
at most 64 KB of body, and the agent should not depend on an HTTP stack for that.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from deploy_core.plugin import DeployContext, HealthCheckParams
from health_checks import __version__
from health_checks.connect import ProbeFailed, close, open_connection
from health_checks.fields import Host, Port, StatusCode, format_address

MAX_BODY = 64 * 1024
MAX_HEADERS = 100
USER_AGENT = f"deploy-health-checks/{__version__}"


class HttpCheckParams(HealthCheckParams):
    """``{"type": "http", "port": 8080, "path": "/healthz"}``"""

    type: Literal["http"] = "http"
    scheme: Literal["http"] = Field(default="http", description="only plain HTTP for now")
    host: Host = "127.0.0.1"
    port: Port
    path: str = Field(
        default="/",
        max_length=2048,
        # Printable ASCII only: the path goes into the request line as is.
        pattern=r"^/[!-~]*$",
        description="request path (and query), starting with '/', percent-encoded",
    )
    expect_status: list[StatusCode] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="healthy status codes; default any 2xx",
    )
    expect_body: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="text the first 64 KB of the body must contain",
    )


@dataclass
class _Response:
    """What the probe learned: the status, the headers (lower-case names) and the reader."""

    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader


async def probe_http(params: HttpCheckParams, ctx: DeployContext) -> str | None:
    """One GET of ``params.path``; ``None`` when the status (and body) are as expected."""
    where = format_address(params.host, params.port) + params.path
    try:
        reader, writer = await open_connection(params.host, params.port)
        try:
            writer.write(_request(params))
            await writer.drain()
            response = await _read_head(reader, where)
            if not _status_ok(response.status, params.expect_status):
                expected = (
                    f" (expected {', '.join(map(str, params.expect_status))})"
                    if params.expect_status
                    else ""
                )
                return f"HTTP {response.status} from {where}{expected}"
            if params.expect_body is not None:
                body = await _read_body(response, where)
                if params.expect_body.encode() not in body:
                    return (
                        f"body does not contain {_short(params.expect_body)} "
                        f"(HTTP {response.status} from {where})"
                    )
        finally:
            await close(writer)
    except ProbeFailed as exc:
        return str(exc)
    except ConnectionResetError:
        return f"connection reset by {where}"
    except OSError as exc:
        return f"connection to {where} failed: {exc.strerror or exc}"
    except (asyncio.IncompleteReadError, ValueError) as exc:
        # IncompleteReadError: closed early; ValueError: a line over the stream limit.
        return f"bad HTTP response from {where}: {_describe(exc)}"
    return None


def _request(params: HttpCheckParams) -> bytes:
    host = format_address(params.host, params.port)
    if params.port == 80:
        host = host.rsplit(":", 1)[0]
    return (
        f"GET {params.path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


def _status_ok(status: int, expected: list[int] | None) -> bool:
    return 200 <= status <= 299 if expected is None else status in expected


async def _read_head(reader: asyncio.StreamReader, where: str) -> _Response:
    """Status line and headers of the final response (interim 1xx responses are skipped)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ProbeFailed(f"connection closed by {where} before a response")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not _is_status(parts[1]):
            raise ProbeFailed(f"bad HTTP response from {where}: status line {_short(line)}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ProbeFailed(f"bad HTTP response from {where}: headers cut short")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ProbeFailed(f"bad HTTP response from {where}: header line {_short(line)}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ProbeFailed(f"bad HTTP response from {where}: over {MAX_HEADERS} headers")
        if 100 <= status <= 199 and status != 101:
            continue
        return _Response(status, headers, reader)


async def _read_body(response: _Response, where: str) -> bytes:
    """Up to :data:`MAX_BODY` bytes of the body, however it is framed."""
    if response.status in (204, 304):
        return b""
    reader = response.reader
    if "chunked" in response.headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, where)
    length = response.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise ProbeFailed(f"bad HTTP response from {where}: Content-Length {length!r}")
        return await reader.readexactly(min(int(length), MAX_BODY))
    body = bytearray()
    while len(body) < MAX_BODY:
        chunk = await reader.read(MAX_BODY - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _read_chunked(reader: asyncio.StreamReader, where: str) -> bytes:
    body = bytearray()
    while len(body) < MAX_BODY:
        size_line = (await reader.readline()).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ProbeFailed(
                f"bad HTTP response from {where}: chunk size {_short(size_line)}"
            ) from None
        if size == 0:
            break
        # Past the limit the rest is never needed, so it is never read.
        body += await reader.readexactly(min(size, MAX_BODY - len(body)))
        if len(body) < MAX_BODY:
            await reader.readexactly(2)  # the CRLF after the chunk
    return bytes(body)


def _is_status(text: str) -> bool:
    return len(text) == 3 and text.isascii() and text.isdigit()


def _short(value: str | bytes, limit: int = 60) -> str:
    text = repr(value if isinstance(value, str) else value.decode("latin-1").rstrip("\r\n"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(exc: Exception) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"connection closed after {len(exc.partial)} of {exc.expected} expected bytes"
    return str(exc)

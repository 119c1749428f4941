"""Opening a TCP connection for a probe, with failures turned into short, readable errors.

Shared by the ``tcp`` and ``http`` checks so both word a refused or unresolvable address the
same way.  No timeout here: the core's health loop bounds every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from health_checks.fields import format_address


class ProbeFailed(Exception):
    """One attempt found the target unhealthy; the message is the check's error."""


async def open_connection(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port``, trying each address the name resolves to in turn.

    :raises ProbeFailed: refused, unresolvable, unreachable … with the address in the message.
    """
    address = format_address(host, port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ProbeFailed(f"cannot resolve host {host!r}: {exc.strerror or exc}") from None
    # Tried one by one rather than by asyncio.open_connection(host, ...), which folds the
    # errors of several addresses (localhost: ::1 and 127.0.0.1) into one opaque OSError.
    errors: list[OSError] = []
    for family, _, proto, _, sockaddr in infos:
        try:
            return await asyncio.open_connection(str(sockaddr[0]), port, family=family, proto=proto)
        except OSError as exc:
            errors.append(exc)
    # A host that answered "nothing listens here" says more than an address that could not
    # be reached at all (localhost's ::1 on a host without IPv6).
    if any(isinstance(exc, ConnectionRefusedError) for exc in errors):
        raise ProbeFailed(f"connection refused to {address}")
    first = errors[0] if errors else None
    if isinstance(first, TimeoutError):  # the OS gave up (ETIMEDOUT), not the core's timeout
        raise ProbeFailed(f"connecting to {address} timed out")
    reason = (first.strerror or str(first)) if first is not None else "no address to connect to"
    raise ProbeFailed(f"cannot connect to {address}: {reason}")


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a probe's connection; a peer that already went away is not an error."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()

"""File workers: artifact file streams served by processes of their own (issue 13 §4).

One server process terminates QUIC for every agent, and aioquic's per-packet work in Python
bounds what it can send (about 20-40 MB/s on a 2-core machine). With ``--file-workers N``
the server starts N child processes, each terminating QUIC on a UDP port of its own (same
host, same certificate and key), each serving artifact file streams straight from the
server's store directory (:mod:`.files`: the same REQUEST/QUEUED/HEADER/CREDIT protocol,
resume and credit window; each worker has its own line of ``max_file_transfers``).

A worker has no database: an agent learns the workers' ports from WELCOME
(``"file_workers": [port, ...]``), asks its control connection for a ticket for the
artifact it wants (after the same ``may_fetch`` check as a transfer), and sends it with
its REQUEST to a worker. The ticket is ``base64url(JSON {"c": client id, "s": [sha256s],
"e": expiry}) "." base64url(HMAC-SHA256(secret, ...))`` with a secret made at each server
start and handed to the workers on their stdin; it is good for :data:`TICKET_LIFETIME`
seconds and names only artifacts the client may fetch. A worker serves a request only
when its ticket verifies, has not expired and names the requested SHA-256, and reads only
complete files of the store (the SHA-256 is 64 hex digits, so it cannot name a path
elsewhere). An agent whose worker is down or refuses falls back to the control connection.

The workers are children of the server: each reads its stdin until EOF, which comes when
the server exits however it exits (a SIGKILL included), and then exits itself (also
``PR_SET_PDEATHSIG`` on Linux); a worker that dies is started again on the same port;
:meth:`FileWorkerPool.close` stops them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .files import (
    DEFAULT_MAX_TRANSFERS,
    SHA256_PATTERN,
    FileRefused,
)

__all__ = [
    "TICKET_LIFETIME",
    "FileWorkerPool",
    "TicketSigner",
    "stored_file",
]

logger = logging.getLogger(__name__)

#: Seconds a ticket is good for: the agent asks for one before each request (resumes too).
TICKET_LIFETIME = 120.0
# Tickets are MACed with this prefix so that the secret signs nothing else.
_TICKET_CONTEXT = b"deploy-center file ticket v1\0"
_SHA256 = re.compile(SHA256_PATTERN)
# How long the server waits for a starting worker to say its port.
_START_WAIT = 30.0
# How long close() waits for a worker to exit after its stdin closed, before SIGKILL.
_STOP_WAIT = 5.0
# Restart back-off after a worker died: from this, doubling while it keeps dying young.
_RESTART_MIN = 0.5
_RESTART_MAX = 30.0
# A worker that lived this long resets the back-off.
_STABLE_AFTER = 60.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TicketSigner:
    """Issues and checks file tickets with one secret (the server's, per start)."""

    def __init__(self, secret: bytes, lifetime: float = TICKET_LIFETIME) -> None:
        if len(secret) < 16:
            raise ValueError("the ticket secret must be at least 16 bytes")
        if lifetime <= 0:
            raise ValueError(f"the ticket lifetime must be positive, got {lifetime}")
        self._secret = secret
        self.lifetime = lifetime

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, _TICKET_CONTEXT + body, hashlib.sha256).digest()

    def issue(self, client_id: str, sha256s: Iterable[str], *, now: float | None = None) -> str:
        """A ticket letting ``client_id`` fetch ``sha256s`` until ``now + lifetime``."""
        expires = (time.time() if now is None else now) + self.lifetime
        body = json.dumps(
            {"c": client_id, "s": sorted(set(sha256s)), "e": round(expires, 3)},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def check(self, ticket: str | None, sha256: str, *, now: float | None = None) -> str:
        """The client id ``ticket`` names, once it is known to be this signer's, unexpired
        and naming ``sha256``.

        :raises FileRefused: ``forbidden``, with why.
        """
        if not ticket:
            raise FileRefused(
                "forbidden",
                "a file worker serves only requests with a ticket from the server's control "
                "connection",
            )
        try:
            body_text, mac_text = ticket.split(".")
            body, mac = _unb64(body_text), _unb64(mac_text)
        except ValueError:
            raise FileRefused("forbidden", "the ticket is malformed") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise FileRefused(
                "forbidden", "the ticket's signature does not verify (not this server's)"
            )
        try:
            fields = json.loads(body)
            client_id, names, expires = fields["c"], fields["s"], float(fields["e"])
        except (ValueError, KeyError, TypeError):
            raise FileRefused("forbidden", "the ticket's contents are malformed") from None
        if not isinstance(client_id, str) or not isinstance(names, list):
            raise FileRefused("forbidden", "the ticket's contents are malformed")
        if (time.time() if now is None else now) >= expires:
            raise FileRefused("forbidden", "the ticket has expired; ask for a new one")
        if sha256 not in names:
            raise FileRefused("forbidden", f"the ticket does not name artifact {sha256}")
        return client_id


def stored_file(root: Path, sha256: str) -> Path | None:
    """The complete artifact ``sha256`` in the store at ``root`` (the layout of
    :class:`deploy_core.server.artifacts.ArtifactStore`), or ``None``."""
    if not _SHA256.fullmatch(sha256):
        return None
    path = root / "sha256" / sha256[:2] / sha256
    return path if path.is_file() else None


# --------------------------------------------------------------------------- in the server


class _Child:
    """One worker process as the server sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.restart_delay = _RESTART_MIN
        self.watch: asyncio.Task[None] | None = None


class FileWorkerPool:
    """The server's file workers: started, watched, restarted, stopped.

    :param count: worker processes (at least 1).
    :param host: the address they listen on (the QUIC endpoint's).
    :param cert, key: the server's TLS certificate chain and key files.
    :param store: the artifact store's directory.
    :param ports: the ports to bind, one per worker (0: any free port); default all 0.
    """

    def __init__(
        self,
        count: int,
        *,
        host: str,
        cert: Path,
        key: Path,
        store: Path,
        max_transfers: int = DEFAULT_MAX_TRANSFERS,
        idle_timeout: float = 30.0,
        ticket_lifetime: float = TICKET_LIFETIME,
        ports: Sequence[int] = (),
    ) -> None:
        if count < 1:
            raise ValueError(f"the number of file workers must be at least 1, got {count}")
        self.signer = TicketSigner(secrets.token_bytes(32), ticket_lifetime)
        self._secret = self.signer._secret
        self._config = {
            "host": host,
            "cert": str(cert),
            "key": str(key),
            "store": str(store),
            "max_transfers": max_transfers,
            "idle_timeout": idle_timeout,
            "lifetime": ticket_lifetime,
        }
        wanted = list(ports) + [0] * (count - len(ports))
        self._children = [_Child(i) for i in range(count)]
        for child, port in zip(self._children, wanted, strict=False):
            child.port = port
        self._closing = False
        #: Workers started again after they died, since the start.
        self.restarts = 0

    @property
    def ports(self) -> list[int]:
        """The workers' UDP ports (a worker being restarted keeps its port)."""
        return [child.port for child in self._children if child.port]

    @property
    def pids(self) -> list[int]:
        """The running workers' process ids."""
        return [
            child.process.pid
            for child in self._children
            if child.process is not None and child.process.returncode is None
        ]

    def issue(self, client_id: str, sha256: str) -> tuple[str, float]:
        """A ticket for ``client_id`` to fetch ``sha256`` from any worker, and its lifetime."""
        return self.signer.issue(client_id, [sha256]), self.signer.lifetime

    async def start(self) -> None:
        """Start every worker; returns once each listens.

        :raises RuntimeError: a worker did not start (its stderr says why).
        """
        try:
            for child in self._children:
                try:
                    await self._spawn(child)
                except RuntimeError:
                    if not child.port:
                        raise
                    logger.warning(
                        "file worker %d could not listen on UDP port %d (taken?); it takes "
                        "a free port instead",
                        child.index,
                        child.port,
                    )
                    child.port = 0
                    await self._spawn(child)
        except BaseException:
            await self.close()
            raise
        for child in self._children:
            child.watch = asyncio.create_task(self._watch(child), name=f"file-worker-{child.index}")
        logger.info(
            "%d file workers serving artifacts on UDP ports %s",
            len(self._children),
            ", ".join(map(str, self.ports)),
        )

    async def _spawn(self, child: _Child) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from deploy_core.transport.file_worker_process import worker_main; worker_main()",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Out of the server's process group: a Ctrl-C or a signal to the group reaches
            # the server alone, which stops its workers itself (or its death does).
            start_new_session=True,
        )
        child.process = process
        child.started_at = time.monotonic()
        assert process.stdin is not None and process.stdout is not None
        config = {
            **self._config,
            "secret": self._secret.hex(),
            "port": child.port,
            "index": child.index,
            "parent": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        process.stdin.write(json.dumps(config).encode() + b"\n")
        await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _START_WAIT)
            port = int(json.loads(line)["port"])
        except (TimeoutError, ValueError, KeyError, TypeError):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise RuntimeError(
                f"file worker {child.index} did not start (exit status {process.returncode}); "
                "see its error above"
            ) from None
        child.port = port

    async def _watch(self, child: _Child) -> None:
        while not self._closing:
            process = child.process
            assert process is not None
            status = await process.wait()
            if self._closing:
                return
            lived = time.monotonic() - child.started_at
            if lived >= _STABLE_AFTER:
                child.restart_delay = _RESTART_MIN
            logger.warning(
                "file worker %d (pid %d, port %d) exited with status %s after %.0f s; "
                "starting it again in %.1f s",
                child.index,
                process.pid,
                child.port,
                status,
                lived,
                child.restart_delay,
            )
            await asyncio.sleep(child.restart_delay)
            child.restart_delay = min(child.restart_delay * 2, _RESTART_MAX)
            if self._closing:
                return
            try:
                await self._spawn(child)
            except RuntimeError as exc:
                logger.error("%s", exc)
                # The port may be taken meanwhile: take any free one next time.
                child.port = 0
                child.started_at = time.monotonic()
                continue
            self.restarts += 1

    async def close(self) -> None:
        """Stop every worker: close their stdin, wait a little, then kill."""
        self._closing = True
        for child in self._children:
            if child.watch is not None:
                child.watch.cancel()
        processes = [c.process for c in self._children if c.process is not None]
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), _STOP_WAIT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await asyncio.gather(
            *(c.watch for c in self._children if c.watch is not None), return_exceptions=True
        )

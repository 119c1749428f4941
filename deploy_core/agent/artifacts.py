"""The agent's artifact fetcher: pull by SHA-256, resume, verify, cache (SPEC deploy-11).

Files, under the agent's ``state_dir/cache`` (0700, opened without following a link; files
0600, created and appended to with ``O_NOFOLLOW``)::

    <sha256>.partial   bytes received so far; a later fetch, even after a restart, resumes at
                       its size
    <sha256>           a complete, verified artifact; fetching it again transfers nothing

The bytes arrive on QUIC file streams (:mod:`deploy_core.transport.files`). A dropped
connection makes the fetcher wait for the agent to reconnect (until the deadline) and ask
for the rest. When the server has file workers (:mod:`deploy_core.transport.file_workers`,
listed in its WELCOME), each attempt asks the control connection for a ticket and fetches
from a worker on a connection of its own; a worker that is down, refuses or breaks off is
not tried again by this fetch, which goes on with another worker or the control connection.
The finished file is checked against its SHA-256 before anyone may use it: on a mismatch
it is thrown away and fetched once more from zero; a second mismatch is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from deploy_core.hashed_file import HashedFile, hash_file
from deploy_core.plugin import safefs
from deploy_core.transport.files import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SHA256_PATTERN,
    FileRefused,
    FileRequest,
    FileStreamClient,
    TransferInterrupted,
)

if TYPE_CHECKING:
    from deploy_core.transport.client import FileWorkerLink

__all__ = [
    "ArtifactError",
    "ArtifactFetcher",
    "ArtifactProvider",
    "ArtifactTimeout",
    "FetchedArtifact",
    "FileChannel",
    "FileWorkerChannel",
    "Progress",
    "Waiting",
]

log = logging.getLogger(__name__)

#: ``progress(bytes_on_disk, total_bytes)``.
Progress = Callable[[int, int], None]
#: ``waiting(position)``: the server is serving others first; about ``position``-th in line.
Waiting = Callable[[int], None]

# How long a fetch without a deadline waits for the connection to come back.
DEFAULT_WAIT = 600.0
# Attempts in a row that end without a single new byte before the fetch gives up.
_MAX_FRUITLESS = 5
# Seconds to wait for a ticket from the control connection, and for a worker's handshake.
_TICKET_WAIT = 15.0
_WORKER_CONNECT_WAIT = 5.0
_SHA256 = re.compile(SHA256_PATTERN)


@dataclass(frozen=True)
class FetchedArtifact:
    """An artifact ready to use, and what getting it took.

    ``path`` is the agent's cached copy: read it, never change, move or delete it.
    """

    path: Path
    sha256: str
    size: int
    #: Artifact bytes received from the server by this fetch (all attempts together).
    bytes_transferred: int
    #: Bytes an earlier, interrupted fetch had left in the partial file, so not sent again.
    bytes_resumed: int
    #: True when the verified copy was already cached: nothing was transferred.
    from_cache: bool
    #: Times this fetch lost its stream or connection and carried on where it stopped.
    interruptions: int = 0


class ArtifactError(Exception):
    """The artifact could not be fetched; the text says why and what to do."""


class ArtifactTimeout(ArtifactError):
    """The deadline passed before the artifact was complete."""


class FileChannel(Protocol):
    """The agent's connection as the fetcher needs it (:class:`AgentConnector` is one)."""

    @property
    def files(self) -> FileStreamClient | None:
        """File streams of the current connection; ``None`` while disconnected."""
        ...

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; whether there is one."""
        ...


class FileWorkerChannel(FileChannel, Protocol):
    """A channel that also reaches the server's file workers (:class:`AgentConnector`)."""

    @property
    def file_workers(self) -> list[tuple[str, int]]:
        """The current server's file workers' addresses; empty without."""
        ...

    async def open_file_worker(
        self, address: tuple[str, int], *, timeout: float | None = None
    ) -> FileWorkerLink:
        """Open a connection to one; :class:`ConnectionError` when it does not answer."""
        ...


class _Route:
    """Where one fetch's attempts go: file workers while they serve, else the control
    connection."""

    def __init__(self, channel: FileChannel) -> None:
        self.channel = channel
        self.link: FileWorkerLink | None = None
        #: Workers that failed this fetch (down, refused, broke off): not tried again.
        self.avoid: set[tuple[str, int]] = set()
        #: No workers for this fetch (none listed, or the server gives no tickets).
        self.control_only = not callable(getattr(channel, "open_file_worker", None))
        #: Attempts that went to a worker.
        self.worker_attempts = 0

    async def drop(self, why: str | None = None) -> None:
        """Stop using the current worker (``why``: it failed, so avoid it)."""
        link, self.link = self.link, None
        if link is None:
            return
        if why is not None:
            self.avoid.add(link.address)
            log.warning(
                "file worker %s:%d: %s; continuing without it",
                link.address[0],
                link.address[1],
                why,
            )
        with contextlib.suppress(Exception):
            await link.close()

    async def files(
        self, control: FileStreamClient, sha256: str, timeout: float
    ) -> tuple[FileStreamClient, str | None]:
        """The file streams for the next attempt and the ticket to send there (``None``:
        the control connection, which needs none)."""
        if self.control_only:
            return control, None
        channel: Any = self.channel
        workers = [a for a in channel.file_workers if a not in self.avoid]
        if not workers:
            await self.drop()
            return control, None
        try:
            grant = await control.ticket(sha256, timeout=min(_TICKET_WAIT, timeout))
        except FileRefused as exc:
            if exc.code != "not_found":  # an older server, or workers not ready for it
                log.info("artifact %s: no file worker ticket (%s)", sha256[:12], exc)
                if exc.code != "unavailable":
                    self.control_only = True
            await self.drop()
            return control, None  # not_found: the control connection says why
        except TransferInterrupted:
            await self.drop()
            return control, None
        if self.link is not None and (
            self.link.lost_reason is not None or self.link.address not in workers
        ):
            await self.drop(self.link.lost_reason)
        while self.link is None and workers:
            address = random.choice(workers)
            try:
                self.link = await channel.open_file_worker(
                    address, timeout=min(_WORKER_CONNECT_WAIT, timeout)
                )
            except (ConnectionError, OSError) as exc:
                self.avoid.add(address)
                workers.remove(address)
                log.warning(
                    "file worker %s:%d: %s; trying %s",
                    address[0],
                    address[1],
                    exc,
                    "another" if workers else "the control connection",
                )
        if self.link is None:
            return control, None
        self.worker_attempts += 1
        return self.link.files, grant.ticket


class ArtifactProvider(Protocol):
    """What a :class:`~deploy_core.agent.context.DeployContext` fetches artifacts with."""

    async def fetch(
        self,
        sha256: str,
        *,
        deadline: float | None = None,
        progress: Progress | None = None,
        waiting: Waiting | None = None,
    ) -> FetchedArtifact:
        """Return the verified artifact, from the cache or from the server."""
        ...


class _Throttle:
    """Calls ``progress`` when the whole percentage moves, and at the end."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        percent = 100 * done // total if total else 100
        if percent != self._last:
            self._last = percent
            try:
                self._progress(done, total)
            except Exception:
                log.exception("artifact progress callback failed")


class ArtifactFetcher:
    """Fetches artifacts for one agent into its cache directory.

    :param channel: the agent's connection (reconnects on its own).
    :param cache_dir: where partial and finished artifacts are kept.
    :param chunk_size: bytes the server reads and the agent writes at a time
        (64 KiB to 1 MiB); after the agent is killed, at most this much is received again.
    :param stall_timeout: seconds without data after which a transfer counts as broken.
    """

    def __init__(
        self,
        channel: FileChannel,
        cache_dir: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        stall_timeout: float = 30.0,
        verify_cached: bool = True,
    ) -> None:
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes, "
                f"got {chunk_size}"
            )
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive, got {stall_timeout}")
        self.channel = channel
        self.cache_dir = cache_dir
        self.chunk_size = chunk_size
        self.stall_timeout = stall_timeout
        self.verify_cached = verify_cached
        self._locks: dict[str, asyncio.Lock] = {}

    def cached(self, sha256: str) -> Path | None:
        """The finished copy of an artifact, if the cache has one (not re-verified; a
        symlink there is not one)."""
        path = self.cache_dir / sha256
        try:
            return path if stat.S_ISREG(path.lstat().st_mode) else None
        except FileNotFoundError:
            return None

    def _open_cache(self) -> None:
        """Create the cache directory if missing, private (0700: packages may hold secrets),
        reached without following a symlink."""
        # The agent's own directory, resolved once (it may be reached through a link).
        cache_dir = os.path.realpath(self.cache_dir)
        with safefs.open_dir(cache_dir, create=True, mode=0o700) as cache:
            os.fchmod(cache.fd, 0o700)

    async def fetch(
        self,
        sha256: str,
        *,
        deadline: float | None = None,
        progress: Progress | None = None,
        waiting: Waiting | None = None,
    ) -> FetchedArtifact:
        """Return the verified artifact ``sha256``, from the cache or from the server.

        :param deadline: ``time.time()`` after which to give up (waiting for a reconnect
            included); ``None`` waits up to ten minutes for a connection.
        :param progress: called with ``(bytes on disk, total bytes)`` as bytes arrive, at
            most once per whole percent.
        :param waiting: called with the fetch's place in line while the server has it
            waiting for a transfer slot (it serves a bounded number at once); waiting in line
            is not a stall: only the deadline ends it.
        :raises ArtifactTimeout: the deadline passed first.
        :raises ArtifactError: the server refused, or the bytes failed verification twice.
        """
        sha256 = sha256.strip().lower()
        if not _SHA256.match(sha256):
            raise ArtifactError(f"not a SHA-256 (64 hex digits): {sha256!r:.80}")
        deadline = deadline if deadline is not None else time.time() + DEFAULT_WAIT
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            await asyncio.to_thread(self._open_cache)
            cached = await self._from_cache(sha256)
            if cached is not None:
                _Throttle(progress)(cached.size, cached.size)
                return cached
            return await self._download(sha256, deadline, _Throttle(progress), waiting)

    async def _from_cache(self, sha256: str) -> FetchedArtifact | None:
        path = self.cached(sha256)
        if path is None:
            return None
        if self.verify_cached:
            hasher, size = await asyncio.to_thread(hash_file, path)
            if hasher.hexdigest() != sha256:
                log.warning("cached artifact %s is damaged; fetching it again", sha256)
                await asyncio.to_thread(path.unlink, missing_ok=True)
                return None
        else:
            size = path.stat().st_size
        return FetchedArtifact(path, sha256, size, 0, 0, from_cache=True)

    async def _download(
        self, sha256: str, deadline: float, progress: _Throttle, waiting: Waiting | None
    ) -> FetchedArtifact:
        final = self.cache_dir / sha256
        partial_path = self.cache_dir / f"{sha256}.partial"
        transferred = 0
        interruptions = 0
        resumed: int | None = None
        for attempt in (1, 2):
            partial = await asyncio.to_thread(
                functools.partial(HashedFile, partial_path, resume=True, flush_each=True)
            )
            if resumed is None:
                resumed = partial.size
                if resumed:
                    log.info("artifact %s: resuming at byte %d", sha256[:12], resumed)
            try:
                got, breaks, size = await self._receive(
                    sha256, partial, deadline, progress, waiting
                )
                transferred += got
                interruptions += breaks
            except BaseException:
                # Keep what arrived for the next fetch; an empty file is no use to it.
                await asyncio.to_thread(partial.discard if partial.size == 0 else partial.close)
                raise
            digest = partial.sha256
            if digest == sha256:
                await asyncio.to_thread(partial.seal)
                await asyncio.to_thread(os.replace, partial_path, final)
                log.info(
                    "artifact %s: %d bytes verified (%d received, %d resumed, %d interruptions)",
                    sha256[:12],
                    size,
                    transferred,
                    resumed,
                    interruptions,
                )
                return FetchedArtifact(
                    final, sha256, size, transferred, resumed, False, interruptions
                )
            await asyncio.to_thread(partial.discard)
            if attempt == 1:
                log.warning(
                    "artifact %s: received bytes hash to %s; discarded, fetching again from 0",
                    sha256,
                    digest,
                )
                continue
            raise ArtifactError(
                f"artifact {sha256} failed SHA-256 verification twice (the bytes received "
                f"hash to {digest}); the server's stored copy is probably damaged: upload "
                "the package again"
            )
        raise AssertionError("unreachable")

    async def _receive(
        self,
        sha256: str,
        partial: HashedFile,
        deadline: float,
        progress: _Throttle,
        waiting: Waiting | None,
    ) -> tuple[int, int, int]:
        """Fill ``partial`` up to the artifact's size; returns (bytes received, interruptions,
        size)."""
        route = _Route(self.channel)
        try:
            return await self._receive_on(route, sha256, partial, deadline, progress, waiting)
        finally:
            await route.drop()

    async def _receive_on(
        self,
        route: _Route,
        sha256: str,
        partial: HashedFile,
        deadline: float,
        progress: _Throttle,
        waiting: Waiting | None,
    ) -> tuple[int, int, int]:
        received = 0
        interruptions = 0
        fruitless = 0
        last_error = ""
        restarted = False
        while True:
            control = await self._connected(sha256, deadline, last_error)
            files, ticket = await route.files(control, sha256, self._timeout(deadline))
            on_worker = ticket is not None
            offset = partial.size
            incoming = files.request(
                FileRequest(sha256=sha256, offset=offset, chunk_size=self.chunk_size, ticket=ticket)
            )
            incoming.on_queued = functools.partial(self._queued, sha256, waiting)
            before = received
            try:
                header = await incoming.header(timeout=self._timeout(deadline))
                progress(offset, header.size)
                while data := await incoming.read(timeout=self._timeout(deadline)):
                    if partial.size + len(data) > header.size:
                        raise TransferInterrupted("the server sent more bytes than it announced")
                    await asyncio.to_thread(partial.write, data)
                    received += len(data)
                    incoming.credit(partial.size)
                    progress(partial.size, header.size)
                if partial.size != header.size:
                    raise TransferInterrupted(
                        f"stream ended at byte {partial.size} of {header.size}"
                    )
                return received, interruptions, header.size
            except FileRefused as exc:
                if on_worker and exc.code != "bad_offset":
                    # The control connection gave the ticket, so the worker should not
                    # refuse: whatever it says, the control connection can serve it.
                    await route.drop(f"refused ({exc.code}): {exc}")
                    continue
                if exc.code == "bad_offset" and not restarted:
                    # The partial file is longer than the artifact: it cannot be part of it.
                    log.warning("artifact %s: %s", sha256[:12], exc)
                    restarted = True
                    await asyncio.to_thread(partial.restart)
                    continue
                raise ArtifactError(f"the server refused artifact {sha256}: {exc}") from None
            except TransferInterrupted as exc:
                if on_worker:
                    await route.drop(str(exc))
                last_error = str(exc)
                interruptions += 1
                fruitless = 0 if received > before else fruitless + 1
                log.warning(
                    "artifact %s: transfer interrupted at byte %d: %s",
                    sha256[:12],
                    partial.size,
                    exc,
                )
                if time.time() >= deadline:
                    raise ArtifactTimeout(
                        f"artifact {sha256} incomplete at the deadline ({partial.size} bytes "
                        f"received): {exc}"
                    ) from None
                if fruitless >= _MAX_FRUITLESS:
                    raise ArtifactError(
                        f"artifact {sha256}: {fruitless} attempts in a row brought no data; "
                        f"last: {exc}"
                    ) from None
                if fruitless:
                    await asyncio.sleep(min(0.2 * 2**fruitless, max(deadline - time.time(), 0)))
            finally:
                incoming.close()

    @staticmethod
    def _queued(sha256: str, waiting: Waiting | None, position: int | None) -> None:
        if position is None:
            return
        log.info("artifact %s: waiting for the server (position %d)", sha256[:12], position)
        if waiting is not None:
            try:
                waiting(position)
            except Exception:
                log.exception("artifact waiting callback failed")

    def _timeout(self, deadline: float) -> float:
        return max(min(self.stall_timeout, deadline - time.time()), 0.01)

    async def _connected(self, sha256: str, deadline: float, last_error: str) -> FileStreamClient:
        """The current connection's file streams, waiting for a reconnect until ``deadline``."""
        while True:
            files = self.channel.files
            if files is not None:
                return files
            left = deadline - time.time()
            if left <= 0:
                why = f" (last error: {last_error})" if last_error else ""
                raise ArtifactTimeout(
                    f"no connection to the server to fetch artifact {sha256} before the "
                    f"deadline{why}"
                )
            if not await self.channel.wait_connected(left):
                await asyncio.sleep(0.05)  # the old connection is still being torn down

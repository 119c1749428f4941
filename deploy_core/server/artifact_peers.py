"""Artifacts across replicas: which replica holds a complete copy of which package
(``artifact_copies``), and fetching a copy from a peer replica when an agent asks this one
for a package it lacks (docs/cluster.md, "Artifacts").

A copy row is written only once the bytes are complete and linked into the store (an upload
through ``POST /api/artifacts``, or a fetch from a peer), so an artifact is visible
cluster-wide only when whole.  At start-up :meth:`ArtifactCopies.reconcile` makes this
replica's rows match its store: rows whose file is gone are deleted, files without a row get
one.

A peer fetch (:class:`ClusterArtifacts`) asks a live replica holding a copy (``replicas`` joined
with ``artifact_copies``) for ``GET /api/artifacts/{sha256}/content`` with the admin token the
replicas of a cluster share, streams the bytes into this replica's ``tmp/`` while hashing
them, and links them into place only when they hash to the SHA-256 asked for; otherwise
nothing is stored and the next holder is tried.  One fetch per artifact runs at a time
(every agent asking meanwhile waits for it), bounded by :attr:`ClusterArtifacts.timeout` and
the store's size limit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deploy_core.server.artifacts import (
    ArtifactInfo,
    ArtifactMismatch,
    ArtifactStore,
    ArtifactTooLarge,
    format_size,
)
from deploy_core.server.db import artifact_copies, replicas
from deploy_core.server.leases import upsert
from deploy_core.server.replicas import STALE_AFTER_INTERVALS
from deploy_core.transport.files import FileRefused

__all__ = ["ArtifactCopies", "ClusterArtifacts", "Peer", "PeerFetchError"]

log = logging.getLogger(__name__)

#: Seconds a whole fetch from peers may take (every holder tried included).
DEFAULT_FETCH_TIMEOUT = 600.0
#: Seconds to connect to a peer, or to wait for its next bytes.
_PEER_IO_TIMEOUT = 30.0


@dataclass(frozen=True)
class Peer:
    """A live replica holding a copy of an artifact."""

    server_id: str
    api_url: str
    size: int


class ArtifactCopies:
    """The ``artifact_copies`` rows: written by one replica for itself, read by any."""

    def __init__(
        self, engine: Engine, server_id: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.server_id = server_id
        self.clock = clock

    def record(self, sha256: str, size: int) -> None:
        """This replica holds a complete copy of ``sha256`` (insert or refresh)."""
        values = {"size": size, "stored_at": self.clock()}
        with self.engine.begin() as conn:
            stmt = upsert(conn, artifact_copies).values(
                sha256=sha256, server_id=self.server_id, **values
            )
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[artifact_copies.c.sha256, artifact_copies.c.server_id],
                    set_=values,
                )
            )

    def forget(self, sha256: str) -> None:
        """This replica no longer holds ``sha256`` (its copy was deleted)."""
        with self.engine.begin() as conn:
            conn.execute(
                artifact_copies.delete().where(
                    artifact_copies.c.sha256 == sha256,
                    artifact_copies.c.server_id == self.server_id,
                )
            )

    def info(self, sha256: str) -> ArtifactInfo | None:
        """The artifact as the cluster knows it (some replica, live or not, holds a complete
        copy): its size and when it was first stored; ``None`` when none does."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.max(artifact_copies.c.size), sa.func.min(artifact_copies.c.stored_at)
                ).where(artifact_copies.c.sha256 == sha256)
            ).one()
        return None if row[0] is None else ArtifactInfo(sha256, int(row[0]), float(row[1]))

    def peers(self, sha256: str) -> list[Peer]:
        """Live replicas other than this one holding ``sha256``, the most recently heard
        first."""
        now = self.clock()
        live = replicas.c.last_seen >= now - STALE_AFTER_INTERVALS * replicas.c.heartbeat_interval
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(replicas.c.server_id, replicas.c.api_url, artifact_copies.c.size)
                .join(artifact_copies, artifact_copies.c.server_id == replicas.c.server_id)
                .where(
                    artifact_copies.c.sha256 == sha256,
                    replicas.c.server_id != self.server_id,
                    live,
                )
                .order_by(replicas.c.last_seen.desc())
            ).fetchall()
        return [Peer(r.server_id, r.api_url, int(r.size)) for r in rows]

    def reconcile(self, stored: dict[str, int]) -> tuple[int, int]:
        """Make this replica's rows match its store (``sha256 → size``); returns (rows
        added, rows deleted)."""
        now = self.clock()
        with self.engine.begin() as conn:
            rows = dict(
                conn.execute(
                    sa.select(artifact_copies.c.sha256, artifact_copies.c.size).where(
                        artifact_copies.c.server_id == self.server_id
                    )
                ).fetchall()
            )
            gone = [sha for sha, size in rows.items() if stored.get(sha) != size]
            for start in range(0, len(gone), 500):
                conn.execute(
                    artifact_copies.delete().where(
                        artifact_copies.c.server_id == self.server_id,
                        artifact_copies.c.sha256.in_(gone[start : start + 500]),
                    )
                )
            missing = [
                {"sha256": sha, "server_id": self.server_id, "size": size, "stored_at": now}
                for sha, size in stored.items()
                if rows.get(sha) != size
            ]
            if missing:
                conn.execute(artifact_copies.insert(), missing)
        return len(missing), len(gone)


class PeerFetchError(Exception):
    """No peer delivered an artifact; the message says why, for the agent and the log."""


class ClusterArtifacts:
    """What the QUIC file streams serve from: the local store, else a copy fetched from a
    peer replica (see the module's documentation).

    :param admin_token: the bearer token peers' APIs accept (the cluster's admin token).
    :param ca_file: the CA the peers' HTTPS APIs are verified with (the server's own);
        ``None``: the system's trust store.
    :param own_api_url: this replica's API URL as it announces it: a peer announcing the
        same one (both listen on every address and announce loopback) cannot be reached.
    """

    def __init__(
        self,
        store: ArtifactStore,
        copies: ArtifactCopies,
        *,
        admin_token: str,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        own_api_url: Callable[[], str] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.store = store
        self.copies = copies
        self.timeout = timeout
        self._admin_token = admin_token
        self._ca_file = ca_file
        self._own_api_url = own_api_url
        self._ssl: ssl.SSLContext | None = None
        self._fetches: dict[str, asyncio.Task[Path]] = {}

    async def reconcile(self) -> None:
        """Start-up: this replica's copy rows made to match its store."""
        stored = await asyncio.to_thread(self.store.stored)
        added, removed = await asyncio.to_thread(self.copies.reconcile, stored)
        if added or removed:
            log.info(
                "artifact copies reconciled with the store: %d recorded, %d forgotten",
                added,
                removed,
            )

    async def exists(self, sha256: str) -> bool:
        """Whether a complete copy of ``sha256`` is here or on any replica."""
        return await self.info(sha256) is not None

    async def info(self, sha256: str) -> ArtifactInfo | None:
        """The local copy's metadata, else the cluster's (``None``: nowhere)."""
        local = await asyncio.to_thread(self.store.get, sha256)
        if local is not None:
            return local
        return await asyncio.to_thread(self.copies.info, sha256)

    async def locate(self, sha256: str) -> Path | None:
        """The local file of ``sha256``, fetched from a peer first when missing.

        :raises FileRefused: no live peer has it, or none delivered the right bytes (the
            reason is the agent's).
        """
        path = await asyncio.to_thread(self.store.locate, sha256)
        if path is not None:
            return path
        task = self._fetches.get(sha256)
        if task is None:
            task = asyncio.create_task(self._fetch(sha256), name=f"artifact-fetch-{sha256[:12]}")
            self._fetches[sha256] = task
            task.add_done_callback(functools.partial(self._fetched, sha256))
        try:
            # Shielded: an agent giving up (or disconnecting) does not cut the fetch others
            # wait for, and a retry of its own finds it running.
            return await asyncio.shield(task)
        except PeerFetchError as exc:
            raise FileRefused("not_found", str(exc)) from None

    def _fetched(self, sha256: str, task: asyncio.Task[Path]) -> None:
        if self._fetches.get(sha256) is task:
            del self._fetches[sha256]
        if not task.cancelled():
            task.exception()  # retrieved: every agent waiting for it may have given up

    async def close(self) -> None:
        """Cancel the fetches in progress (the server stops)."""
        tasks = list(self._fetches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch(self, sha256: str) -> Path:
        path = await asyncio.to_thread(self.store.locate, sha256)
        if path is not None:  # a fetch that just ended, or a replica sharing the store
            return path
        peers = await asyncio.to_thread(self.copies.peers, sha256)
        if not peers:
            raise PeerFetchError(
                f"artifact {sha256} is not in the server's store and no live replica "
                "holds a copy; upload it first (POST /api/artifacts or 'deployctl artifact push')"
            )
        failures: list[str] = []
        try:
            async with asyncio.timeout(self.timeout):
                for peer in peers:
                    try:
                        info = await self._fetch_from(peer, sha256)
                    except Exception as exc:  # any one peer's failure: try the next
                        reason = str(exc) or type(exc).__name__
                        log.warning(
                            "artifact %s from replica %s (%s): %s",
                            sha256,
                            peer.server_id,
                            peer.api_url,
                            reason,
                        )
                        failures.append(f"replica {peer.server_id}: {reason}")
                        continue
                    await asyncio.to_thread(self.copies.record, sha256, info.size)
                    path = await asyncio.to_thread(self.store.locate, sha256)
                    if path is not None:
                        log.info(
                            "artifact %s fetched from replica %s (%d bytes)",
                            sha256,
                            peer.server_id,
                            info.size,
                        )
                        return path
                    failures.append(f"replica {peer.server_id}: stored copy vanished")
        except TimeoutError:
            failures.append(f"gave up after {self.timeout:g} s")
        raise PeerFetchError(
            f"artifact {sha256} is not in the server's store and fetching it from the "
            f"replicas holding it failed ({'; '.join(failures)}); nothing was stored"
        )

    async def _fetch_from(self, peer: Peer, sha256: str) -> ArtifactInfo:
        if self._own_api_url is not None and peer.api_url == self._own_api_url():
            raise PeerFetchError(
                f"it announces the API address {peer.api_url}, which is this replica's own: "
                "give each replica an --api-host the others reach (not a wildcard address, "
                "which is announced as loopback)"
            )
        if peer.size > self.store.max_bytes:
            raise ArtifactTooLarge(
                f"its copy is {format_size(peer.size)}, over this server's artifact size "
                f"limit of {format_size(self.store.max_bytes)} ({self.store.max_bytes} bytes)"
            )
        url = f"{peer.api_url.rstrip('/')}/api/artifacts/{sha256}/content"
        async with (
            httpx.AsyncClient(
                verify=self._verify(url),
                timeout=httpx.Timeout(_PEER_IO_TIMEOUT),
                trust_env=False,  # replica to replica: never through a proxy
            ) as client,
            client.stream(
                "GET", url, headers={"Authorization": f"Bearer {self._admin_token}"}
            ) as response,
        ):
            if response.status_code != 200:
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= 300:
                        break  # a peer's error is short; more is not read
                body = body[:300]
                text = body.decode(errors="replace")
                raise PeerFetchError(f"{url} answered {response.status_code}: {text}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.store.max_bytes:
                raise ArtifactTooLarge(
                    f"it announced {format_size(int(declared))}, over this server's "
                    f"artifact size limit of {format_size(self.store.max_bytes)}"
                )
            try:
                info, _new = await self.store.receive(
                    response.aiter_bytes(), expected_sha256=sha256
                )
            except ArtifactMismatch:
                raise PeerFetchError(
                    f"the bytes it sent do not hash to {sha256} (its copy is damaged): refused"
                ) from None
            return info

    def _verify(self, url: str) -> ssl.SSLContext | bool:
        if not url.startswith("https:"):
            return True
        if self._ssl is None:
            self._ssl = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None
            )
        return self._ssl

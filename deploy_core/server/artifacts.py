"""The artifact store: packages kept by SHA-256 under the state directory (its routes are in
:mod:`deploy_core.server.http.artifacts`).

Layout, under ``state_dir/artifacts`` (or the shared ``--artifact-dir``)::

    sha256/ab/abcd…        the bytes (never changed once there)
    sha256/ab/abcd….json   {"sha256", "size", "created_at"}
    tmp/<replica>/         this replica's uploads in progress (emptied at its start-up)

Several replicas may share one directory (a local one, or NFS): each writes its uploads in
progress under its own ``tmp/<replica>/``, and at start-up empties only that one; another's
leftovers are removed only once untouched for :data:`STALE_TMP_SECONDS` (a replica that
died mid-upload and never came back), so a live replica's upload is never cut short.

An upload is streamed to a temporary file while it is hashed, so memory stays flat whatever
its size; it is linked into place only once complete and checked, so a reader (the QUIC file
streams, :meth:`ArtifactStore.locate`) never sees a partial artifact. The same bytes uploaded
twice are stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any

from deploy_core.hashed_file import HashedFile
from deploy_core.transport.files import SHA256_PATTERN

__all__ = [
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "ArtifactEmpty",
    "ArtifactInfo",
    "ArtifactMismatch",
    "ArtifactRejected",
    "ArtifactStore",
    "ArtifactTooLarge",
    "format_size",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_ARTIFACT_BYTES = 2 << 30
#: Files in another replica's ``tmp/`` untouched this long are leftovers, removed at start-up.
STALE_TMP_SECONDS = 24 * 3600.0
_SHA256 = re.compile(SHA256_PATTERN)
# Received bytes are written and hashed in a worker thread once this many have gathered.
_WRITE_BATCH = 1 << 20


def format_size(size: int) -> str:
    """``2147483648`` → ``2 GiB``; exact multiples only lose their digits."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class ArtifactRejected(Exception):
    """An upload was not stored; ``status`` is the HTTP status that says why."""

    status = 422


class ArtifactTooLarge(ArtifactRejected):
    """An upload went past the size limit."""

    status = 413


class ArtifactMismatch(ArtifactRejected):
    """An upload's bytes did not hash to the SHA-256 the uploader announced."""


class ArtifactEmpty(ArtifactRejected):
    """An upload had no bytes at all."""


@dataclass(frozen=True)
class ArtifactInfo:
    """A stored artifact's metadata."""

    sha256: str
    size: int
    created_at: float

    def to_json(self) -> dict[str, Any]:
        """The API's view."""
        created = dt.datetime.fromtimestamp(self.created_at, dt.UTC)
        return {
            "sha256": self.sha256,
            "size": self.size,
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "url": f"/api/artifacts/{self.sha256}",
        }


class ArtifactStore:
    """Content-addressed package store on disk: one per replica, or one directory several
    replicas share.

    :param replica: this replica's id: its uploads in progress go to ``tmp/<replica>/``
        (``None``: ``tmp/local/``).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        replica: str | None = None,
        stale_tmp_seconds: float = STALE_TMP_SECONDS,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        tmp_root = root / "tmp"
        self._tmp = tmp_root / re.sub(r"[^A-Za-z0-9._-]", "_", replica or "local").lstrip(".")
        shutil.rmtree(self._tmp, ignore_errors=True)  # uploads a previous run left unfinished
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._remove_stale(tmp_root, time.time() - stale_tmp_seconds)
        (root / "sha256").mkdir(exist_ok=True, mode=0o700)

    def _remove_stale(self, tmp_root: Path, before: float) -> None:
        """Remove other replicas' (and older versions' ``tmp/upload-*``) files untouched
        since ``before``, and their directories once empty and long untouched: a live
        replica's upload is written to every few seconds, and its directory was created or
        changed when its latest upload began."""
        for entry in list(tmp_root.iterdir()):
            if entry == self._tmp:
                continue
            try:
                stat = entry.lstat()
                if not S_ISDIR(stat.st_mode):
                    self._remove_if_stale(entry, before)
                    continue
                for path in list(entry.iterdir()):
                    self._remove_if_stale(path, before)
                if stat.st_mtime < before:
                    entry.rmdir()  # refused unless empty: an upload begun since stays
            except OSError:
                pass  # gone already (another replica tidied it), or not empty

    @staticmethod
    def _remove_if_stale(path: Path, before: float) -> None:
        with contextlib.suppress(OSError):
            stat = path.lstat()
            if not S_ISDIR(stat.st_mode) and stat.st_mtime < before:
                path.unlink()
                log.info("removed a stale unfinished upload %s", path)

    def stored(self) -> dict[str, int]:
        """Every complete artifact in the store: SHA-256 → size (start-up reconciliation)."""
        found: dict[str, int] = {}
        for prefix in (self.root / "sha256").iterdir():
            if not prefix.is_dir():
                continue
            for path in prefix.iterdir():
                if self.valid_sha256(path.name) and path.name.startswith(prefix.name):
                    with contextlib.suppress(OSError):
                        if path.is_file():
                            found[path.name] = path.stat().st_size
        return found

    @staticmethod
    def valid_sha256(value: str) -> bool:
        """Whether ``value`` is 64 lowercase hex digits."""
        return bool(_SHA256.match(value))

    def path_for(self, sha256: str) -> Path:
        """Where an artifact's bytes live (whether or not they are there)."""
        if not self.valid_sha256(sha256):
            raise ValueError(f"not a SHA-256 (64 lowercase hex digits): {sha256!r:.80}")
        return self.root / "sha256" / sha256[:2] / sha256

    def locate(self, sha256: str) -> Path | None:
        """The file of a stored artifact, ``None`` when absent (serves the QUIC file streams)."""
        path = self.path_for(sha256)
        return path if path.is_file() else None

    def get(self, sha256: str) -> ArtifactInfo | None:
        """A stored artifact's metadata, or ``None``."""
        path = self.locate(sha256)
        if path is None:
            return None
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            return ArtifactInfo(sha256, int(meta["size"]), float(meta["created_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            # Sidecar lost or damaged: the bytes are the truth.
            stat = path.stat()
            return ArtifactInfo(sha256, stat.st_size, stat.st_mtime)

    async def receive(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str | None = None
    ) -> tuple[ArtifactInfo, bool]:
        """Store an upload; returns its metadata and whether it is new.

        :param chunks: the body, as it arrives.
        :param expected_sha256: the hash the uploader announced, checked at the end.
        :raises ArtifactTooLarge: as soon as the body passes :attr:`max_bytes`.
        :raises ArtifactMismatch: when the bytes do not hash to ``expected_sha256``.
        """
        path = self._tmp / f"upload-{secrets.token_hex(8)}"
        upload = await asyncio.to_thread(self._open_upload, path)
        try:
            batch: list[bytes] = []
            batched = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                if upload.size + batched + len(chunk) > self.max_bytes:
                    raise ArtifactTooLarge(
                        f"upload is over the server's artifact size limit of "
                        f"{format_size(self.max_bytes)} ({self.max_bytes} bytes)"
                    )
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await asyncio.to_thread(upload.write, b"".join(batch))
                    batch, batched = [], 0
            if batch:
                await asyncio.to_thread(upload.write, b"".join(batch))
            if upload.size == 0:
                raise ArtifactEmpty(
                    "the request body is empty; send the package's bytes as the body"
                )
            await asyncio.to_thread(upload.seal)
            sha256 = upload.sha256
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise ArtifactMismatch(
                    f"the uploaded bytes hash to {sha256}, not {expected_sha256} as announced; "
                    "the upload was damaged or the wrong file was sent: nothing was stored"
                )
            return await asyncio.to_thread(self._keep, path, sha256, upload.size)
        finally:
            await asyncio.to_thread(upload.discard)

    def _open_upload(self, path: Path) -> HashedFile:
        # Again each time (and once more if it vanished in between): another replica
        # sharing the store removes a tmp/ directory left empty and untouched for a day.
        for attempt in (1, 2):
            self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                return HashedFile(path)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _keep(self, tmp: Path, sha256: str, size: int) -> tuple[ArtifactInfo, bool]:
        final = self.path_for(sha256)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        try:
            # A hard link creates the name only if it is free: two uploads of the same bytes
            # racing each other store it once.
            os.link(tmp, final)
        except FileExistsError:
            info = self.get(sha256)
            if info is not None:
                return info, False
        info = ArtifactInfo(sha256, size, time.time())
        sidecar = final.with_suffix(".json")
        partial = sidecar.with_suffix(f".json.{secrets.token_hex(4)}")
        partial.write_text(
            json.dumps({"sha256": sha256, "size": size, "created_at": info.created_at}) + "\n"
        )
        os.replace(partial, sidecar)
        log.info("stored artifact %s (%d bytes)", sha256, size)
        return info, True

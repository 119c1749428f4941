"""The agent's side of a URL source: the download (:func:`deploy_tar.url_source.download`)
run in a thread under the deployment's timeout, its progress and log lines sent from the
event loop, its package kept in ``<data_dir>/deploy_tar/downloads`` (0700) only until the
release is extracted."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from deploy_core.plugin import DeployContext, DeployFailed, WorkBudget, safefs
from deploy_tar.params import UrlSource
from deploy_tar.url_source import (
    Abort,
    Downloaded,
    UrlFetchError,
    UrlPolicy,
    UrlRefused,
    download,
    policy_from_config,
    redact,
)

__all__ = ["PLUGIN", "agent_policy", "downloads_dir", "fetch_url_source", "prune_stale"]

PLUGIN = "deploy_tar"
# Reads of up to 256 KiB each: one step per read, far more than any allowed package needs.
DOWNLOAD_STEPS = 1 << 40
# What an interrupted download left is kept for the next deployment of the same package to
# resume, for this long after it was last written; a later download removes it after that.
STALE_AFTER = 24 * 3600.0


def agent_policy(ctx: DeployContext) -> UrlPolicy:
    """The agent's URL policy: its ``[plugins.deploy_tar]`` settings, checked."""
    try:
        return policy_from_config(
            ctx.plugin_config(PLUGIN), "[plugins.deploy_tar] of the agent's config"
        )
    except ValueError as exc:
        raise DeployFailed(f"cannot fetch the package: {exc}") from None


def downloads_dir(ctx: DeployContext) -> Path:
    """``<data_dir>/deploy_tar/downloads``, created private (0700), reached without
    following a link."""
    path = Path(os.path.realpath(ctx.data_dir)) / PLUGIN / "downloads"
    with safefs.open_dir(path, create=True, mode=0o700) as area:
        os.fchmod(area.fd, 0o700)
    return path


def prune_stale(directory: Path, keep: str, now: float | None = None) -> list[str]:
    """Remove what downloads other than ``keep`` (a SHA-256) left in ``directory`` and did
    not touch for :data:`STALE_AFTER` seconds; returns the names removed."""
    now = time.time() if now is None else now
    removed = []
    for entry in os.scandir(directory):
        if entry.name.startswith(keep) or not entry.is_file(follow_symlinks=False):
            continue
        if now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def _cached(path: Path, sha256: str) -> Downloaded | None:
    """A verified package a crashed deployment left in place, else ``None``."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
            size = file.tell()
    except FileNotFoundError:
        return None
    except OSError:  # a link or something else planted there: not a package of ours
        path.unlink(missing_ok=True)
        return None
    if digest != sha256:
        path.unlink(missing_ok=True)
        return None
    return Downloaded(path, sha256, size, 0, 0, from_cache=True)


async def fetch_url_source(
    ctx: DeployContext,
    source: UrlSource,
    timeout: float,
    progress: Callable[[int, int], None],
) -> Downloaded:
    """Download and verify ``source``; :class:`DeployFailed` (with the URL redacted) when
    it cannot be had. Stops when the awaiting task is cancelled (the deployment's timeout)."""
    policy = agent_policy(ctx)
    url = source.url
    if source.query_secret is not None:
        query = ctx.secret_env.get(source.query_secret)
        if query is None:
            raise DeployFailed(
                f"source.query_secret names {source.query_secret}, which is not in the "
                "deployment's secret_env"
            )
        url = f"{url}?{query.removeprefix('?')}"
    directory = await asyncio.to_thread(downloads_dir, ctx)
    loop = asyncio.get_running_loop()
    budget = WorkBudget(f"download of {redact(url)}", steps=DOWNLOAD_STEPS, seconds=timeout)

    def log(line: str) -> None:
        loop.call_soon_threadsafe(functools.partial(ctx.log, line, stream="agent"))

    def report(done: int, total: int) -> None:
        budget.step()
        loop.call_soon_threadsafe(progress, done, total)

    abort = Abort()

    def work() -> Downloaded:
        stale = prune_stale(directory, source.sha256)
        if stale:
            log(f"removed {len(stale)} stale download file(s): {', '.join(sorted(stale))}")
        cached = _cached(directory / source.sha256, source.sha256)
        if cached is not None:
            return cached
        return download(
            url,
            source.sha256,
            directory,
            policy,
            size=source.size,
            progress=report,
            cancelled=lambda: budget.cancelled,
            log=log,
            abort=abort,
        )

    # In a thread; when the deployment gives up (its timeout, the agent stopping), the
    # connection is shut down so a blocked read ends now, and the thread is waited for.
    thread = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        budget.cancel()
        abort.abort()
        await asyncio.wait([thread])
        if not thread.cancelled():
            thread.exception()  # retrieved: the cancellation is what the caller hears about
        raise
    except (UrlRefused, UrlFetchError) as exc:
        raise DeployFailed(f"package download failed: {_scrub(str(exc), url)}") from None
    except OSError as exc:
        why = _scrub(f"{type(exc).__name__}: {exc}", url)
        raise DeployFailed(f"package download failed: {why}") from None


def _scrub(text: str, url: str) -> str:
    """``text`` without the URL's query string, however it got there (the messages are
    built from the redacted URL already; this is the second lock)."""
    query = url.partition("?")[2]
    return text.replace(url, redact(url)).replace(query, "…") if query else text

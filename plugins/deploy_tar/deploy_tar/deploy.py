"""``deploy.tar``: fetch a package, extract it into a new release, install it, switch to it.

fetch (``uploading``, 0-30 %, from the bytes received) → extract (``extracting``, 30-60 %)
into ``target_dir/releases/<deploy id>`` → install (``installing``, 60-90 %): the package's
install script in the release directory → ``current`` switched to the new release atomically.
The core then runs the health checks (90-100 %) and, on failure, the rollback strategy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from deploy_core.agent.artifacts import FetchedArtifact
from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.models import DeployStatus, DeployTarResult
from deploy_core.registry import Stage
from deploy_tar.extract import ExtractStats, extract_archive
from deploy_tar.params import TarParams
from deploy_tar.releases import ReleaseError, Releases
from deploy_tar.rules import UnsafeArchive
from deploy_tar.scripts import failure, find_script, output_tail, run_release_script

__all__ = ["STAGES", "STRATEGY", "deploy_release", "size_text"]

STRATEGY = "release"
STAGES = (
    Stage(DeployStatus.EXECUTING.value, 0, 0, "preparing"),
    Stage(DeployStatus.UPLOADING.value, 0, 30, "fetching the package"),
    Stage(DeployStatus.EXTRACTING.value, 30, 60, "extracting the package"),
    Stage(DeployStatus.INSTALLING.value, 60, 90, "installing the release"),
)
_RANGES = {stage.status: stage for stage in STAGES}
REPORT_EVERY = 0.2
T = TypeVar("T")


class _Cancelled(Exception):
    """Raised in the extraction thread when the deployment gave up on it."""


class _Progress:
    """Reports a stage's progress when the overall percentage moves, at most every
    :data:`REPORT_EVERY` seconds (and always at the end), so a stage adds a few dozen rows to
    the history, not hundreds."""

    def __init__(self, ctx: DeployContext, status: DeployStatus) -> None:
        self._ctx = ctx
        self._status = status
        self._last = -1
        self._at = 0.0

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        overall = _RANGES[self._status.value].at(fraction)
        now = time.monotonic()
        if overall == self._last or (now - self._at < REPORT_EVERY and done < total):
            return
        self._last, self._at = overall, now
        message = f"{size_text(done)} of {size_text(total)}"
        self._ctx.report(self._status, fraction=fraction, message=message)


def size_text(size: int) -> str:
    """``3221225`` → ``3.1 MiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _checked_target(ctx: DeployContext, params: TarParams) -> Releases:
    """The target directory's releases, created if missing; never inside the agent's own
    state."""
    target = Path(params.target_dir).resolve()
    if target == Path("/"):
        raise DeployFailed(f"target_dir {params.target_dir} resolves to '/'; name a directory")
    data_dir = ctx.data_dir.resolve()
    if target.is_relative_to(data_dir):
        raise DeployFailed(
            f"target_dir {params.target_dir} is inside the agent's data directory {data_dir}; "
            "deploy somewhere else"
        )
    releases = Releases(target)
    try:
        releases.create()
    except ReleaseError as exc:
        raise DeployFailed(str(exc)) from None
    except OSError as exc:
        raise DeployFailed(f"cannot create target_dir {target}: {exc}") from None
    return releases


async def deploy_release(ctx: DeployContext, params: TarParams) -> DeployTarResult:
    """Install the package as a new release and make it current."""
    started = time.monotonic()
    end = started + params.timeout
    releases = await asyncio.to_thread(_checked_target, ctx, params)
    name = ctx.deploy_id
    release_dir = releases.path(name)
    try:
        previous = releases.current()
    except ReleaseError as exc:
        raise DeployFailed(str(exc)) from None
    previous_dir = releases.path(previous) if previous is not None else None
    result = DeployTarResult(
        release_dir=str(release_dir),
        previous_release=str(previous_dir) if previous_dir is not None else None,
        sha256=params.artifact,
    )

    def fail(message: str, status: DeployStatus = DeployStatus.FAILED) -> DeployFailed:
        result.duration = round(time.monotonic() - started, 6)
        return DeployFailed(message, result=result, status=status)

    async def bounded(work: Awaitable[T], what: str) -> T:
        try:
            return await asyncio.wait_for(work, max(end - time.monotonic(), 0.001))
        except TimeoutError:
            raise fail(
                f"{what} did not finish within the deployment's timeout of {params.timeout:g} s",
                DeployStatus.TIMEOUT,
            ) from None

    # -- fetch (0-30 %)
    ctx.report(DeployStatus.UPLOADING, fraction=0.0, message=f"fetching {params.artifact[:12]}")
    fetched: FetchedArtifact = await bounded(
        ctx.fetch_artifact(params.artifact, progress=_Progress(ctx, DeployStatus.UPLOADING)),
        "fetching the package",
    )
    result.bytes_sent, result.bytes_resumed = fetched.bytes_transferred, fetched.bytes_resumed
    how = (
        "from the agent's cache, nothing transferred"
        if fetched.from_cache
        else f"{size_text(fetched.bytes_transferred)} received, "
        f"{size_text(fetched.bytes_resumed)} resumed"
    )
    ctx.report(DeployStatus.UPLOADING, fraction=1.0, message=f"package ready: {how}")
    if releases.target_dir.is_relative_to(fetched.path.parent.resolve()):
        raise fail(f"target_dir {releases.target_dir} is inside the agent's artifact cache")

    # -- extract (30-60 %)
    ctx.report(DeployStatus.EXTRACTING, fraction=0.0, message=f"extracting into {release_dir}")
    try:
        stats = await bounded(_extract(ctx, params, fetched.path, release_dir), "extraction")
    except UnsafeArchive as exc:
        raise fail(f"package refused: {exc}") from None
    except (OSError, ReleaseError) as exc:
        raise fail(f"extraction into {release_dir} failed: {exc}") from None
    ctx.report(
        DeployStatus.EXTRACTING,
        fraction=1.0,
        message=f"{stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{size_text(stats.bytes)}",
    )

    # -- install (60-90 %)
    try:
        script = find_script(release_dir, params.install_script)
        await asyncio.to_thread(
            releases.record, name, sha256=params.artifact, install_script=script
        )
    except ReleaseError as exc:
        releases.mark_bad(name, str(exc))
        raise fail(str(exc)) from None
    if script is None:
        ctx.report(DeployStatus.INSTALLING, fraction=0.0, message="no install script")
    else:
        ctx.report(DeployStatus.INSTALLING, fraction=0.0, message=f"running {script}")
        timeout = max(end - time.monotonic(), 0.001)
        try:
            proc = await run_release_script(
                ctx,
                release_dir,
                script,
                action="install",
                target_dir=releases.target_dir,
                other_release=previous_dir,
                env=params.env,
                timeout=timeout,
            )
        except ReleaseError as exc:
            releases.mark_bad(name, str(exc))
            raise fail(str(exc)) from None
        result.install_exit_code = proc.exit_code
        result.install_output_tail = output_tail(proc)
        why = failure(proc, f"install script {script}", timeout)
        if why is not None:
            releases.mark_bad(name, why)
            status = DeployStatus.TIMEOUT if proc.timed_out else DeployStatus.FAILED
            raise fail(why, status)

    # -- switch
    try:
        await asyncio.to_thread(releases.switch, name)
    except (OSError, ReleaseError) as exc:
        raise fail(f"could not switch {releases.current_link} to {name}: {exc}") from None
    ctx.report(DeployStatus.INSTALLING, fraction=1.0, message=f"current -> releases/{name}")
    if ctx.command.rollback is None:
        # No rollback strategy to prune after the health checks: keep the disk bounded here.
        protect = {name} | ({previous} if previous is not None else set())
        removed = await asyncio.to_thread(releases.prune, params.keep_releases, protect)
        if removed:
            ctx.log(f"removed old releases: {', '.join(removed)}", stream="agent")
    result.duration = round(time.monotonic() - started, 6)
    return result


async def _extract(
    ctx: DeployContext, params: TarParams, archive: Path, release_dir: Path
) -> ExtractStats:
    """Run :func:`extract_archive` in a thread, reporting progress on the event loop; a
    cancelled deployment stops the thread at its next progress step."""
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()
    report = _Progress(ctx, DeployStatus.EXTRACTING)

    def progress(done: int, total: int) -> None:
        if cancelled.is_set():
            raise _Cancelled()
        loop.call_soon_threadsafe(report, done, total)

    try:
        return await asyncio.to_thread(
            extract_archive, archive, release_dir, params.limits.to_limits(), progress=progress
        )
    finally:
        cancelled.set()

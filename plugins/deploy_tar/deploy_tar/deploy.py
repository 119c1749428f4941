"""``deploy.tar``: fetch a package, extract it into a new release, install it, switch to it.

fetch (``uploading``, 0-30 %, from the bytes received) → extract (``extracting``, 30-60 %)
into ``target_dir/releases/<deploy id>`` → install (``installing``, 60-90 %): the package's
install script in the release directory → ``current`` switched to the new release atomically.
The core then runs the health checks (90-100 %) and, on failure, the rollback strategy.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    DeployStatus,
    FetchedArtifact,
    WorkBudget,
    WorkStopped,
    run_bounded,
    safefs,
)
from deploy_tar.extract import ExtractStats, extract_archive
from deploy_tar.params import TarParams
from deploy_tar.releases import ReleaseError, Releases
from deploy_tar.result import DeployTarResult
from deploy_tar.rules import UnsafeArchive
from deploy_tar.scripts import failure, find_script, output_tail, run_release_script
from deploy_tar.stages import STAGES, STRATEGY
from deploy_tar.url_fetch import fetch_url_source
from deploy_tar.url_source import Downloaded, redact

__all__ = ["STAGES", "STRATEGY", "deploy_release", "prune_bounded", "size_text", "staging_area"]

_RANGES = {stage.status: stage for stage in STAGES}
REPORT_EVERY = 0.2
# Steps of extraction work (stream blocks read, symlink path parts resolved by the pre-scan,
# progress reports): far above what the archive limits allow a sane package, low enough that
# a pathological one stops in seconds rather than burning a core for hours.
EXTRACT_STEPS = 20_000_000
PRUNE_STEPS = 100_000_000  # entries removed while pruning old releases
T = TypeVar("T")


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


def _created(target: Path) -> Releases:
    """The releases of checked ``target``, the layout created if missing (blocking)."""
    releases = Releases(target)
    try:
        releases.create()
    except ReleaseError as exc:
        raise DeployFailed(str(exc)) from None
    except OSError as exc:
        raise DeployFailed(f"cannot create target_dir {target}: {exc}") from None
    return releases


def _trusted_chain(path: Path) -> str | None:
    """Why a script could rename or swap a directory on the way to ``path`` (one not owned
    by the agent, or writable by others without the sticky bit), or ``None``."""
    at = Path("/")
    for part in ("", *path.parts[1:]):
        at = at / part if part else at
        st = os.lstat(at)
        open_to_others = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or open_to_others:
            return f"{at} is not a directory only the agent can change"
    return None


def _mount_point(path: Path) -> Path:
    """The mount point of the file system ``path`` lies on."""
    device = os.lstat(path).st_dev
    while path != path.parent and os.lstat(path.parent).st_dev == device:
        path = path.parent
    return path


def staging_area(ctx: DeployContext, releases: Releases) -> safefs.Dir:
    """A private directory (the agent's, mode 0700, reached only through directories no
    script can change) on the file system of the target, where the package is extracted
    before its release directory is moved into ``releases/`` by ``renameat``.

    It is ``<data_dir>/deploy_tar/staging`` when the agent's data directory shares the
    target's file system, else ``.deploy-tar-staging`` at the root of that file system.
    """
    with safefs.open_dir(releases.root) as where:
        device = where.stat.st_dev
    # The agent's own directory, resolved once (it may be reached through a link).
    data_area = Path(os.path.realpath(ctx.data_dir)) / "deploy_tar" / "staging"
    area = safefs.open_dir(data_area, create=True, mode=0o700)
    if area.stat.st_dev == device:
        return area
    area.close()
    mount = _mount_point(releases.root)
    why = _trusted_chain(mount)
    if why is not None:
        raise DeployFailed(
            f"cannot extract the package where no script can reach it: the agent's data "
            f"directory is on another file system than target_dir {releases.target_dir}, "
            f"and {why}; put the agent's state directory on the target's file system"
        )
    with safefs.open_dir(mount) as top:
        area = safefs.open_subdir(top, ".deploy-tar-staging", create=True, mode=0o700)
    if area.stat.st_uid != os.geteuid() or stat.S_IMODE(area.stat.st_mode) != 0o700:
        area.close()
        raise DeployFailed(
            f"{area.path} is not the agent's private staging directory (owner or mode "
            "changed); remove it"
        )
    return area


async def deploy_release(ctx: DeployContext, params: TarParams) -> DeployTarResult:
    """Install the package as a new release and make it current."""
    started = time.monotonic()
    end = started + params.timeout
    # Never ``/`` or inside the agent's state; within what the agent's constraints allow
    # (workdir_roots, a directory the run_as user could write itself): before any write.
    target = ctx.check_path(params.target_dir, "tar target_dir", access="write")
    releases = await asyncio.to_thread(_created, target)
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
        sha256=params.sha256,
        url=redact(params.source.url) if params.source is not None else None,
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

    # -- fetch (0-30 %): from the server's store, or from the URL of a source
    fetched: FetchedArtifact | Downloaded
    progress = _Progress(ctx, DeployStatus.UPLOADING)
    if params.source is None:
        ctx.report(DeployStatus.UPLOADING, fraction=0.0, message=f"fetching {params.sha256[:12]}")
        fetched = await bounded(
            ctx.fetch_artifact(params.sha256, progress=progress), "fetching the package"
        )
    else:
        where = redact(params.source.url)
        ctx.report(DeployStatus.UPLOADING, fraction=0.0, message=f"downloading {where}")
        try:
            fetched = await bounded(
                fetch_url_source(ctx, params.source, params.timeout, progress),
                "downloading the package",
            )
        except DeployFailed as exc:
            raise fail(str(exc)) from None
        except WorkStopped as exc:
            raise fail(f"downloading the package: {exc}", DeployStatus.TIMEOUT) from None
    result.bytes_sent, result.bytes_resumed = fetched.bytes_transferred, fetched.bytes_resumed
    how = (
        "from the agent's cache, nothing transferred"
        if fetched.from_cache
        else f"{size_text(fetched.bytes_transferred)} received, "
        f"{size_text(fetched.bytes_resumed)} resumed"
    )
    ctx.report(DeployStatus.UPLOADING, fraction=1.0, message=f"package ready: {how}")
    try:
        if releases.target_dir.is_relative_to(fetched.path.parent.resolve()):
            raise fail(f"target_dir {releases.target_dir} is inside the agent's artifact cache")

        # -- extract (30-60 %)
        ctx.report(DeployStatus.EXTRACTING, fraction=0.0, message=f"extracting into {release_dir}")
        try:
            stats = await bounded(_extract(ctx, params, fetched.path, releases), "extraction")
        except UnsafeArchive as exc:
            raise fail(f"package refused: {exc}") from None
        except WorkStopped as exc:
            raise fail(f"package refused: {exc}") from None
        except (OSError, ReleaseError) as exc:
            raise fail(f"extraction into {release_dir} failed: {exc}") from None
    finally:
        if isinstance(fetched, Downloaded):  # not kept: the release holds what it had
            await asyncio.to_thread(fetched.path.unlink, missing_ok=True)
    ctx.report(
        DeployStatus.EXTRACTING,
        fraction=1.0,
        message=f"{stats.files} files, {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{size_text(stats.bytes)}",
    )

    # -- install (60-90 %)
    try:
        script = find_script(release_dir, params.install_script)
        await asyncio.to_thread(releases.record, name, sha256=params.sha256, install_script=script)
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
        try:
            removed = await prune_bounded(releases, params, protect)
        except (OSError, ReleaseError) as exc:
            # Housekeeping after a good switch: the release is live, so say why and go on.
            ctx.log(f"old releases were not pruned: {exc}", stream="agent")
            removed = []
        if removed:
            ctx.log(f"removed old releases: {', '.join(removed)}", stream="agent")
    result.duration = round(time.monotonic() - started, 6)
    return result


async def prune_bounded(releases: Releases, params: TarParams, protect: set[str]) -> list[str]:
    """:meth:`Releases.prune` in a thread, stopped when the step is cancelled (a timeout,
    the agent stopping) or after the deployment's timeout."""
    budget = WorkBudget(
        f"pruning releases of {releases.target_dir}", steps=PRUNE_STEPS, seconds=params.timeout
    )
    return await run_bounded(
        lambda: releases.prune(params.keep_releases, protect, budget=budget), budget
    )


async def _extract(
    ctx: DeployContext, params: TarParams, archive: Path, releases: Releases
) -> ExtractStats:
    """Extract the package into the private staging area (:func:`staging_area`), then move
    the release into ``releases/``; in a thread, reporting progress on the event loop.

    The work is bounded: the pre-scan and the extraction step a budget (the deployment's
    timeout) and stop at their next step when the deployment gives up on them.
    """
    loop = asyncio.get_running_loop()
    report = _Progress(ctx, DeployStatus.EXTRACTING)
    name = ctx.deploy_id
    budget = WorkBudget(
        f"extraction of {params.sha256[:12]}", steps=EXTRACT_STEPS, seconds=params.timeout
    )

    def progress(done: int, total: int) -> None:
        budget.step()
        loop.call_soon_threadsafe(report, done, total)

    def work() -> ExtractStats:
        with staging_area(ctx, releases) as area:
            for stale in (name, f".staging-{name}"):  # an interrupted extraction's
                safefs.remove_at(area, stale, step=budget.step)
            try:
                stats = extract_archive(
                    archive,
                    Path(area.path) / name,
                    params.limits.to_limits(),
                    progress=progress,
                )
                releases.adopt(name, area, name)
            finally:
                safefs.remove_at(area, name, step=budget.step)
        return stats

    return await run_bounded(work, budget)

"""``snapshot`` (SPEC deploy-29): copy the deploy directory before the deployment, put it back
exactly on rollback, then optionally run a restart script.

The file work lives in :mod:`rollback_basic.tree` (copying, swapping) and
:mod:`rollback_basic.store` (layout, retention); this module is the strategy around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from deploy_core.agent.context import DeployContext
from deploy_core.registry import RollbackParams, RollbackState, RollbackStrategy
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from rollback_basic.errors import RollbackError
from rollback_basic.runner import ScriptText, rollback_target, run_rollback_script
from rollback_basic.store import SnapshotStore
from rollback_basic.tree import human_size, restore_tree

MAX_SKIPPED_LOGGED = 10
MIN_RESTART_TIMEOUT = 1.0
T = TypeVar("T")


async def _file_work(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking file work in a thread, to completion.

    A thread cannot be stopped.  If the caller is cancelled (the agent's timeout), wait for
    the thread before letting the cancellation through, so nothing swaps a directory after the
    agent has moved on (possibly to the next deployment).
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller hears about
        raise


def _check_path(path: str) -> str:
    if "\0" in path:
        raise ValueError("the path contains a NUL character")
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is not an absolute path")
    path = os.path.normpath("/" + path.lstrip("/"))  # POSIX keeps a leading "//" apart
    if path == "/":
        raise ValueError("refusing to snapshot '/': name the application's own directory")
    return path


SnapshotPath = Annotated[str, AfterValidator(_check_path)]


class SnapshotParams(RollbackParams):
    """Options of the ``snapshot`` strategy.

    ``timeout`` bounds each step (the snapshot; the restore with its restart script), as the
    agent enforces it; the restart script gets whatever the restore left of it.
    """

    strategy: Literal["snapshot"] = "snapshot"
    path: SnapshotPath = Field(description="absolute directory to snapshot and restore")
    keep: int = Field(3, ge=1, le=100, description="snapshots of this path kept after success")
    restart: ScriptText | None = Field(
        None, description="script run after the directory is restored (at most 100 KB)"
    )


class SnapshotState(BaseModel):
    """What ``prepare`` returns and ``rollback`` needs: where the snapshot is, what it holds."""

    model_config = ConfigDict(extra="ignore")

    snapshot: str
    path: str
    absent: bool
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)


def _refuse_unsafe(ctx: DeployContext, path: str) -> None:
    """Refuse ``/``, the agent's data directory, anything inside it and anything holding it:
    the snapshots would contain themselves, or a restore would replace them."""
    try:
        _check_path(path)
    except ValueError as exc:
        raise RollbackError(f"refusing to snapshot or restore {path!r}: {exc}") from exc
    target = Path(path).resolve()
    data = ctx.data_dir.resolve()
    if target == data or data in target.parents:
        raise RollbackError(
            f"refusing to snapshot or restore {path}: it is inside the agent's data "
            f"directory {data}; name the application's own directory"
        )
    if target in data.parents:
        raise RollbackError(
            f"refusing to snapshot or restore {path}: it contains the agent's data "
            f"directory {data}, so snapshots would include themselves; name the "
            "application's own directory"
        )


async def prepare_snapshot(ctx: DeployContext, params: SnapshotParams) -> RollbackState:
    """Snapshot ``params.path`` before the deployment (a missing path is recorded as absent)."""
    _refuse_unsafe(ctx, params.path)
    store = SnapshotStore(ctx.data_dir)
    ctx.log(f"snapshot: copying {params.path}")
    started = time.monotonic()
    try:
        directory, info, stats, linked_from = await _file_work(
            store.take, params.path, ctx.deploy_id, ctx.command_type
        )
    except NotADirectoryError as exc:
        raise RollbackError(
            f"cannot snapshot {params.path}: it is not a directory (a symlink or a file); "
            "name the directory itself"
        ) from exc
    except OSError as exc:
        raise RollbackError(f"cannot snapshot {params.path}: {exc}") from exc
    took = time.monotonic() - started
    if info.absent:
        ctx.log(f"snapshot: {params.path} does not exist; a rollback will remove it")
    else:
        reused = f" from the snapshot before {linked_from}" if linked_from else ""
        ctx.log(
            f"snapshot: {params.path} copied in {took:.2f} s: {stats.describe()}; "
            f"{stats.linked} unchanged files hard-linked{reused}, "
            f"{stats.copied} copied"
        )
    for name in stats.skipped[:MAX_SKIPPED_LOGGED]:
        ctx.log(f"snapshot: left out {name}: not a file, directory or symlink", stream="stderr")
    if len(stats.skipped) > MAX_SKIPPED_LOGGED:
        ctx.log(f"snapshot: left out {len(stats.skipped)} special files in all", stream="stderr")
    state = SnapshotState(
        snapshot=str(directory),
        path=params.path,
        absent=info.absent,
        files=info.files,
        bytes=info.bytes,
    )
    return state.model_dump()


def _state_of(ctx: DeployContext, state: RollbackState | None) -> SnapshotState:
    undone = rollback_target(ctx).deploy_id
    if state is None:
        raise RollbackError(
            f"no snapshot was taken before deployment {undone}, so there is nothing to restore"
        )
    try:
        return SnapshotState.model_validate(state)
    except ValidationError as exc:
        raise RollbackError(
            f"the snapshot state saved for deployment {undone} is unusable: {exc}"
        ) from exc


async def rollback_snapshot(
    ctx: DeployContext, params: SnapshotParams, state: RollbackState | None
) -> None:
    """Restore the snapshotted directory exactly (or remove it if it was absent), then run
    ``params.restart`` if given."""
    saved = _state_of(ctx, state)
    _refuse_unsafe(ctx, saved.path)
    store = SnapshotStore(ctx.data_dir)
    directory = Path(saved.snapshot)
    started = time.monotonic()
    info = await _file_work(store.load, directory)
    if info is None or info.path != saved.path:
        raise RollbackError(
            f"the snapshot of {saved.path} at {directory} no longer exists on this agent "
            f"(only the newest {params.keep} snapshots of a path are kept); "
            "restore it another way"
        )

    ctx.log(
        f"restore: rebuilding {saved.path} from the snapshot before {info.deploy_id} "
        + ("(the directory did not exist)" if info.absent else f"({info.files} files)")
    )
    source = None if info.absent else directory / "tree"
    try:
        stats = await _file_work(restore_tree, source, Path(saved.path))
    except OSError as exc:
        raise RollbackError(f"restoring {saved.path} from {directory} failed: {exc}") from exc
    took = time.monotonic() - started
    if info.absent:
        ctx.log(f"restore: removed {saved.path}, which did not exist before ({took:.2f} s)")
    else:
        ctx.log(
            f"restore: {saved.path} restored in {took:.2f} s: {stats.describe()}, "
            f"{human_size(stats.bytes)} written"
        )

    if params.restart is not None:
        cwd = saved.path if os.path.isdir(saved.path) else None
        # The agent bounds the whole rollback by ``timeout``; the restart gets what is left.
        left = max(params.timeout - (time.monotonic() - started), MIN_RESTART_TIMEOUT)
        try:
            await run_rollback_script(ctx, params.restart, timeout=left, cwd=cwd, name="restart")
        except RollbackError as exc:
            raise RollbackError(f"{saved.path} was restored, but {exc}") from exc


async def discard_snapshot(
    ctx: DeployContext, params: SnapshotParams, state: RollbackState | None
) -> None:
    """After a successful deployment: keep only the newest ``params.keep`` snapshots."""
    path = params.path
    if state is not None:
        with contextlib.suppress(ValidationError):  # else prune by the configured path
            path = SnapshotState.model_validate(state).path
    store = SnapshotStore(ctx.data_dir)
    removed = await _file_work(store.prune, path, params.keep)
    ctx.log(
        f"snapshot: keeping the newest {params.keep} snapshots of {path}; "
        f"removed {len(removed)}" + (f" ({', '.join(removed)})" if removed else "")
    )


SNAPSHOT = RollbackStrategy(
    name="snapshot",
    params=SnapshotParams,
    prepare=prepare_snapshot,
    rollback=rollback_snapshot,
    discard=discard_snapshot,
    needs_state=True,
    description="snapshot the deploy directory before deploying; restore it exactly on rollback",
)

"""``snapshot`` (SPEC deploy-29): copy the deploy directory before the deployment and record
what runs from it (processes, the units the request names); on rollback stop what the failed
release started there, put the directory back exactly, then bring back what ran before
(``systemctl restart`` of the units that were active, and the restart script if given).

The file work lives in :mod:`rollback_basic.tree` (copying, swapping) and
:mod:`rollback_basic.store` (layout, retention), the processes and units in
:mod:`rollback_basic.running`; this module is the strategy around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    RollbackParams,
    RollbackReport,
    RollbackRequest,
    RollbackState,
    RollbackStrategy,
    WorkBudget,
    WorkStopped,
    run_bounded,
)
from deploy_core.plugin.safefs import UnsafePath, identity, open_dir
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from rollback_basic import running
from rollback_basic.errors import RollbackError
from rollback_basic.runner import ScriptText, run_rollback_script
from rollback_basic.store import SnapshotStore
from rollback_basic.tree import human_size, restore_tree

MAX_SKIPPED_LOGGED = 10
MAX_STEPS = 100_000_000  # entries and megabytes one snapshot or restore may go through
MIN_RESTART_TIMEOUT = 1.0
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for what the failed release started


def _budget(what: str, params: SnapshotParams) -> WorkBudget:
    """Work on a tree stops when the agent gives up on the step (its timeout) — the thread
    with it — and never runs longer than the step's own timeout."""
    return WorkBudget(what, steps=MAX_STEPS, seconds=params.timeout)


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
    units: list[Annotated[str, Field(pattern=running.UNIT_NAME)]] = Field(
        default_factory=list,
        max_length=32,
        description="systemd units this directory's application runs as: their state is "
        "recorded with the snapshot, and those that were active are restarted on restore",
    )


class SnapshotState(BaseModel):
    """What ``prepare`` returns and ``rollback`` needs: where the snapshot is, what it holds."""

    model_config = ConfigDict(extra="ignore")

    snapshot: str
    path: str
    absent: bool
    files: int = Field(ge=0)
    bytes: int = Field(ge=0)
    # Where the path led when the snapshot was taken, and what its parent and the directory
    # itself were (st_dev, st_ino): a restore works on that resolved path and refuses when
    # the parent was replaced (a symlink swapped in, say).  Older states lack them.
    resolved: str | None = None
    parent_identity: list[int] | None = None
    identity: list[int] | None = None
    # What ran from the directory when the snapshot was taken (deploy-29), and when (clock
    # ticks after boot, as /proc counts process start times).  Older states lack them.
    processes: list[dict[str, Any]] = Field(default_factory=list)
    units: dict[str, str] = Field(default_factory=dict)
    taken_ticks: int | None = None


def _refuse_unsafe(ctx: DeployContext, path: str) -> Path:
    """The resolved ``path``, checked like every path a plugin works on as root
    (:meth:`DeployContext.check_path`: not ``/``, not in the agent's data directory, under
    ``workdir_roots``, writable by the ``run_as`` user), and never holding the agent's
    data directory: the snapshots would contain themselves."""
    try:
        _check_path(path)
        target = ctx.check_path(path, "snapshot path", access="write")
    except (ValueError, DeployFailed) as exc:
        raise RollbackError(f"refusing to snapshot or restore {path}: {exc}") from exc
    data = ctx.data_dir.resolve()
    if target in data.parents:
        raise RollbackError(
            f"refusing to snapshot or restore {path}: it contains the agent's data "
            f"directory {data}, so snapshots would include themselves; name the "
            "application's own directory"
        )
    return target


def _identities(path: Path) -> tuple[list[int] | None, list[int] | None]:
    """The identities of ``path``'s parent and of ``path`` (``None`` where missing), read
    without following a link."""
    try:
        with open_dir(path.parent) as parent:
            try:
                own = list(identity(os.lstat(path.name, dir_fd=parent.fd)))
            except FileNotFoundError:
                own = None
            return list(parent.identity), own
    except FileNotFoundError:
        return None, None


async def prepare_snapshot(
    ctx: DeployContext, request: RollbackRequest[Any, SnapshotParams]
) -> RollbackState:
    """Snapshot the ``path`` option before the deployment (a missing path is recorded as
    absent)."""
    params = request.options
    if os.path.islink(params.path):
        raise RollbackError(
            f"cannot snapshot {params.path}: it is not a directory (a symlink); "
            "name the directory itself"
        )
    resolved = _refuse_unsafe(ctx, params.path)
    store = SnapshotStore(ctx.data_dir)
    taken_ticks, procs, units = await asyncio.to_thread(_what_runs, resolved, params.units)
    _log_what_runs(ctx, params.path, procs, units)
    ctx.log(f"snapshot: copying {params.path}")
    started = time.monotonic()
    budget = _budget(f"snapshot of {params.path}", params)
    try:
        parent_identity, own_identity = _identities(resolved)
        directory, info, stats, linked_from = await run_bounded(
            lambda: store.take(
                params.path,
                request.deploy_id,
                request.command_type,
                source=resolved,
                budget=budget,
            ),
            budget,
        )
    except NotADirectoryError as exc:
        raise RollbackError(
            f"cannot snapshot {params.path}: it is not a directory (a symlink or a file); "
            "name the directory itself"
        ) from exc
    except (OSError, WorkStopped) as exc:
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
        resolved=str(resolved),
        parent_identity=parent_identity,
        identity=own_identity,
        processes=[p.to_json() for p in procs],
        units=units,
        taken_ticks=taken_ticks,
    )
    return state.model_dump()


def _what_runs(
    resolved: Path, units: list[str]
) -> tuple[int, list[running.RunningProcess], dict[str, str]]:
    """Now (in clock ticks), the processes running from ``resolved``, the units' states."""
    return running.now_ticks(), running.processes_under(str(resolved)), running.unit_states(units)


def _log_what_runs(
    ctx: DeployContext, path: str, procs: list[running.RunningProcess], units: dict[str, str]
) -> None:
    if procs:
        ctx.log(f"snapshot: {len(procs)} process(es) run from {path}:")
        for proc in procs:
            ctx.log(f"snapshot:   {proc.describe()}")
    else:
        ctx.log(f"snapshot: no process runs from {path}")
    for unit, state in units.items():
        ctx.log(f"snapshot: unit {unit} is {state}")


def _state_of(request: RollbackRequest[Any, SnapshotParams]) -> SnapshotState:
    undone, state = request.deploy_id, request.state
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
    ctx: DeployContext, request: RollbackRequest[Any, SnapshotParams]
) -> RollbackReport:
    """Stop what the failed release started in the directory, restore the directory exactly
    (or remove it if it was absent), then bring back what ran before: restart the units that
    were active and run ``params.restart`` if given.  The report lists what was stopped and
    what was brought back."""
    params = request.options
    saved = _state_of(request)
    resolved = Path(saved.resolved) if saved.resolved else _refuse_unsafe(ctx, saved.path)
    _refuse_unsafe(ctx, str(resolved))  # the constraints may have changed since
    store = SnapshotStore(ctx.data_dir)
    directory = Path(saved.snapshot)
    started = time.monotonic()
    info = await asyncio.to_thread(store.load, directory)
    if info is None or info.path != saved.path:
        raise RollbackError(
            f"the snapshot of {saved.path} at {directory} no longer exists on this agent "
            f"(only the newest {params.keep} snapshots of a path are kept); "
            "restore it another way"
        )

    stopped, kept = await _stop_new_processes(ctx, saved, resolved, params)

    ctx.log(
        f"restore: rebuilding {saved.path} from the snapshot before {info.deploy_id} "
        + ("(the directory did not exist)" if info.absent else f"({info.files} files)")
    )
    source = None if info.absent else directory / "tree"
    run_as = ctx.constraints.switch_to
    budget = _budget(f"restore of {saved.path}", params)
    try:
        stats = await run_bounded(
            lambda: restore_tree(
                source,
                resolved,
                parent_identity=saved.parent_identity,
                identity=saved.identity,
                owner=run_as.uid if run_as is not None else None,
                budget=budget,
            ),
            budget,
        )
    except UnsafePath as exc:
        raise RollbackError(f"restoring {saved.path} refused: {exc}") from exc
    except (OSError, WorkStopped) as exc:
        raise RollbackError(f"restoring {saved.path} from {directory} failed: {exc}") from exc
    took = time.monotonic() - started
    if info.absent:
        ctx.log(f"restore: removed {saved.path}, which did not exist before ({took:.2f} s)")
    else:
        ctx.log(
            f"restore: {saved.path} restored in {took:.2f} s: {stats.describe()}, "
            f"{human_size(stats.bytes)} written"
        )

    restored: list[str] = []
    for unit, before in saved.units.items():
        if before != "active":
            ctx.log(f"restore: unit {unit} was {before} before the deployment; left as it is")
            continue
        outcome = await asyncio.to_thread(running.restart_unit, unit)
        ctx.log(f"restore: {outcome}")
        if not running.unit_restarted(outcome):
            raise RollbackError(f"{saved.path} was restored, but {outcome}")
        restored.append(outcome)
    if params.restart is not None:
        cwd = saved.path if os.path.isdir(saved.path) else None
        # The agent bounds the whole rollback by ``timeout``; the restart gets what is left.
        left = max(params.timeout - (time.monotonic() - started), MIN_RESTART_TIMEOUT)
        try:
            await run_rollback_script(
                ctx, request, params.restart, timeout=left, cwd=cwd, name="restart"
            )
        except RollbackError as exc:
            raise RollbackError(f"{saved.path} was restored, but {exc}") from exc
        restored.append("restart script ran")
    return _report(saved, stopped, kept, restored)


async def _stop_new_processes(
    ctx: DeployContext, saved: SnapshotState, resolved: Path, params: SnapshotParams
) -> tuple[list[running.RunningProcess], list[running.RunningProcess]]:
    """Stop the processes running from the directory that were not running when the snapshot
    was taken and started after it (the failed release's), SIGTERM then SIGKILL.  With
    ``run_as`` constraints only that user's processes are stopped.  Returns (stopped, the
    recorded ones still running)."""
    before = {(p["pid"], p["start"]) for p in saved.processes if "pid" in p and "start" in p}
    now = await asyncio.to_thread(running.processes_under, str(resolved))
    run_as = ctx.constraints.switch_to
    new, kept = [], []
    for proc in now:
        if (proc.pid, proc.start) in before:
            kept.append(proc)
        elif saved.taken_ticks is not None and proc.start < saved.taken_ticks:
            ctx.log(f"restore: leaving {proc.describe()}: it ran before the snapshot")
        elif run_as is not None and proc.uid != run_as.uid:
            ctx.log(f"restore: leaving {proc.describe()}: not the run_as user's")
        else:
            new.append(proc)
    if not new:
        return [], kept
    for proc in new:
        ctx.log(f"restore: stopping {proc.describe()}, started by the deployment")
    grace = min(STOP_GRACE, max(ctx.remaining() / 4, 0.5))
    alive = await asyncio.to_thread(running.stop, new, grace)
    if alive:
        raise RollbackError(
            f"could not stop {', '.join(p.describe() for p in alive)} running from "
            f"{saved.path}; nothing was restored"
        )
    return new, kept


def _report(
    saved: SnapshotState,
    stopped: list[running.RunningProcess],
    kept: list[running.RunningProcess],
    restored: list[str],
) -> RollbackReport:
    running_now = {(p.pid, p.start) for p in kept}
    gone = [
        running.RunningProcess.from_json(p)
        for p in saved.processes
        if (p.get("pid"), p.get("start")) not in running_now
    ]
    parts = [f"{saved.path} restored"]
    if stopped:
        parts.append(f"stopped {len(stopped)} process(es) the deployment started there")
    if restored:
        parts.append("; ".join(restored))
    if gone:
        parts.append(
            f"{len(gone)} process(es) that ran before no longer run"
            + ("" if restored else ": name their units or a restart script to bring them back")
        )
    return RollbackReport(
        message="; ".join(parts),
        details={
            "stopped": [p.to_json() for p in stopped],
            "restored": restored,
            "still_running": [p.to_json() for p in kept],
            "ran_before_and_gone": [p.to_json() for p in gone],
        },
    )


async def discard_snapshot(
    ctx: DeployContext, request: RollbackRequest[Any, SnapshotParams]
) -> None:
    """After a successful deployment: keep only the newest ``keep`` snapshots."""
    params, state = request.options, request.state
    path = params.path
    if state is not None:
        with contextlib.suppress(ValidationError):  # else prune by the configured path
            path = SnapshotState.model_validate(state).path
    store = SnapshotStore(ctx.data_dir)
    budget = _budget(f"pruning snapshots of {path}", params)
    removed = await run_bounded(lambda: store.prune(path, params.keep, budget=budget), budget)
    ctx.log(
        f"snapshot: keeping the newest {params.keep} snapshots of {path}; "
        f"removed {len(removed)}" + (f" ({', '.join(removed)})" if removed else "")
    )


def _snapshot_path(record: dict[str, Any]) -> str | None:
    """The directory a deployment's snapshot strategy covers (``None``: another strategy)."""
    options = record["request"].get("rollback") or {}
    if options.get("strategy") != "snapshot":
        return None
    state = record.get("rollback_state") or {}
    path = state.get("path") or options.get("path")
    return str(path) if path else None


def snapshot_still_kept(record: dict[str, Any], later: list[dict[str, Any]]) -> str | None:
    """Server side: whether the snapshot taken before ``record`` was pruned since.

    Each later deployment that snapshotted the same directory adds a newer snapshot; each
    that succeeded then kept only its ``keep`` newest.  ``record``'s is gone once a success
    found at least ``keep`` snapshots newer than it.
    """
    path = _snapshot_path(record)
    if path is None:
        return None
    newer = 0
    for other in later:
        if _snapshot_path(other) != path:
            continue
        if other.get("rollback_state"):
            newer += 1
        keep = int((other["request"].get("rollback") or {}).get("keep", 3))
        if other["status"] == "success" and newer >= keep:
            return (
                f"its snapshot of {path} was pruned when deployment {other['deploy_id']} "
                f"succeeded (it kept only the newest {keep} snapshots of {path}); restore "
                "the directory another way"
            )
    return None


SNAPSHOT = RollbackStrategy(
    name="snapshot",
    params=SnapshotParams,
    prepare=prepare_snapshot,
    rollback=rollback_snapshot,
    discard=discard_snapshot,
    needs_state=True,
    description="snapshot the deploy directory before deploying; restore it exactly on rollback",
    restorable=snapshot_still_kept,
)

"""``deploy.file``: write a file with a given content and mode, and put back what was there
when the deployment is rolled back.

Two registrations:

- the deploy type ``deploy.file`` (parameters, executor, stages);
- the rollback strategy ``file_restore``, its default: before the write it keeps a copy of
  the file (or notes that there was none), on rollback it puts that copy back, and after a
  success it prunes old copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    DeployParams,
    DeployStatus,
    DeployType,
    RollbackParams,
    RollbackRequest,
    RollbackState,
    RollbackStrategy,
    Stage,
    hookimpl,
    safefs,
)
from pydantic import BaseModel, Field, field_validator

MAX_CONTENT_BYTES = 512 * 1024

# ----------------------------------------------------------------------------- parameters


class FileParams(DeployParams):
    """What a ``deploy.file`` request carries besides the common fields."""

    path: str = Field(description="absolute path of the file to write")
    content: str = Field(description="the file's new content (UTF-8 text)")
    mode: str = Field("0644", description="permission bits, in octal: '0644', '600'")
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds the write may take")

    @field_validator("path")
    @classmethod
    def _absolute_file_path(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or "\x00" in value:
            raise ValueError("path must be an absolute file path, e.g. /etc/app/app.conf")
        return os.path.normpath(value)

    @field_validator("content")
    @classmethod
    def _content_size(cls, value: str) -> str:
        size = len(value.encode())
        if size > MAX_CONTENT_BYTES:
            raise ValueError(f"content is {size} bytes; the limit is {MAX_CONTENT_BYTES}")
        return value

    @field_validator("mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        digits = value.removeprefix("0o")
        if not (1 <= len(digits) <= 4 and all(c in "01234567" for c in digits)):
            raise ValueError(f"mode must be octal permission bits like '0644', got {value!r}")
        return f"{int(digits, 8):04o}"


class FileResult(BaseModel):
    """The callback's ``result`` for ``deploy.file``."""

    path: str
    bytes: int
    sha256: str
    mode: str
    previous_sha256: str | None = Field(description="None when the file did not exist")
    changed: bool


# ----------------------------------------------------------------------------- writing


def _read(path: Path) -> tuple[bytes, int] | None:
    """The content and permission bits of regular file ``path``; ``None`` when it is
    missing.  Read through its directory opened without following a link (the agent is
    root; a script may own that directory and swap a link in)."""
    try:
        with safefs.open_dir(path.parent) as parent:
            st = safefs.lstat_at(parent, path.name)
            if st is None:
                return None
            if not stat.S_ISREG(st.st_mode):
                raise safefs.UnsafePath(str(path), "it is not a regular file")
            fd = safefs.open_file_at(parent, path.name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(), stat.S_IMODE(os.fstat(handle.fileno()).st_mode)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: a reader sees the old file or the new one,
    never half of it.  A fresh file is written in the directory opened without following a
    link, then renamed over ``path`` (:func:`deploy_core.plugin.safefs.write_file_at`)."""
    with safefs.open_dir(path.parent) as parent:
        safefs.write_file_at(parent, path.name, data, mode)


STAGES = (
    Stage(DeployStatus.EXECUTING.value, 0, 10, "checking the target"),
    Stage(DeployStatus.INSTALLING.value, 10, 90, "writing the file"),
)


def _checked(ctx: DeployContext, path: str) -> Path:
    """``path`` resolved and held to the agent's constraints (``workdir_roots``; with
    ``run_as``, a file that user could replace itself): the agent writes it as root."""
    if os.path.islink(path):
        raise DeployFailed(f"{path} is a symlink, not a regular file; name the file itself")
    return ctx.check_path(path, "deploy.file path", access="replace")


async def write_file(ctx: DeployContext, params: FileParams) -> FileResult:
    """The executor: check the target, then write the file in one atomic step."""
    shown = Path(params.path)
    ctx.report(DeployStatus.EXECUTING, fraction=0.5, message=f"checking {shown}")
    target = _checked(ctx, params.path)
    if not target.parent.is_dir():
        raise DeployFailed(f"directory {shown.parent} does not exist on this host")
    try:
        before = await asyncio.to_thread(_read, target)
    except safefs.UnsafePath:
        raise DeployFailed(f"{shown} exists and is not a regular file") from None
    previous = hashlib.sha256(before[0]).hexdigest() if before is not None else None
    data = params.content.encode()
    ctx.report(
        DeployStatus.INSTALLING, fraction=0.0, message=f"writing {len(data)} bytes to {shown}"
    )
    try:
        await asyncio.to_thread(write_atomically, target, data, int(params.mode, 8))
    except OSError as exc:
        raise DeployFailed(f"cannot write {shown}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    ctx.log(f"wrote {shown}: {len(data)} bytes, mode {params.mode}, sha256 {digest[:12]}")
    ctx.report(DeployStatus.INSTALLING, fraction=1.0, message="file written")
    return FileResult(
        path=str(shown),
        bytes=len(data),
        sha256=digest,
        mode=params.mode,
        previous_sha256=previous,
        changed=previous != digest,
    )


# ----------------------------------------------------------------------------- rollback


class RestoreParams(RollbackParams):
    """Options of the ``file_restore`` strategy."""

    strategy: Literal["file_restore"] = "file_restore"
    keep: int = Field(3, ge=1, le=100, description="copies of each file kept after a success")


def _backup_dir(ctx: DeployContext, path: str) -> Path:
    data_dir = Path(os.path.realpath(ctx.data_dir))  # the agent's own; resolved once
    return data_dir / "file-backups" / hashlib.sha256(path.encode()).hexdigest()[:16]


# What the agent hands the strategy: the deployment's FileParams, these options, the state.
Request = RollbackRequest[FileParams, RestoreParams]


async def keep_copy(ctx: DeployContext, request: Request) -> RollbackState:
    """``prepare``: before the write, copy the file (or note that there is none)."""
    if not isinstance(request.params, FileParams):
        raise RuntimeError(f"file_restore only undoes deploy.file, not {request.command_type}")
    path = request.params.path
    try:
        kept = await asyncio.to_thread(_read, _checked(ctx, path))
    except safefs.UnsafePath:
        raise RuntimeError(f"{path} is not a regular file; file_restore cannot keep it") from None
    if kept is None:
        return {"path": path, "existed": False}
    data, mode = kept
    # Named by time first: sorting by name sorts by age (file times can be too coarse).
    backup = _backup_dir(ctx, path) / f"{time.time_ns():020d}-{request.deploy_id}"
    backup.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    await asyncio.to_thread(write_atomically, backup, data, 0o600)
    ctx.log(f"kept a copy of {path} in {backup}")
    return {"path": path, "existed": True, "backup": str(backup), "mode": f"{mode:04o}"}


async def restore_copy(ctx: DeployContext, request: Request) -> None:
    """``rollback``: put the kept copy back, or remove a file the deployment created."""
    state = request.state
    if state is None:  # the core refuses before this, since needs_state is set
        raise RuntimeError("no copy was kept for this deployment")
    target = _checked(ctx, state["path"])
    if not state["existed"]:
        with contextlib.suppress(FileNotFoundError), safefs.open_dir(target.parent) as parent:
            os.unlink(target.name, dir_fd=parent.fd)
        ctx.log(f"removed {state['path']}: it did not exist before the deployment")
        return
    backup = Path(state["backup"])
    if not backup.is_file():
        raise RuntimeError(f"the copy {backup} is gone (pruned after newer deployments?)")
    data = await asyncio.to_thread(backup.read_bytes)
    await asyncio.to_thread(write_atomically, target, data, int(state["mode"], 8))
    ctx.log(f"restored {state['path']} from {backup}")


async def prune_copies(ctx: DeployContext, request: Request) -> None:
    """``discard``: after a success, keep only the newest ``keep`` copies of the file."""
    state = request.state
    if not state or not state.get("existed"):
        return
    copies = sorted(Path(state["backup"]).parent.iterdir(), reverse=True)
    for old in copies[request.options.keep :]:
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- registration


@hookimpl
def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
    """Register ``deploy.file``."""
    register(
        DeployType(
            name="deploy.file",
            params=FileParams,
            executor=write_file,
            stages=STAGES,
            default_rollback="file_restore",
            description="write a file with a given content and mode",
        )
    )


@hookimpl
def deploy_register_rollback_strategies(register: Callable[[RollbackStrategy], None]) -> None:
    """Register ``file_restore``."""
    register(
        RollbackStrategy(
            name="file_restore",
            params=RestoreParams,
            prepare=keep_copy,
            rollback=restore_copy,
            discard=prune_copies,
            needs_state=True,
            description="put back the file deploy.file replaced",
        )
    )

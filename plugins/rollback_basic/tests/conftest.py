"""Fixtures: contexts set up the way the agent sets them up, and a full view of a file tree."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_core.agent.context import DeployContext
from deploy_core.models import RollbackTarget
from deploy_core.testing import RecordingReporter, make_context
from rollback_bed import REASONS

Tree = dict[str, tuple[Any, ...]]


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


def _tree_of(root: Path) -> Tree:
    """Everything about ``root`` a restore must bring back: per entry its kind, permission
    bits, modification time and content (bytes for files, target for symlinks)."""
    out: Tree = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", oct(mode), st.st_mtime_ns)
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}" if rel != "." else name)
        else:
            out[rel] = ("file", oct(mode), st.st_mtime_ns, path.read_bytes())

    visit(root, ".")
    return out


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The agent's data directory."""
    return tmp_path / "agent-data"


ContextFactory = Callable[..., tuple[DeployContext, RecordingReporter]]


@pytest.fixture
def deployment(data_dir: Path) -> ContextFactory:
    """``ctx, reporter = deployment("d-1", params={...})``: the context of a deployment."""

    def factory(
        deploy_id: str = "d-1",
        *,
        command_type: str = "deploy.shell",
        params: dict[str, Any] | None = None,
    ) -> tuple[DeployContext, RecordingReporter]:
        return make_context(data_dir, deploy_id=deploy_id, command_type=command_type, params=params)

    return factory


def _failed(
    ctx: DeployContext,
    reason: str,
    rollback: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> DeployContext:
    """Mark ``ctx``'s deployment failed with ``reason``: :func:`rollback_bed.undo` hands it
    to the strategy, as the agent does in an automatic rollback (``rollback`` and ``state``
    travel in the request ``undo`` builds)."""
    REASONS[ctx] = reason
    return ctx


@pytest.fixture
def manual_rollback(data_dir: Path) -> Callable[..., tuple[DeployContext, RecordingReporter]]:
    """``ctx, reporter = manual_rollback(target)``: a ``deploy.rollback`` command's context."""

    def factory(
        target: RollbackTarget, deploy_id: str = "r-1"
    ) -> tuple[DeployContext, RecordingReporter]:
        return make_context(data_dir, deploy_id=deploy_id, rollback_of=target)

    return factory


def _read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs}


# Plain helpers handed out as fixtures, so no test module imports conftest.


@pytest.fixture
def tree_of() -> Callable[[Path], Tree]:
    """``tree_of(path)``: kind, mode, mtime and content of every entry under ``path``."""
    return _tree_of


@pytest.fixture
def failed() -> Callable[..., DeployContext]:
    """``failed(ctx, reason, rollback_dict, state)``: set ``ctx`` up for an automatic
    rollback of its own deployment, as the agent does."""
    return _failed


@pytest.fixture
def read_env() -> Callable[[Path], dict[str, str]]:
    """``read_env(file)``: parse a file written by ``env``."""
    return _read_env

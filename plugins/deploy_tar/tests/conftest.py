"""Fixtures: packages built in tmp, an artifact provider serving them from a local directory,
and ``deploy.tar`` contexts set up the way the agent sets them up.

The provider stands in for the agent's QUIC fetcher (tested in the core); the tests that go
through a real server and agent (``test_through_deploy_center.py``) use the real one.
:class:`AgentBench` runs commands through the core's own executor (prepare → deploy → health
→ rollback or discard → callback), as the agent does.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from deploy_core.agent.artifacts import ArtifactError, FetchedArtifact, Progress
from deploy_core.agent.context import DeployContext
from deploy_core.agent.executor import Executor
from deploy_core.agent.journal import Journal
from deploy_core.models import EVENT_CALLBACK, DeployCommand, RollbackTarget
from deploy_core.plugins import load_plugins
from deploy_core.testing import RecordingReporter
from deploy_tar.plugin import DEPLOY_TYPE

Files = dict[str, str | bytes]


def build_package(path: Path, files: Files, *, modes: dict[str, int] | None = None) -> Path:
    """A tar.gz at ``path`` holding ``files`` (name → content; a name ending in ``/`` is a
    directory); ``*.sh`` files are executable unless ``modes`` says otherwise."""
    modes = modes or {}
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_700_000_000
            if name.endswith("/"):
                info.type, info.mode = tarfile.DIRTYPE, modes.get(name, 0o755)
                tar.addfile(info)
                continue
            data = content.encode() if isinstance(content, str) else content
            info.size = len(data)
            info.mode = modes.get(name, 0o755 if name.endswith(".sh") else 0o644)
            tar.addfile(info, io.BytesIO(data))
    return path


class LocalArtifacts:
    """An artifact provider over a directory: ``add(path)`` stores a package by SHA-256."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.fetched: list[str] = []

    def add(self, package: Path) -> str:
        sha256 = hashlib.sha256(package.read_bytes()).hexdigest()
        shutil.copyfile(package, self.cache / sha256)
        return sha256

    async def fetch(
        self,
        sha256: str,
        *,
        deadline: float | None = None,
        progress: Progress | None = None,
        waiting: Callable[[int], None] | None = None,
    ) -> FetchedArtifact:
        path = self.cache / sha256
        if not path.is_file():
            raise ArtifactError(f"the server refused artifact {sha256}: unknown artifact")
        size = path.stat().st_size
        first = sha256 not in self.fetched
        self.fetched.append(sha256)
        if progress is not None:
            progress(size // 2, size)
            progress(size, size)
        return FetchedArtifact(path, sha256, size, size if first else 0, 0, not first)


ContextFactory = Callable[..., tuple[DeployContext, RecordingReporter]]


@pytest.fixture
def artifacts(tmp_path: Path) -> LocalArtifacts:
    """Packages the contexts can fetch."""
    return LocalArtifacts(tmp_path / "agent" / "cache")


@pytest.fixture
def package(tmp_path: Path, artifacts: LocalArtifacts) -> Callable[..., str]:
    """``sha = package({"install.sh": "..."})``: build a package and make it fetchable."""
    count = [0]

    def make(files: Files, **kwargs: Any) -> str:
        count[0] += 1
        built = build_package(tmp_path / f"package-{count[0]}.tar.gz", files, **kwargs)
        return artifacts.add(built)

    return make


@pytest.fixture
def tar_context(tmp_path: Path, artifacts: LocalArtifacts) -> ContextFactory:
    """``ctx, reporter = tar_context(params, rollback=True, rollback_of=None)``: the context
    of a ``deploy.tar`` deployment (or, with ``rollback_of``, of a rollback of one)."""

    def factory(
        params: dict[str, Any],
        *,
        rollback: dict[str, Any] | None = None,
        deploy_id: str | None = None,
        rollback_of: RollbackTarget | None = None,
        timeout: float = 120,
    ) -> tuple[DeployContext, RecordingReporter]:
        reporter = RecordingReporter()
        command = DeployCommand(
            deploy_id=deploy_id or uuid.uuid4().hex,
            command_type="deploy.rollback" if rollback_of else "deploy.tar",
            params={} if rollback_of else params,
            rollback=rollback,
            expires_at=time.time() + timeout,
            rollback_of=rollback_of,
        )
        ctx = DeployContext(
            command=command,
            reporter=reporter,
            data_dir=tmp_path / "agent" / "data",
            stage_of=DEPLOY_TYPE.stage,
            artifacts=artifacts,
        )
        return ctx, reporter

    return factory


class AgentBench:
    """The agent's executor and journal with only this plugin loaded, fetching from
    :class:`LocalArtifacts`; each call runs one command to its callback payload."""

    def __init__(
        self,
        root: Path,
        artifacts: LocalArtifacts,
        extra: Sequence[tuple[str, object]] = (),
        plugin_settings: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """:param extra: more plugins (name, module or object), e.g. a health check.
        :param plugin_settings: the agent config's ``[plugins.NAME]`` tables."""
        self.journal = Journal(root / "journal.db")
        self.executor = Executor(
            plugins=load_plugins(extra=extra, env={"DEPLOY_CORE_PLUGINS": "deploy_tar"}),
            journal=self.journal,
            data_dir=root / "data",
            wake=lambda: None,
            artifacts=artifacts,
            plugin_settings=plugin_settings,
        )

    async def run(self, command: DeployCommand) -> dict[str, Any]:
        self.journal.accept(command)
        await self.executor.run(command)
        for message in reversed(self.journal.pending()):
            if message.name == EVENT_CALLBACK and message.deploy_id == command.deploy_id:
                return message.payload
        raise AssertionError(f"no callback for {command.deploy_id}")

    async def deploy(
        self,
        params: dict[str, Any],
        *,
        deploy_id: str | None = None,
        rollback: dict[str, Any] | None = None,
        health_checks: list[dict[str, Any]] | None = None,
        secret_env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """A deploy.tar deployment with the ``release`` rollback (or ``rollback``)."""
        return await self.run(
            DeployCommand(
                deploy_id=deploy_id or uuid.uuid4().hex,
                command_type="deploy.tar",
                params=params,
                rollback=rollback or {"strategy": "release", "timeout": 60.0},
                health_checks=health_checks or [],
                expires_at=time.time() + 120,
                secret_env=secret_env or {},
            )
        )

    async def roll_back(self, deployed: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """A manual rollback (``deploy.rollback``) of the deployment ``deployed`` reported."""
        target = RollbackTarget(
            deploy_id=deployed["callback_id"],
            command_type="deploy.tar",
            params=params,
            rollback={"strategy": "release", "timeout": 60.0},
            rollback_state=deployed["rollback_state"],
        )
        return await self.run(
            DeployCommand(
                deploy_id=uuid.uuid4().hex,
                command_type="deploy.rollback",
                expires_at=time.time() + 120,
                rollback_of=target,
            )
        )


@pytest.fixture
def agent(tmp_path: Path, artifacts: LocalArtifacts) -> Iterator[AgentBench]:
    """An :class:`AgentBench` whose data directory is ``tmp_path/agent/data``."""
    bench = AgentBench(tmp_path / "agent", artifacts)
    yield bench
    bench.journal.close()

"""Bind-mount sources are held to the agent's constraints before the engine is asked for
anything (no engine needed: the refusal comes first)."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.agent.context import DeployFailed
from deploy_core.testing import make_context
from deploy_docker.deploy import check_bind_sources, deploy_container
from deploy_docker.params import DockerParams

BASE = {"image": "127.0.0.1:5000/web:v1", "container_name": "web"}


async def test_a_bind_source_outside_the_roots_fails_the_deployment_before_the_engine(
    tmp_path: Path,
) -> None:
    ctx, reporter = make_context(tmp_path / "data", command_type="deploy.docker")
    ctx.constraints = ConstraintPolicy(Constraints(workdir_roots=[str(tmp_path / "apps")]))
    params = DockerParams.model_validate(
        {**BASE, "volumes": [f"{tmp_path}/apps/web:/data", "/etc:/host-etc:ro", "cache:/c"]}
    )

    with pytest.raises(DeployFailed) as caught:
        await deploy_container(ctx, params)

    assert str(caught.value) == (
        "refused by constraint workdir_roots: bind-mount source of /host-etc /etc is outside "
        f"the allowed roots {tmp_path / 'apps'}"
    )
    assert reporter.reports == []  # refused before even connecting to the engine


def test_with_run_as_a_writable_bind_needs_a_directory_that_user_could_write() -> None:
    if os.geteuid() != 0:
        missing_part("checking paths for run_as needs the agent to be root")
    base = Path(tempfile.mkdtemp(prefix="bind-paths-"))
    try:
        base.chmod(0o755)
        (base / "theirs").mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(base / "theirs", nobody.pw_uid, nobody.pw_gid)
        (base / "roots").mkdir()
        ctx, _ = make_context(base / "data", command_type="deploy.docker")
        ctx.constraints = ConstraintPolicy(Constraints(run_as="nobody"))

        check_bind_sources(
            ctx, DockerParams.model_validate({**BASE, "volumes": [f"{base}/theirs:/d"]})
        )
        check_bind_sources(
            ctx, DockerParams.model_validate({**BASE, "volumes": [f"{base}/roots:/r:ro"]})
        )
        with pytest.raises(DeployFailed, match=r"refused by constraint run_as: bind-mount source"):
            check_bind_sources(
                ctx, DockerParams.model_validate({**BASE, "volumes": [f"{base}/roots:/r"]})
            )
    finally:
        for sub in ("theirs", "roots"):
            (base / sub).rmdir()
        base.rmdir()

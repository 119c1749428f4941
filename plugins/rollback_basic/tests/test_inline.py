"""The ``inline`` strategy re-runs the deployment's own script."""

from __future__ import annotations

import pytest
from deploy_core.models import RollbackTarget
from rollback_bed import undo

from rollback_basic.errors import RollbackError
from rollback_basic.inline import INLINE, InlineParams

# Deploys normally; on rollback records its environment and working directory.
BOTH_WAYS = """\
if [ "$DEPLOY_ACTION" = rollback ]; then
    env > rollback-env.txt
    exit 0
fi
echo deploying
exit 3
"""


async def test_inline_reruns_the_deploy_script_with_rollback_env(
    tmp_path, deployment, failed, read_env
):
    workdir = tmp_path / "app"
    workdir.mkdir()
    params = {"script": BOTH_WAYS, "workdir": str(workdir), "env": {"APP_ENV": "prod"}}
    ctx, reporter = deployment("d-7", params=params)
    failed(ctx, "script exited with code 3", {"strategy": "inline"})

    await INLINE.rollback(ctx, undo(ctx, InlineParams(strategy="inline", timeout=10), None))

    env = read_env(workdir / "rollback-env.txt")  # written in the deployment's workdir
    assert env["DEPLOY_ACTION"] == "rollback"
    assert env["DEPLOY_ROLLBACK_OF"] == "d-7"
    assert env["DEPLOY_FAILURE_REASON"] == "script exited with code 3"
    assert env["APP_ENV"] == "prod"
    assert any("rollback script finished" in line for line in reporter.lines())


async def test_inline_manual_rollback_reports_reason_manual(tmp_path, manual_rollback, read_env):
    workdir = tmp_path / "app"
    workdir.mkdir()
    target = RollbackTarget(
        deploy_id="d-1",
        command_type="deploy.shell",
        params={"script": BOTH_WAYS, "workdir": str(workdir)},
        rollback={"strategy": "inline"},
    )
    ctx, _ = manual_rollback(target)

    await INLINE.rollback(ctx, undo(ctx, InlineParams(strategy="inline"), None))

    env = read_env(workdir / "rollback-env.txt")
    assert env["DEPLOY_ROLLBACK_OF"] == "d-1"
    assert env["DEPLOY_FAILURE_REASON"] == "manual"
    assert env["DEPLOY_ID"] == "r-1"  # the rollback command's own id


async def test_inline_without_a_deploy_script_fails_clearly(deployment, failed):
    ctx, _ = deployment("d-2", command_type="deploy.docker", params={"image": "nginx"})
    failed(ctx, "health check failed", {"strategy": "inline"})

    with pytest.raises(RollbackError, match=r"d-2 \(deploy.docker\) has no 'script' parameter"):
        await INLINE.rollback(ctx, undo(ctx, InlineParams(strategy="inline"), None))


async def test_inline_failing_rollback_raises_exit_code_and_last_stderr_line(
    tmp_path, deployment, failed
):
    script = """\
if [ "$DEPLOY_ACTION" = rollback ]; then
    echo first >&2
    echo "no backup" >&2
    exit 4
fi
"""
    ctx, _ = deployment("d-3", params={"script": script, "workdir": str(tmp_path)})
    failed(ctx, "script timed out", {"strategy": "inline"})

    with pytest.raises(RollbackError, match=r"^rollback script exited with code 4: no backup$"):
        await INLINE.rollback(ctx, undo(ctx, InlineParams(strategy="inline", timeout=10), None))


async def test_inline_missing_workdir_fails_clearly(tmp_path, deployment, failed):
    ctx, _ = deployment(params={"script": "true", "workdir": str(tmp_path / "gone")})
    failed(ctx, "script exited with code 1", {"strategy": "inline"})

    with pytest.raises(RollbackError, match=r"working directory .*gone does not exist"):
        await INLINE.rollback(ctx, undo(ctx, InlineParams(strategy="inline"), None))

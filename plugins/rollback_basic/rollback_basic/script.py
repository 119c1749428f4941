"""``script``: undo a deployment by running a separate rollback script given with it."""

from __future__ import annotations

from typing import Any, Literal

from deploy_core.plugin import DeployContext, RollbackParams, RollbackRequest, RollbackStrategy
from pydantic import Field

from rollback_basic.runner import AbsoluteDir, ScriptEnv, ScriptText, run_rollback_script


class ScriptParams(RollbackParams):
    """Options of the ``script`` strategy.

    ``workdir`` unset runs the script in the agent's own working directory.
    """

    strategy: Literal["script"] = "script"
    script: ScriptText = Field(description="the rollback script (at most 100 KB)")
    workdir: AbsoluteDir = Field(None, description="absolute directory to run the script in")
    env: ScriptEnv = Field(default_factory=dict, description="extra environment variables")


async def rollback_script(ctx: DeployContext, request: RollbackRequest[Any, ScriptParams]) -> None:
    """Run the ``script`` option with the ``env`` option plus the ``DEPLOY_*`` rollback
    variables."""
    params = request.options
    await run_rollback_script(
        ctx,
        request,
        params.script,
        timeout=params.timeout,
        cwd=params.workdir,
        env=params.env,
        name="rollback",
    )


SCRIPT = RollbackStrategy(
    name="script",
    params=ScriptParams,
    rollback=rollback_script,
    description="run a separate rollback script given with the deployment",
)

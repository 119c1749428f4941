"""``inline``: undo a deployment by running its own script again with ``DEPLOY_ACTION=rollback``.

For scripts written to handle both directions::

    if [ "$DEPLOY_ACTION" = rollback ]; then ...; fi
"""

from __future__ import annotations

from typing import Any, Literal

from deploy_core.plugin import DeployContext, RollbackParams, RollbackState, RollbackStrategy

from rollback_basic.errors import RollbackError
from rollback_basic.runner import rollback_target, run_rollback_script


class InlineParams(RollbackParams):
    """Options of the ``inline`` strategy; ``timeout`` bounds the re-run script."""

    strategy: Literal["inline"] = "inline"


def _target_script(ctx: DeployContext) -> tuple[str, str | None, dict[str, str]]:
    """The undone deployment's ``script``, ``workdir`` and ``env``."""
    target = rollback_target(ctx)
    params: dict[str, Any] = target.params
    script = params.get("script")
    if not isinstance(script, str) or not script.strip():
        raise RollbackError(
            f"inline rollback re-runs the deployment's own script, but deployment "
            f"{target.deploy_id} ({target.command_type}) has no 'script' parameter; "
            "use the 'script' or 'snapshot' rollback strategy for it"
        )
    workdir = params.get("workdir")
    if workdir is not None and not isinstance(workdir, str):
        raise RollbackError(
            f"deployment {target.deploy_id} has a non-text 'workdir' ({workdir!r}); "
            "cannot re-run its script"
        )
    raw_env = params.get("env") or {}
    if not isinstance(raw_env, dict):
        raise RollbackError(
            f"deployment {target.deploy_id} has an 'env' that is not a mapping; "
            "cannot re-run its script"
        )
    env = {str(key): str(value) for key, value in raw_env.items()}
    return script, workdir or None, env


async def rollback_inline(
    ctx: DeployContext, params: InlineParams, state: RollbackState | None
) -> None:
    """Run the deployment's script again, in its workdir and with its env, plus
    ``DEPLOY_ACTION=rollback``, ``DEPLOY_ROLLBACK_OF`` and ``DEPLOY_FAILURE_REASON``."""
    script, workdir, env = _target_script(ctx)
    await run_rollback_script(
        ctx, script, timeout=params.timeout, cwd=workdir, env=env, name="rollback"
    )


INLINE = RollbackStrategy(
    name="inline",
    params=InlineParams,
    rollback=rollback_inline,
    description="re-run the deployment's own script with DEPLOY_ACTION=rollback",
)

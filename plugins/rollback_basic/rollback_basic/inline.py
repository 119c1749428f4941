"""``inline``: undo a deployment by running its own script again with ``DEPLOY_ACTION=rollback``.

For scripts written to handle both directions::

    if [ "$DEPLOY_ACTION" = rollback ]; then ...; fi
"""

from __future__ import annotations

from typing import Any, Literal

from deploy_core.plugin import DeployContext, RollbackParams, RollbackRequest, RollbackStrategy

from rollback_basic.errors import RollbackError
from rollback_basic.runner import run_rollback_script


class InlineParams(RollbackParams):
    """Options of the ``inline`` strategy; ``timeout`` bounds the re-run script."""

    strategy: Literal["inline"] = "inline"


def _target_script(
    request: RollbackRequest[Any, InlineParams],
) -> tuple[str, str | None, dict[str, str]]:
    """The undone deployment's ``script``, ``workdir`` and ``env`` (of any deploy type whose
    parameters have them, as ``deploy.shell``'s do)."""
    params = request.params
    script = getattr(params, "script", None)
    if not isinstance(script, str) or not script.strip():
        raise RollbackError(
            f"inline rollback re-runs the deployment's own script, but deployment "
            f"{request.deploy_id} ({request.command_type}) has no 'script' parameter; "
            "use the 'script' or 'snapshot' rollback strategy for it"
        )
    workdir = getattr(params, "workdir", None)
    if workdir is not None and not isinstance(workdir, str):
        raise RollbackError(
            f"deployment {request.deploy_id} has a non-text 'workdir' ({workdir!r}); "
            "cannot re-run its script"
        )
    raw_env = getattr(params, "env", None) or {}
    if not isinstance(raw_env, dict):
        raise RollbackError(
            f"deployment {request.deploy_id} has an 'env' that is not a mapping; "
            "cannot re-run its script"
        )
    env = {str(key): str(value) for key, value in raw_env.items()}
    return script, workdir or None, env


async def rollback_inline(ctx: DeployContext, request: RollbackRequest[Any, InlineParams]) -> None:
    """Run the deployment's script again, in its workdir and with its env, plus
    ``DEPLOY_ACTION=rollback``, ``DEPLOY_ROLLBACK_OF`` and ``DEPLOY_FAILURE_REASON``."""
    script, workdir, env = _target_script(request)
    await run_rollback_script(
        ctx, request, script, timeout=request.options.timeout, cwd=workdir, env=env
    )


INLINE = RollbackStrategy(
    name="inline",
    params=InlineParams,
    rollback=rollback_inline,
    description="re-run the deployment's own script with DEPLOY_ACTION=rollback",
)

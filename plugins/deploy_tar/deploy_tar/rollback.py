"""The ``release`` rollback strategy: go back to the release that was live before.

- ``prepare`` (before the deployment) records the release ``current`` points at.
- ``rollback`` marks the deployment's release bad, switches ``current`` back to the recorded
  release (or, if that one is gone or bad, to the newest good release made before), and starts
  it again: its own install script runs once more with ``DEPLOY_ACTION=rollback``, or the
  strategy's ``start`` script when one is named. The core health-checks again afterwards.
  A release the deployment never extracted (it failed while fetching or extracting) left
  nothing to undo. A manual rollback of a successful deployment does the same.
- ``discard`` (after the deployment passed its checks) removes releases beyond
  ``keep_releases``, never the current or the previous one.
"""

from __future__ import annotations

import asyncio

from deploy_core.plugin import DeployContext, RollbackReport, RollbackRequest, RollbackState
from deploy_tar.deploy import prune_bounded
from deploy_tar.params import ReleaseParams, TarParams
from deploy_tar.releases import ReleaseError, Releases
from deploy_tar.scripts import failure, find_script, run_release_script

__all__ = ["discard_releases", "prepare_release", "rollback_release"]


Request = RollbackRequest[TarParams, ReleaseParams]


def _releases(ctx: DeployContext, request: Request) -> Releases:
    """The deployment's releases: ``target_dir`` held to the agent's constraints, and to
    the directory ``prepare`` found there (a different one put in its place is refused)."""
    target = ctx.check_path(request.params.target_dir, "tar target_dir", access="write")
    recorded = (request.state or {}).get("target_identity")
    return Releases(target, identity=recorded if isinstance(recorded, list) else None)


async def prepare_release(ctx: DeployContext, request: Request) -> RollbackState:
    """Record the live release (``previous`` is ``None`` before the first deployment)."""
    releases = _releases(ctx, request)
    previous = await asyncio.to_thread(releases.current)
    if previous is not None:
        ctx.log(f"previous release: {previous}", stream="agent")
    return {
        "target_dir": str(releases.target_dir),
        "release": request.deploy_id,
        "previous": previous,
        "target_identity": await asyncio.to_thread(releases.identify),
    }


async def rollback_release(ctx: DeployContext, request: Request) -> RollbackReport:
    """Mark the deployment's release bad, make the release before it current, start it.

    With no release before it (a first deployment) there is nothing to roll back to: the
    release is marked bad, ``current`` removed, and the report says so."""
    releases = _releases(ctx, request)
    state = request.state or {}
    failed = str(state.get("release") or request.deploy_id)
    recorded = state.get("previous") if isinstance(state.get("previous"), str) else None
    if not releases.exists(failed):
        ctx.log(f"release {failed} was never extracted: nothing to undo", stream="agent")
        live = releases.current()
        return RollbackReport(
            message=f"nothing to undo: release {failed} was never extracted"
            + (f"; current is still {live}" if live else ""),
            nothing_to_undo=True,
        )
    current = releases.current()
    back_to = releases.fallback(failed, recorded)
    if current not in {failed, recorded, back_to, None}:
        raise ReleaseError(
            f"{releases.current_link} points at release {current}, made after {failed}; "
            f"roll back the deployment of {current} first"
        )
    reason = request.reason or "manual rollback"
    releases.mark_bad(failed, f"rolled back by {ctx.deploy_id}: {reason}")
    ctx.log(f"release {failed} marked bad", stream="agent")
    if back_to is None:
        if current == failed:
            releases.remove_current()
        ctx.log(
            f"no earlier good release to go back to; {releases.current_link} removed",
            stream="agent",
        )
        why = "first release" if recorded is None else "no earlier good release is left"
        return RollbackReport(
            message=f"nothing to roll back to: {why} (release {failed} marked bad, "
            f"{releases.current_link.name} removed)",
            nothing_to_undo=True,
        )
    if back_to != recorded:
        ctx.log(
            f"the previous release {recorded or '(none recorded)'} is bad or gone; going back "
            f"to {back_to}, the newest good release before {failed}",
            stream="agent",
        )
    await asyncio.to_thread(releases.switch, back_to)
    ctx.log(f"current -> releases/{back_to}", stream="agent")
    await _start(ctx, request, releases, back_to, failed)
    return RollbackReport(message=f"back to release {back_to} (release {failed} marked bad)")


async def _start(
    ctx: DeployContext, request: Request, releases: Releases, name: str, failed: str
) -> None:
    """Start release ``name`` again: the ``start`` option, else the script it was installed
    with."""
    params = request.options
    release_dir = releases.path(name)
    if params.start is not None:
        script = find_script(release_dir, params.start)
    elif (entry := releases.entry(name)) is not None:
        recorded = entry.get("install_script")
        script = recorded if isinstance(recorded, str) else None
    else:  # made before the ledger knew it: look for the default install script
        script = find_script(release_dir, None)
    if script is None:
        ctx.log(f"release {name} has no install script: nothing to start", stream="agent")
        return
    timeout = min(params.timeout, max(ctx.remaining(), 1.0))
    result = await run_release_script(
        ctx,
        release_dir,
        script,
        action="rollback",
        target_dir=releases.target_dir,
        other_release=releases.path(failed),
        env={
            **request.params.env,
            "DEPLOY_ROLLBACK_OF": request.deploy_id,
            "DEPLOY_FAILURE_REASON": request.reason or "manual",
        },
        timeout=timeout,
    )
    why = failure(result, f"{script} of release {name}", timeout)
    if why is not None:
        raise ReleaseError(f"switched back to release {name}, but starting it failed: {why}")


async def discard_releases(ctx: DeployContext, request: Request) -> None:
    """After a success: remove releases beyond ``keep_releases`` (never the current one, the
    previous one or this deployment's)."""
    releases = _releases(ctx, request)
    protect = {request.deploy_id}
    for name in (releases.current(), (request.state or {}).get("previous")):
        if isinstance(name, str):
            protect.add(name)
    removed = await prune_bounded(releases, request.params, protect)
    if removed:
        ctx.log(f"removed old releases: {', '.join(removed)}", stream="agent")

"""The ``previous_container`` rollback strategy: put back the container a deployment replaced.

- ``prepare`` (before the deployment) records the container now running under the name: its
  id, whether it runs, and its whole spec pinned to its image id.
- ``rollback`` removes the new container, gives the old one its name back and starts it
  (wait until it runs); if the old one is gone (a manual rollback after ``discard``), it is
  created again from the recorded spec.  The core health-checks again afterwards.
- ``discard`` (after the new container passed every check) stops and removes the old one,
  and any older ``<name>.prev-*`` leftovers that no longer run.
"""

from __future__ import annotations

from typing import Any

from deploy_core.plugin import DeployContext, RollbackReport, RollbackRequest, RollbackState
from deploy_docker import secret_store
from deploy_docker.deploy import connect
from deploy_docker.engine import Engine
from deploy_docker.params import DockerParams, PreviousContainerParams
from deploy_docker.spec import NAME_LABEL, ContainerSpec, previous_name
from deploy_docker.startup import wait_started

Request = RollbackRequest[DockerParams, PreviousContainerParams]


async def prepare_previous(ctx: DeployContext, request: Request) -> RollbackState:
    """Record the container the deployment is about to replace (``previous`` is ``None``
    when there is none)."""
    deploy = request.params
    engine = await connect(deploy)
    try:
        old = await engine.container(deploy.container_name)
    finally:
        engine.close()
    state: RollbackState = {"container_name": deploy.container_name, "previous": None}
    if old is not None:
        # The spec goes to the server with the state; secret values stay on this host.
        secret_store.keep(ctx.data_dir, request.deploy_id, ContainerSpec.secret_values(old))
        state["previous"] = {
            "id": old["Id"],
            "kept_as": previous_name(deploy.container_name, request.deploy_id),
            "image": (old.get("Config") or {}).get("Image"),
            "image_id": old.get("Image"),
            "running": bool((old.get("State") or {}).get("Running")),
            "spec": ContainerSpec.from_inspect(old).model_dump(mode="json"),
        }
        ctx.log(
            f"previous container: {old['Id'][:12]} ({state['previous']['image']})", stream="agent"
        )
    return state


async def rollback_previous(ctx: DeployContext, request: Request) -> RollbackReport:
    """Remove the new container and bring the previous one back under its name.  With no
    container under the name before the deployment, there is nothing to roll back to: the
    new one is removed and the report says so."""
    deploy = request.params
    name = deploy.container_name
    previous = (request.state or {}).get("previous")
    engine = await connect(deploy)
    try:
        current = await engine.container(name)
        if current is not None and (previous is None or current["Id"] != previous["id"]):
            ctx.log(
                f"removing {name} ({current['Id'][:12]}) of the failed deployment", stream="agent"
            )
            await engine.remove(current["Id"], force=True)
        if previous is None:
            ctx.log(
                f"there was no {name} before the deployment: nothing to restore", stream="agent"
            )
            removed = " (the new one was removed)" if current is not None else ""
            return RollbackReport(
                message=f"nothing to roll back to: no previous container {name}{removed}",
                nothing_to_undo=True,
            )
        old_id = await _bring_back(ctx, engine, name, previous, request.deploy_id)
        if previous.get("running"):
            attrs = await engine.container(old_id)
            if not (attrs and (attrs.get("State") or {}).get("Running")):
                await engine.start(old_id)
            await wait_started(
                engine,
                old_id,
                timeout=min(deploy.start_timeout, max(ctx.remaining(), 1.0)),
                min_uptime=deploy.min_uptime,
            )
        ctx.log(f"{name} is the previous container again ({old_id[:12]})", stream="agent")
        return RollbackReport(
            message=f"{name} is the previous container again ({old_id[:12]}, "
            f"{previous.get('image')})"
        )
    finally:
        engine.close()


async def _bring_back(
    ctx: DeployContext, engine: Engine, name: str, previous: dict[str, Any], deploy_id: str
) -> str:
    """The previous container under ``name`` again (created anew if it is gone); its id."""
    old = await engine.container(previous["id"])
    if old is not None:
        if old["Name"].lstrip("/") != name:
            await engine.rename(old["Id"], name)
        return str(old["Id"])
    spec = ContainerSpec.model_validate(previous["spec"])
    ctx.log(
        f"the previous container {previous['id'][:12]} is gone; creating it again from "
        f"{previous.get('image')} ({spec.image[:19]})",
        stream="agent",
    )
    secrets = secret_store.recall(ctx.data_dir, deploy_id)
    missing = sorted(set(spec.secret_names) - set(secrets))
    if missing:
        ctx.log(
            f"its secret variables {', '.join(missing)} are no longer kept on this host; "
            "it is created without them",
            stream="agent",
        )
    return await engine.create(spec.with_secrets(secrets), name)


async def discard_previous(ctx: DeployContext, request: Request) -> None:
    """After success: stop and remove the previous container and stale leftovers."""
    deploy = request.params
    name = deploy.container_name
    previous = (request.state or {}).get("previous")
    engine = await connect(deploy)
    try:
        current = await engine.container(name)
        keep = {current["Id"]} if current is not None else set()
        doomed = []
        if previous is not None and previous["id"] not in keep:
            doomed.append(previous["id"])
        prefix = f"/{name}.prev-"
        for summary in await engine.containers(f"{NAME_LABEL}={name}"):
            names = summary.get("Names") or []
            stale = summary.get("State") != "running" and any(n.startswith(prefix) for n in names)
            if stale and summary["Id"] not in keep and summary["Id"] not in doomed:
                doomed.append(summary["Id"])
        for container_id in doomed:
            attrs = await engine.container(container_id)
            if attrs is None:
                continue
            if (attrs.get("State") or {}).get("Running"):
                await engine.stop(container_id, deploy.stop_timeout)
            await engine.remove(container_id, force=True)
            ctx.log(f"removed the previous container {attrs['Name'].lstrip('/')}", stream="agent")
    finally:
        engine.close()

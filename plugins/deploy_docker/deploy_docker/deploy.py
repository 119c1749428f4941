"""``deploy.docker``: pull the image, stop the old container, start the new one, and wait
until it runs (SPEC deploy-14, deploy-15).

The old container is never removed here when the deployment uses the ``previous_container``
rollback: it is stopped and renamed (or, with ``start_first``, renamed and left running),
and the strategy removes it once the new one has passed every health check, or puts it back
if not (:mod:`deploy_docker.rollback`).
"""

from __future__ import annotations

import time
from typing import Any

from deploy_core.plugin import DeployContext, DeployFailed, DeployStatus, Stage
from deploy_docker.engine import Engine, EngineError, EngineTimeout
from deploy_docker.params import DockerParams
from deploy_docker.progress import PullProgress
from deploy_docker.result import DeployDockerResult
from deploy_docker.spec import ContainerSpec, previous_name
from deploy_docker.startup import StartFailed, describe_state, wait_started

STRATEGY = "previous_container"
CONTAINER_HEALTH = "container_health"
STAGES = (
    Stage(DeployStatus.EXECUTING.value, 0, 5, "connecting to the Docker engine"),
    Stage(DeployStatus.PULLING.value, 5, 60, "pulling the image"),
    Stage(DeployStatus.STOPPING.value, 60, 70, "stopping the old container"),
    Stage(DeployStatus.STARTING.value, 70, 90, "starting the new container"),
)
# Pull progress is reported at most this often, or on every 5 % step.
REPORT_EVERY = 1.0
REPORT_STEP = 0.05


def keeps_previous(ctx: DeployContext) -> bool:
    """Whether this deployment's rollback is ``previous_container`` (which then owns the old
    container's fate)."""
    rollback = ctx.command.rollback
    return rollback is not None and rollback.get("strategy") == STRATEGY


def check_bind_sources(ctx: DeployContext, params: DockerParams) -> None:
    """Hold every bind-mount source (a host path; named volumes are the engine's) to the
    agent's constraints before the engine is asked for anything: under ``workdir_roots``,
    and with ``run_as`` a directory that user could itself read (``:ro``) or write.

    The engine runs as root and mounts what it is given; this keeps a deployment from
    handing a container the host's ``/etc`` on an agent whose scripts may not touch it.
    The engine resolves the path again when it creates the container.
    """
    for volume in params.volumes:
        if volume.source.startswith("/"):
            ctx.check_path(
                volume.source,
                f"bind-mount source of {volume.target}",
                access="read" if volume.read_only else "write",
            )


async def connect(params: DockerParams) -> Engine:
    """The engine, or :class:`DeployFailed` at once when it does not answer."""
    try:
        return await Engine.connect(timeout=params.api_timeout)
    except EngineError as exc:
        raise DeployFailed(str(exc)) from None


async def deploy_container(ctx: DeployContext, params: DockerParams) -> DeployDockerResult:
    """Run ``params.image`` as ``params.container_name``; fail with the engine's reason."""
    started = time.monotonic()
    result = DeployDockerResult(container_name=params.container_name, image=params.image)
    check_bind_sources(ctx, params)
    ctx.report(DeployStatus.EXECUTING, fraction=0.0, message="connecting to the Docker engine")
    engine = await connect(params)
    try:
        await _deploy(ctx, engine, params, result)
    except (EngineError, StartFailed) as exc:
        result.duration = round(time.monotonic() - started, 6)
        for line in getattr(exc, "logs", []):
            ctx.log(line, stream="container")
        status = DeployStatus.TIMEOUT if isinstance(exc, EngineTimeout) else DeployStatus.FAILED
        raise DeployFailed(str(exc), result=result, status=status) from None
    finally:
        engine.close()
    result.duration = round(time.monotonic() - started, 6)
    return result


async def _deploy(
    ctx: DeployContext, engine: Engine, params: DockerParams, result: DeployDockerResult
) -> None:
    ctx.report(
        DeployStatus.EXECUTING, fraction=1.0, message=f"connected to the engine at {engine.address}"
    )
    image = await pull_image(ctx, engine, params)
    result.image_id = image.get("Id")
    result.image_digest = image_digest(image, params.image)

    name = params.container_name
    spec = ContainerSpec.from_params(params, ctx.deploy_id, container_secrets(ctx, params))
    old = await engine.container(name)
    start_first = False
    if old is not None:
        result.previous_container_id = old["Id"]
        result.previous_image = (old.get("Config") or {}).get("Image")
        start_first = params.start_first and bool((old.get("State") or {}).get("Running"))
        clashes = spec.clashes_with(ContainerSpec.from_inspect(old)) if start_first else []
        if clashes:
            ctx.log(
                f"start_first: the old and the new container both publish {', '.join(clashes)}; "
                "stopping the old one first instead",
                stream="agent",
            )
            start_first = False
        await _set_old_aside(ctx, engine, params, old["Id"], start_first)

    ctx.report(DeployStatus.STARTING, fraction=0.0, message=f"creating {name} from {params.image}")
    container_id = await engine.create(spec, name)
    result.container_id = container_id
    await engine.start(container_id)
    ctx.report(DeployStatus.STARTING, fraction=1.0, message=f"started {name} ({container_id[:12]})")

    # The container's own health (running, not restarting, Docker's HEALTHCHECK); the core
    # runs the deployment's HTTP/TCP checks after this.
    def on_change(state: str) -> None:
        ctx.report(
            DeployStatus.HEALTH_CHECK,
            fraction=0.0,
            stage=CONTAINER_HEALTH,
            message=f"{name}: {state}",
        )

    attrs = await wait_started(
        engine,
        container_id,
        timeout=min(params.start_timeout, max(ctx.remaining(), 1.0)),
        min_uptime=params.min_uptime,
        on_change=on_change,
    )
    ctx.report(
        DeployStatus.HEALTH_CHECK,
        fraction=0.0,
        stage=CONTAINER_HEALTH,
        message=f"{name} is up: {describe_state(attrs)}",
    )

    if old is not None and not keeps_previous(ctx):
        # No previous_container rollback: nothing will ever put the old one back.
        if start_first:
            await engine.stop(old["Id"], params.stop_timeout)
        await engine.remove(old["Id"], force=True)
        ctx.log(f"removed the old container {old['Id'][:12]}", stream="agent")


async def _set_old_aside(
    ctx: DeployContext, engine: Engine, params: DockerParams, old_id: str, start_first: bool
) -> None:
    """Free the name (and, unless ``start_first``, the ports) for the new container."""
    kept_as = previous_name(params.container_name, ctx.deploy_id)
    if start_first:
        ctx.report(
            DeployStatus.STOPPING,
            fraction=0.0,
            message=f"start_first: the old container keeps running as {kept_as} "
            "until the new one is healthy",
        )
        await engine.rename(old_id, kept_as)
        return
    ctx.report(
        DeployStatus.STOPPING,
        fraction=0.0,
        message=f"stopping the old container {old_id[:12]} (grace {params.stop_timeout}s)",
    )
    await engine.stop(old_id, params.stop_timeout)
    await engine.rename(old_id, kept_as)
    ctx.report(
        DeployStatus.STOPPING, fraction=1.0, message=f"old container stopped, kept as {kept_as}"
    )


async def pull_image(ctx: DeployContext, engine: Engine, params: DockerParams) -> dict[str, Any]:
    """Pull as ``pull_policy`` says, reporting layer progress; the image's inspect data."""
    ref = params.image
    present = await engine.image(ref) if params.pull_policy != "always" else None
    if present is not None:
        ctx.report(DeployStatus.PULLING, fraction=1.0, message=f"{ref} is present; not pulled")
        return present
    if params.pull_policy == "never":
        raise EngineError(f"image {ref} is not on this host and pull_policy is 'never'")
    progress = PullProgress(ref)
    last = {"at": 0.0, "fraction": -1.0}

    def on_event(event: dict[str, Any]) -> None:
        progress.update(event)
        if not progress.layers:
            return  # "Pulling from …", or an image that is up to date: no layer to report
        now = time.monotonic()
        fraction = progress.fraction
        if fraction - last["fraction"] >= REPORT_STEP or (
            now - last["at"] >= REPORT_EVERY and fraction > last["fraction"]
        ):
            last.update(at=now, fraction=fraction)
            ctx.report(DeployStatus.PULLING, fraction=fraction, message=progress.message())

    ctx.report(DeployStatus.PULLING, fraction=0.0, message=f"pulling {ref}")
    await engine.pull(
        ref,
        timeout=min(params.pull_timeout, max(ctx.remaining(), 1.0)),
        auth=registry_auth(ctx, params),
        on_event=on_event,
    )
    image = await engine.image(ref)
    if image is None:
        raise EngineError(f"pulled {ref}, but the engine does not list it afterwards")
    ctx.report(
        DeployStatus.PULLING,
        fraction=1.0,
        message=f"pulled {ref}: {progress.status or 'done'}",
    )
    return image


def container_secrets(ctx: DeployContext, params: DockerParams) -> dict[str, str]:
    """The request's secret variables that go into the container's environment: all but
    the one holding the registry password."""
    auth = params.registry_auth
    skip = auth.password_secret if auth is not None else None
    return {k: v for k, v in ctx.secret_env.items() if k != skip}


def registry_auth(ctx: DeployContext, params: DockerParams) -> dict[str, str] | None:
    """The engine's ``auth_config`` for the pull, or ``None`` (the engine's own login)."""
    auth = params.registry_auth
    if auth is None:
        return None
    password = auth.password
    if auth.password_secret is not None:
        password = ctx.secret_env.get(auth.password_secret)
        if password is None:
            raise EngineError(
                f"registry_auth.password_secret names {auth.password_secret}, which the "
                "request's secret_env does not have"
            )
    config = {"username": auth.username, "password": password or ""}
    if auth.server:
        config["serveraddress"] = auth.server
    return config


def image_digest(image: dict[str, Any], ref: str) -> str | None:
    """The registry digest (``sha256:…``) the image was pulled by, for the repo in ``ref``."""
    if "@" in ref:
        return ref.split("@", 1)[1]
    repo = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    digests = image.get("RepoDigests") or []
    for entry in digests:
        if entry.split("@", 1)[0] == repo:
            return str(entry.split("@", 1)[1])
    return str(digests[0].split("@", 1)[1]) if digests else None

"""The plugin object Deploy Center loads through the ``deploy_core`` entry-point group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deploy_core.plugin import (
    DeployContext,
    DeployType,
    RollbackReport,
    RollbackRequest,
    RollbackState,
    RollbackStrategy,
    ServerServices,
    hookimpl,
)
from deploy_tar.params import ReleaseParams, TarParams
from deploy_tar.result import DeployTarResult
from deploy_tar.stages import STAGES, STRATEGY
from deploy_tar.url_source import check_url, policy_from_config

PLUGIN = "deploy_tar"  # the [plugins.NAME] table of its settings, on the server and agents


async def package_is_stored(services: ServerServices, params: TarParams) -> None:
    """Refuse at once (404) a deployment of a package the server's store does not hold;
    (422) a URL source the server's ``[plugins.deploy_tar]`` does not allow. The server
    never fetches the URL itself: the agent does."""
    if params.source is not None:
        try:
            policy = policy_from_config(
                services.plugin_config(PLUGIN), "[plugins.deploy_tar] of the server's config"
            )
        except ValueError as exc:
            raise ValueError(f"the server is misconfigured: {exc}") from None
        check_url(params.source.url, policy)  # UrlRefused is a ValueError: 422
        return
    if not await services.artifact_exists(params.sha256):
        raise LookupError(
            f"no artifact {params.artifact} on this server; upload the package first "
            "(deployctl artifact push FILE, or deployctl deploy tar --package FILE)"
        )


Request = RollbackRequest[TarParams, ReleaseParams]

# The deployment and rollback code (deploy_tar.deploy, .rollback, and with them .extract,
# .releases, tarfile, gzip, ...) is imported when an agent first runs one, not when it loads
# the plugin: an idle agent does not hold it (issue 12 item 6).


async def deploy_release(ctx: DeployContext, params: TarParams) -> DeployTarResult:
    """:func:`deploy_tar.deploy.deploy_release`."""
    from deploy_tar.deploy import deploy_release as run

    return await run(ctx, params)


async def prepare_release(ctx: DeployContext, request: Request) -> RollbackState:
    """:func:`deploy_tar.rollback.prepare_release`."""
    from deploy_tar.rollback import prepare_release as run

    return await run(ctx, request)


async def rollback_release(ctx: DeployContext, request: Request) -> RollbackReport:
    """:func:`deploy_tar.rollback.rollback_release`."""
    from deploy_tar.rollback import rollback_release as run

    return await run(ctx, request)


async def discard_releases(ctx: DeployContext, request: Request) -> None:
    """:func:`deploy_tar.rollback.discard_releases`."""
    from deploy_tar.rollback import discard_releases as run

    await run(ctx, request)


DEPLOY_TYPE = DeployType(
    name="deploy.tar",
    params=TarParams,
    executor=deploy_release,
    stages=STAGES,
    default_rollback=STRATEGY,
    description="install a tar.gz package as a new release and switch current to it",
    server_check=package_is_stored,
    target=lambda params: params.target_dir,
    artifacts=lambda params: [params.artifact] if params.artifact is not None else [],
    result=DeployTarResult,
)

RELEASE = RollbackStrategy(
    name=STRATEGY,
    params=ReleaseParams,
    rollback=rollback_release,
    prepare=prepare_release,
    discard=discard_releases,
    needs_state=True,
    description="switch current back to the previous release and start it again",
)


@hookimpl
def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
    """Register ``deploy.tar``."""
    register(DEPLOY_TYPE)


@hookimpl
def deploy_register_rollback_strategies(register: Callable[[RollbackStrategy], None]) -> None:
    """Register ``release``."""
    register(RELEASE)


@hookimpl
def deploy_register_cli_commands(register: Callable[..., Any]) -> None:
    """Register ``deployctl deploy tar`` (imported here: an agent never calls this hook)."""
    from deploy_tar.cli import deploy_tar

    register(deploy_tar, group="deploy")

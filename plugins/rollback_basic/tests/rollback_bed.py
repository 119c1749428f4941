"""The requests the agent hands this plugin's strategies, for tests that call ``prepare``,
``rollback`` and ``discard`` directly (as ``docker_bed`` does for Docker's)."""

from __future__ import annotations

import weakref
from typing import Any

from deploy_core.plugin import DeployContext, DeployParams, RollbackParams, RollbackRequest
from deploy_core.testing import rollback_request
from pydantic import ConfigDict

# Why each context's deployment failed, as the agent says it (``failed`` fixture).
REASONS: weakref.WeakKeyDictionary[DeployContext, str] = weakref.WeakKeyDictionary()


class AnyDeploy(DeployParams):
    """The parameters of whatever deploy type a test makes up (``deploy.shell``-like with
    ``script``, ``workdir`` and ``env``, or another): this plugin may not import the deploy
    types' own models, and the strategies must work with any."""

    model_config = ConfigDict(extra="allow")


def undo(
    ctx: DeployContext, options: RollbackParams, state: dict[str, Any] | None = None
) -> RollbackRequest[AnyDeploy, Any]:
    """The request for the deployment of ``ctx`` (or the one a ``deploy.rollback`` context
    undoes), with the failure reason the ``failed`` fixture recorded for ``ctx``."""
    return rollback_request(ctx, AnyDeploy, options, state, reason=REASONS.get(ctx))

"""Targets: what each deployment changes on its host, and which deployment is live there.

A deploy type names its target from its parameters (``DeployType.target``: a directory, a
container name); the key is prefixed with the type's name, and a type that names none has
one target per client.  A rollback deployment carries the target of the deployment it undoes.

The live deployment of a target is its newest finished deployment whose changes are still in
place: it succeeded (or failed without undoing itself) and nothing rolled it back.  A
rollback of anything older would undo it silently, so :mod:`deploy_core.server.rollbacks`
refuses that unless asked to roll back the newer ones first (``cascade``).

:class:`TargetRecords` is part of :class:`~deploy_core.server.records.RecordStore`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from deploy_core.models import COMMAND_ROLLBACK

if TYPE_CHECKING:
    from deploy_core.plugins import DeployPlugins


def deployment_scope(
    plugins: DeployPlugins, command_type: str, request: dict[str, Any]
) -> tuple[str, list[str]]:
    """The target key and the artifact SHA-256s of a deployment about to be recorded.

    A rollback has its original's target and fetches nothing.  Parameters that no longer
    validate (a plugin changed its model) give the type's own target and no artifacts.
    """
    if command_type == COMMAND_ROLLBACK:
        original = request.get("rollback_of") or {}
        target, _ = deployment_scope(
            plugins, str(original.get("command_type", "")), {"params": original.get("params")}
        )
        return target, []
    deploy_type = plugins.deploy_types.get(command_type)
    if deploy_type is None:
        return command_type, []
    try:
        params = deploy_type.params.model_validate(request.get("params") or {})
    except ValidationError:
        return deploy_type.name, []
    return deploy_type.target_key(params), deploy_type.artifact_ids(params)

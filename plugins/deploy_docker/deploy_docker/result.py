"""What a ``deploy.docker`` deployment returns, registered as the deploy type's ``result``."""

from __future__ import annotations

from deploy_core.plugin import WireModel


class DeployDockerResult(WireModel):
    """What an operator needs to know about a Docker deployment (SPEC deploy-05)."""

    container_id: str | None = None
    container_name: str | None = None
    image: str | None = None
    image_id: str | None = None
    image_digest: str | None = None
    previous_container_id: str | None = None
    previous_image: str | None = None
    duration: float = 0.0

"""What a ``deploy.tar`` deployment returns, registered as the deploy type's ``result``."""

from __future__ import annotations

from deploy_core.plugin import WireModel


class DeployTarResult(WireModel):
    """What an operator needs to know about a tar.gz deployment (SPEC deploy-05)."""

    release_dir: str | None = None
    previous_release: str | None = None
    sha256: str | None = None
    url: str | None = None  # a URL source's, without its query string
    bytes_sent: int = 0
    bytes_resumed: int = 0
    install_exit_code: int | None = None
    install_output_tail: str = ""
    duration: float = 0.0

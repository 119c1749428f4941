"""What ``deploy.tar`` registers besides its code: its stages and its rollback strategy's name,
apart from :mod:`deploy_tar.deploy` so that registering the deploy type imports no extraction
code (issue 12 item 6).
"""

from __future__ import annotations

from deploy_core.plugin import DeployStatus, Stage

__all__ = ["STAGES", "STRATEGY"]

STRATEGY = "release"
STAGES = (
    Stage(DeployStatus.EXECUTING.value, 0, 0, "preparing"),
    Stage(DeployStatus.UPLOADING.value, 0, 30, "fetching the package"),
    Stage(DeployStatus.EXTRACTING.value, 30, 60, "extracting the package"),
    Stage(DeployStatus.INSTALLING.value, 60, 90, "installing the release"),
)

"""The log budget travels with a command only to agents that announce they know it: an
older agent's strict DeployCommand would refuse the whole command for an unknown field."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy_core.models import CAPABILITY_LOG_BUDGET, DeployCommand
from deploy_core.plugins import load_plugins
from deploy_core.testing import in_process_center


class OldDeployCommand(DeployCommand):
    """DeployCommand as an agent before the log budget parsed it (no such field)."""

    model_config = {**DeployCommand.model_config, "extra": "forbid"}


OldDeployCommand.model_fields.pop("log_budget_bytes")
OldDeployCommand.model_rebuild(force=True)


async def test_the_budget_goes_only_to_agents_that_announce_it(tmp_path: Path) -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        assert center.agent.capabilities()[CAPABILITY_LOG_BUDGET] is True
        answer = await center.http.post(
            "/api/deploy/shell", json={"client_id": "web-1", "script": "echo hi"}
        )
        deploy_id = answer.json()["deploy_id"]
        end = time.monotonic() + 30
        record = None
        while time.monotonic() < end and (record is None or record.finished_at is None):
            record = await center.server.db(center.server.records.get, deploy_id)
            await asyncio.sleep(0.05)
        assert record is not None and record.status == "success"
        session = center.server.transport.session("web-1")
        assert session is not None
        new = await center.server.dispatcher.command_for(record, session.capabilities)
        assert new.payload["log_budget_bytes"] == center.server.config.max_log_bytes
        with pytest.raises(ValidationError, match="log_budget_bytes"):
            OldDeployCommand.model_validate(new.payload)  # why the field must stay away
        old = await center.server.dispatcher.command_for(record, {"agent_version": "0.1.0"})
        assert "log_budget_bytes" not in old.payload
        OldDeployCommand.model_validate(old.payload)  # an older agent takes it
        assert DeployCommand.model_validate(old.payload).log_budget_bytes is None

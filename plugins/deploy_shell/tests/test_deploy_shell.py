"""deploy.shell on its own: the executor on real subprocesses, its parameters, its
registration, and one deployment through a real server and agent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.models import DeployStatus
from deploy_core.plugins import load_plugins
from deploy_core.testing import DeployCenter, RecordingReporter
from deploy_shell.plugin import STAGES, ShellParams, run_shell

Factory = Callable[..., tuple[DeployContext, RecordingReporter]]


async def test_runs_the_script_in_its_workdir_with_its_env(
    deploy_context: Factory, tmp_path: Path
) -> None:
    ctx, reporter = deploy_context(stages=STAGES)
    params = ShellParams(
        script="echo $GREETING; pwd", workdir=str(tmp_path), env={"GREETING": "hi"}
    )
    result = await run_shell(ctx, params)
    assert result.exit_code == 0
    assert result.stdout_tail.split() == ["hi", str(tmp_path)]
    assert reporter.statuses == ["script_running", "script_running"]
    assert [r[1] for r in reporter.reports] == [10, 90]
    assert reporter.lines("stdout") == ["hi", str(tmp_path)]


async def test_shebang_picks_the_interpreter(deploy_context: Factory) -> None:
    ctx, _ = deploy_context()
    result = await run_shell(ctx, ShellParams(script="#!/usr/bin/env python3\nprint(6 * 7)\n"))
    assert result.stdout_tail.strip() == "42"


async def test_failure_carries_exit_code_and_stderr(deploy_context: Factory) -> None:
    ctx, _ = deploy_context()
    with pytest.raises(DeployFailed) as err:
        await run_shell(ctx, ShellParams(script="echo nope >&2; exit 7"))
    assert err.value.status is DeployStatus.FAILED
    assert "code 7" in str(err.value) and "nope" in str(err.value)
    assert err.value.result is not None
    assert err.value.result.model_dump()["exit_code"] == 7


async def test_timeout_is_reported_as_timeout(deploy_context: Factory) -> None:
    ctx, _ = deploy_context()
    with pytest.raises(DeployFailed) as err:
        await run_shell(ctx, ShellParams(script="sleep 30", timeout=0.5))
    assert err.value.status is DeployStatus.TIMEOUT
    assert err.value.result is not None and err.value.result.model_dump()["timed_out"]


async def test_missing_workdir_fails_before_running(
    deploy_context: Factory, tmp_path: Path
) -> None:
    ctx, reporter = deploy_context()
    with pytest.raises(DeployFailed, match="does not exist"):
        await run_shell(ctx, ShellParams(script="true", workdir=str(tmp_path / "nope")))
    assert reporter.reports == []


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"script": ""}, "script"),
        ({"script": "x" * (100 * 1024 + 1)}, "script"),
        ({"script": "a\x00b"}, "script"),
        ({"script": "true", "workdir": "tmp"}, "workdir"),
        ({"script": "true", "env": {"1X": "y"}}, "env"),
        ({"script": "true", "timeout": 0}, "timeout"),
        ({"script": "true", "nope": 1}, "nope"),
    ],
)
def test_bad_parameters_name_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as err:
        ShellParams.model_validate(fields)
    assert where in str(err.value)


def test_registered_through_the_entry_point() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    assert plugins.deploy_types.names() == ["deploy.shell"]
    assert plugins.deploy_types.owners["deploy.shell"] == "deploy_shell"


def test_deploys_through_a_real_server_and_agent(deploy_center: DeployCenter) -> None:
    deploy_center.start_agent("solo")
    deploy_id = deploy_center.deploy("shell", "solo", script="echo it works")
    record = deploy_center.wait(deploy_id, timeout=30)
    assert record["status"] == "success"
    assert record["result"]["stdout_tail"].strip() == "it works"


def test_env_names_with_a_trailing_newline_are_refused() -> None:
    with pytest.raises(ValidationError, match="env"):
        ShellParams.model_validate({"script": "true", "env": {"NAME\n": "x"}})

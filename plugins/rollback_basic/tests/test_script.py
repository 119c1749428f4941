"""The ``script`` strategy runs a separate rollback script."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from rollback_bed import undo

from rollback_basic.errors import RollbackError
from rollback_basic.script import SCRIPT, ScriptParams


async def test_script_runs_in_workdir_with_env_and_rollback_variables(
    tmp_path, deployment, failed, read_env
):
    ctx, _ = deployment("d-4", params={"script": "exit 1"})
    failed(ctx, "script exited with code 1", {"strategy": "script"})
    params = ScriptParams.model_validate(
        {
            "strategy": "script",
            "script": "env > out.txt",
            "workdir": str(tmp_path),
            "env": {"RELEASE": "41"},
        }
    )

    await SCRIPT.rollback(ctx, undo(ctx, params, None))

    env = read_env(tmp_path / "out.txt")
    assert env["RELEASE"] == "41"
    assert env["DEPLOY_ACTION"] == "rollback"
    assert env["DEPLOY_ROLLBACK_OF"] == "d-4"
    assert env["DEPLOY_FAILURE_REASON"] == "script exited with code 1"


async def test_failing_script_raises_with_its_exit_code(deployment, failed):
    ctx, reporter = deployment("d-5", params={"script": "exit 1"})
    failed(ctx, "script exited with code 1", {"strategy": "script"})
    params = ScriptParams(strategy="script", script="echo restarting\necho 'port busy' >&2\nexit 7")

    with pytest.raises(RollbackError, match=r"exited with code 7: port busy"):
        await SCRIPT.rollback(ctx, undo(ctx, params, None))
    assert "restarting" in reporter.lines("rollback:stdout")


async def test_script_that_hangs_is_killed_at_its_timeout(deployment, failed):
    ctx, _ = deployment("d-6")
    failed(ctx, "script exited with code 1", {"strategy": "script"})
    params = ScriptParams(strategy="script", script="sleep 30", timeout=0.3)

    with pytest.raises(RollbackError, match=r"timed out after 0.3 s"):
        await SCRIPT.rollback(ctx, undo(ctx, params, None))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"script": "  "}, "the script is empty"),
        ({"script": "#" * (100 * 1024 + 1)}, "at most 102400 are allowed"),
        ({"script": "true", "workdir": "relative/dir"}, "not an absolute path"),
        ({"script": "true", "env": {"BAD-NAME": "1"}}, "invalid environment variable names"),
        ({"script": "true", "strategy": "inline"}, "literal_error"),
        ({"script": "true", "unknown": 1}, "extra_forbidden"),
    ],
)
def test_script_params_refuse_bad_input(fields, error):
    with pytest.raises(ValidationError) as caught:
        ScriptParams.model_validate({"strategy": "script", **fields})
    assert error in str(caught.value) or error in {e["type"] for e in caught.value.errors()}

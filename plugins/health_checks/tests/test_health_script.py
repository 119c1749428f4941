"""The ``script`` check: real scripts run by the core's ``DeployContext.run_script``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deploy_core.models import HealthCheckResult
from deploy_core.testing import RecordingReporter

RunCheck = Callable[[dict[str, Any]], Awaitable[HealthCheckResult]]


def script(text: str, **options: Any) -> dict[str, Any]:
    """A ``script`` check spec as it appears in a deploy request, fast retries by default."""
    return {"type": "script", "script": text, "retries": 0, "interval": 0.05, **options}


async def test_exit_0_is_healthy(run_check: RunCheck, reporter: RecordingReporter) -> None:
    result = await run_check(script("echo checking\nexit 0\n", retries=2))

    assert result.success is True
    assert result.check_type == "script"
    assert (result.attempts, result.retry_count, result.error) == (1, 0, None)
    assert "checking" in reporter.lines("stdout")


async def test_nonzero_exit_reports_the_code_and_the_last_stderr_line(
    run_check: RunCheck,
) -> None:
    text = "echo 'connecting to db'\necho 'warming up' >&2\necho 'db not ready' >&2\nexit 1\n"

    result = await run_check(script(text, retries=1))

    assert result.success is False
    assert (result.attempts, result.retry_count) == (2, 1)
    assert result.error == "exit code 1: db not ready"


async def test_without_stderr_the_last_stdout_line_is_reported(run_check: RunCheck) -> None:
    result = await run_check(script("echo 'queue depth 9000'\necho\nexit 3\n"))

    assert result.error == "exit code 3: queue depth 9000"


async def test_a_long_last_line_is_cut_to_200_characters(run_check: RunCheck) -> None:
    result = await run_check(script("printf '%0500d\\n' 7 >&2\nexit 2\n"))

    assert result.error is not None
    said = result.error.removeprefix("exit code 2: ")
    assert len(said) == 200
    assert said.endswith("…")


async def test_script_turning_healthy_on_the_second_attempt_succeeds_with_one_retry(
    run_check: RunCheck, tmp_path: Path
) -> None:
    # The counter file is found through workdir, so this also shows workdir is honoured.
    text = 'n=$(cat count 2>/dev/null || echo 0)\nn=$((n + 1))\necho "$n" > count\n[ "$n" -ge 2 ]\n'

    result = await run_check(script(text, workdir=str(tmp_path), retries=3))

    assert result.success is True, result.error
    assert (result.attempts, result.retry_count) == (2, 1)
    assert (tmp_path / "count").read_text().strip() == "2"


async def test_env_reaches_the_script(run_check: RunCheck) -> None:
    text = '[ "$GREETING" = "hello world" ] || { echo "GREETING=$GREETING" >&2; exit 1; }\n'

    result = await run_check(script(text, env={"GREETING": "hello world"}))

    assert result.success is True, result.error


async def test_a_script_hanging_past_attempt_timeout_is_killed(
    run_check: RunCheck, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()

    result = await run_check(
        script(f"echo $$ > {pid_file}\nexec sleep 30\n", attempt_timeout=0.3, retries=1)
    )

    assert result.success is False
    assert result.attempts == 2
    assert result.error is not None and "timed out after 0.3s" in result.error
    assert time.monotonic() - started < 5
    pid = int(pid_file.read_text())
    for _ in range(40):  # the kill is immediate; waiting is only for the process table
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"health script {pid} still runs after its attempt timed out")


async def test_missing_workdir_fails_without_running_anything(
    run_check: RunCheck, tmp_path: Path
) -> None:
    missing = tmp_path / "gone"

    result = await run_check(script("exit 0\n", workdir=str(missing), retries=1))

    assert result.attempts == 2
    assert result.error == f"working directory {missing} does not exist or is not a directory"


async def test_a_bad_interpreter_line_is_reported(run_check: RunCheck) -> None:
    result = await run_check(script("#!/nonexistent/interpreter\nexit 0\n"))

    assert result.success is False
    assert result.error is not None
    assert result.error.startswith("cannot start the health script: ")
    assert result.error.endswith("; check its #! line")

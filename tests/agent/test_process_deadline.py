"""A step stopped by the deployment's deadline says so, not its own longer timeout (issue 10
§1, "deadline honesty"); one stopped by its own timeout names that."""

from __future__ import annotations

import asyncio
from pathlib import Path

from deploy_core.agent.health import run_check
from deploy_core.registry import HealthCheckParams, HealthCheckType
from deploy_core.testing import make_context


async def test_the_deadline_that_fired_is_named_not_the_longer_step_timeout(
    tmp_path: Path,
) -> None:
    ctx, _reporter = make_context(tmp_path, timeout=2.0)
    result = await ctx.run_script("sleep 30", timeout=30)
    assert result.timed_out
    assert result.step_timeout == 30 and result.timeout < 30
    text = result.timeout_text()
    assert text.startswith("was stopped at the deployment's deadline, after ")
    assert text.endswith("(its own timeout is 30 s)")
    assert "timed out after 30" not in text


async def test_a_step_stopped_by_its_own_timeout_says_that(tmp_path: Path) -> None:
    ctx, _reporter = make_context(tmp_path, timeout=120.0)
    result = await ctx.run_script("sleep 30", timeout=0.5)
    assert result.timed_out
    assert result.timeout_text() == "timed out after 0.5 s"


async def test_a_health_attempt_cut_by_the_overall_timeout_names_it(tmp_path: Path) -> None:
    async def hang(params: object, ctx: object) -> str | None:
        await asyncio.sleep(60)
        return None

    check = HealthCheckType(name="hang", params=HealthCheckParams, probe=hang)
    ctx, _reporter = make_context(tmp_path)
    params = HealthCheckParams(type="hang", retries=0, timeout=0.3, attempt_timeout=30)
    result = await run_check(ctx, check, params)
    assert result.error is not None
    assert result.error.startswith("attempt stopped at the overall timeout of 0.3s")
    assert "attempt timed out after 30" not in result.error

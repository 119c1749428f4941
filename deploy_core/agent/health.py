"""The one retry loop every health check runs in (SPEC deploy-16).

A check plugin provides a single-attempt probe; this module owns ``initial_delay``,
``retries``, ``interval``, the per-attempt timeout and the overall timeout, and turns the
outcome into a :class:`~deploy_core.models.HealthCheckResult`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from deploy_core.agent.context import DeployContext
from deploy_core.models import HealthCheckResult
from deploy_core.plugins import DeployPlugins
from deploy_core.registry import HealthCheckParams, HealthCheckType


async def run_check(
    ctx: DeployContext, check: HealthCheckType, params: HealthCheckParams
) -> HealthCheckResult:
    """Run one check to its verdict: success on the first healthy attempt, failure when the
    retries or the overall timeout run out."""
    started = time.monotonic()
    overall_end = started + params.timeout
    if params.initial_delay:
        await asyncio.sleep(min(params.initial_delay, params.timeout))
    attempts = 0
    error: str | None = "no attempt made within the timeout"
    response_time = 0.0
    while True:
        left = overall_end - time.monotonic()
        if left <= 0:
            error = f"overall timeout of {params.timeout:g}s reached; last error: {error}"
            break
        attempts += 1
        attempt_started = time.monotonic()
        try:
            error = await asyncio.wait_for(
                check.probe(params, ctx), min(params.attempt_timeout, left)
            )
        except TimeoutError:  # say which limit fired: the attempt's, or the check's overall
            error = (
                f"attempt timed out after {params.attempt_timeout:g}s"
                if params.attempt_timeout <= left
                else f"attempt stopped at the overall timeout of {params.timeout:g}s "
                f"(after {left:.3g}s; the attempt timeout is {params.attempt_timeout:g}s)"
            )
        except Exception as exc:  # a probe bug is a failed check, not a crashed agent
            error = f"{type(exc).__name__}: {exc}"
        response_time = time.monotonic() - attempt_started
        if error is None:
            break
        ctx.log(f"health check {check.name} attempt {attempts} failed: {error}", stream="health")
        if attempts > params.retries:
            break
        await asyncio.sleep(max(0.0, min(params.interval, overall_end - time.monotonic())))
    return HealthCheckResult(
        success=error is None,
        check_type=check.name,
        response_time=round(response_time, 6),
        retry_count=max(0, attempts - 1),
        attempts=attempts,
        error=error,
    )


async def run_health_checks(
    ctx: DeployContext, plugins: DeployPlugins, specs: Sequence[dict[str, Any]]
) -> list[HealthCheckResult]:
    """Run every configured check in order; all must pass.  A spec that cannot be parsed
    (the agent lacks the plugin) is a failed check with the reason."""
    results = []
    for spec in specs:
        try:
            check, params = plugins.parse_health_check(spec)
        except (LookupError, ValidationError) as exc:
            results.append(
                HealthCheckResult(
                    success=False,
                    check_type=str(spec.get("type", "?")),
                    attempts=0,
                    error=str(exc),
                )
            )
            continue
        results.append(await run_check(ctx, check, params))
    return results

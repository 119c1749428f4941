"""The ``tcp`` check against a real listening socket and a closed port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from deploy_core.models import HealthCheckResult

RunCheck = Callable[[dict[str, Any]], Awaitable[HealthCheckResult]]


def tcp(port: int, **options: Any) -> dict[str, Any]:
    """A ``tcp`` check spec as it appears in a deploy request, fast retries by default."""
    return {"type": "tcp", "port": port, "retries": 0, "interval": 0.05, **options}


async def test_listening_port_is_healthy(run_check: RunCheck, listening_port: int) -> None:
    result = await run_check(tcp(listening_port, retries=3))

    assert result.success is True
    assert result.check_type == "tcp"
    assert (result.attempts, result.retry_count, result.error) == (1, 0, None)


async def test_localhost_by_name_is_healthy(run_check: RunCheck, listening_port: int) -> None:
    # "localhost" may resolve to ::1 first, where nothing listens: the next address is tried.
    result = await run_check(tcp(listening_port, host="localhost"))

    assert result.success is True, result.error


async def test_closed_port_fails_after_every_retry(run_check: RunCheck, closed_port: int) -> None:
    result = await run_check(tcp(closed_port, retries=2))

    assert result.success is False
    assert (result.attempts, result.retry_count) == (3, 2)
    assert result.error == f"connection refused to 127.0.0.1:{closed_port}"


async def test_closed_port_on_localhost_reads_as_refused(
    run_check: RunCheck, closed_port: int
) -> None:
    result = await run_check(tcp(closed_port, host="localhost"))

    assert result.error == f"connection refused to localhost:{closed_port}"

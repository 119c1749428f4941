"""Waiting for a condition in async tests, bounded: one helper instead of a copy per file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: The longest any condition is waited for by default (a slow, shared machine).
WAIT = 60.0


async def eventually(
    check: Callable[[], Awaitable[Any]], what: str, *, timeout: float = WAIT, every: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something true and return that; fail the test with
    "timed out waiting for ``what``" after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := await check():
            return result
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")

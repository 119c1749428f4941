"""Helpers the monitor tests share (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import pytest

from deploy_core.testing_docker import no_registry_reason, registry_address

# The test bed's own registry (scripts/docker-testbed.sh records where it is).
REGISTRY = registry_address()
IMAGE = f"{REGISTRY}/web:v1"
T = TypeVar("T")

RunContainer = Callable[..., Any]
"""``run_container(managed=True, **kwargs)`` (the fixture): a running test container."""


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


def engine_problem() -> str | None:
    """Why no container of the test bed's image can be run here, or ``None``."""
    if REGISTRY is None:
        return no_registry_reason()
    try:
        client = docker.from_env(timeout=10)
    except Exception as exc:
        return f"no Docker engine ({exc}); run `bash scripts/docker-testbed.sh`"
    try:
        client.images.pull(IMAGE)
    except Exception as exc:
        return f"cannot pull {IMAGE} ({exc}); run `bash scripts/docker-testbed.sh`"
    finally:
        client.close()
    return None


def eventually(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after
    ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not seen within {timeout:g}s")
        time.sleep(0.1)

"""Helpers the Docker tests share (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import docker
import pytest

from deploy_core.agent.context import DeployContext
from deploy_core.plugin import RollbackRequest
from deploy_core.testing import RecordingReporter, rollback_request
from deploy_core.testing_docker import no_registry_reason, registry_address
from deploy_docker.params import DockerParams, PreviousContainerParams
from deploy_docker.spec import NAME_LABEL

# The test bed's own registry (scripts/docker-testbed.sh records where it is).
REGISTRY = registry_address()
IMAGE = f"{REGISTRY}/web"
TESTBED_TAGS = ("v1", "v2", "healthcheck", "unhealthy", "crash")

Factory = Callable[..., tuple[DeployContext, RecordingReporter]]


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


def testbed_problem() -> str | None:
    """Why the engine or the test bed's images cannot be used, or ``None``."""
    try:
        api = docker.APIClient(version="auto", timeout=5, **docker.utils.kwargs_from_env())
        api.ping()
        api.close()
    except Exception as exc:
        return f"no Docker engine ({exc}); run `bash scripts/docker-testbed.sh`"
    if REGISTRY is None:
        return no_registry_reason()
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/web/tags/list", timeout=5) as answer:
            tags = answer.read().decode()
    except Exception as exc:
        return f"no test registry at {REGISTRY} ({exc}); run `bash scripts/docker-testbed.sh`"
    missing = [t for t in TESTBED_TAGS if f'"{t}"' not in tags]
    if missing:
        return (
            f"test images {missing} missing from {REGISTRY}; run `bash scripts/docker-testbed.sh`"
        )
    return None


def web(name: str, tag: str, port: int, **extra: object) -> dict[str, object]:
    """Parameters for one of the test bed's web images, published on 127.0.0.1:``port``."""
    return {
        "image": f"{IMAGE}:{tag}",
        "container_name": name,
        "ports": [f"127.0.0.1:{port}:8080"],
        "min_uptime": 0.5,
        "start_timeout": 20,
        "stop_timeout": 5,
        **extra,
    }


def managed(client: docker.DockerClient, name: str) -> list[Any]:
    """Containers the plugin created for logical name ``name``."""
    return list(client.containers.list(all=True, filters={"label": f"{NAME_LABEL}={name}"}))


def http_get(port: int, path: str = "/", timeout: float = 10.0) -> str:
    """The body of GET 127.0.0.1:port/path, retried until ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
                return str(answer.read().decode())
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def aim_rollback(
    ctx: DeployContext, state: dict[str, Any] | None = None, reason: str | None = None
) -> RollbackRequest[DockerParams, PreviousContainerParams]:
    """The request the agent hands ``previous_container`` for the deployment of ``ctx``:
    ``prepare`` (no state), ``discard`` (the state), ``rollback`` (the state and a reason)."""
    return rollback_request(ctx, DockerParams, PreviousContainerParams(), state, reason=reason)

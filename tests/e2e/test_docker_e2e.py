"""Docker deployments and container monitoring end to end: a real server process, a real
agent process, a real Docker engine and the test bed's registry (``bash
scripts/docker-testbed.sh``).  Without an engine the tests that need one skip with the reason
(``DEPLOY_CENTER_STRICT=1`` makes that a failure)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
from conftest import missing_part

from deploy_core.testing import DeployCenter, free_port
from deploy_core.testing_docker import no_registry_reason, registry_address

# The test bed's own registry (scripts/docker-testbed.sh records where it is).
REGISTRY = registry_address()
IMAGE = f"{REGISTRY}/web"
TAGS = ("v1", "v2", "healthcheck")
NAME_LABEL = "deploy-center.name"
INTERVAL = 2.0  # the agent's monitor interval in these tests
AGENT = "docker-1"
FAST = {"retries": 2, "interval": 0.5, "attempt_timeout": 2, "timeout": 15}


def _testbed_problem() -> str | None:
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
    except Exception as exc:
        return f"no Docker engine ({exc}); run `bash scripts/docker-testbed.sh`"
    if REGISTRY is None:
        return no_registry_reason()
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/web/tags/list", timeout=5) as answer:
            tags = answer.read().decode()
    except Exception as exc:
        return f"no test registry at {REGISTRY} ({exc}); run `bash scripts/docker-testbed.sh`"
    if not all(f'"{tag}"' in tags for tag in TAGS):
        return f"test images {TAGS} missing from {REGISTRY}; run `bash scripts/docker-testbed.sh`"
    return None


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    """One server and agent ``docker-1`` (monitor interval 2 s), shared by the module."""
    c = DeployCenter(tmp_path_factory.mktemp("docker"))
    try:
        c.start_server()
        c.start_agent(AGENT, config=f"[services.docker_monitor]\ninterval = {INTERVAL}\n")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def testbed() -> None:
    """The engine and the registry with the test images, or skip."""
    problem = _testbed_problem()
    if problem is not None:
        missing_part(problem)


@pytest.fixture
def client(testbed: None) -> Iterator[docker.DockerClient]:
    """A docker SDK client to look at what the agent did."""
    c = docker.from_env(timeout=30)
    yield c
    c.close()


@pytest.fixture
def name(client: docker.DockerClient) -> Iterator[str]:
    """A fresh container name; its containers (and ``.prev-`` ones) are removed after."""
    value = f"e2e-{uuid.uuid4().hex[:10]}"
    yield value
    for container in client.containers.list(all=True):
        if container.labels.get(NAME_LABEL) == value or container.name.startswith(value):
            container.remove(force=True)


def deploy(center: DeployCenter, name: str, tag: str, port: int, **extra: Any) -> str:
    """Start a deploy.docker of ``web:<tag>`` on 127.0.0.1:``port`` with an HTTP check of
    ``/healthz`` and the default rollback; the deployment id."""
    body = {
        "client_id": AGENT,
        "image": f"{IMAGE}:{tag}",
        "container_name": name,
        "ports": [f"127.0.0.1:{port}:8080"],
        "min_uptime": 0.5,
        "stop_timeout": 5,
        "health_checks": [{"type": "http", "port": port, "path": "/healthz", **FAST}],
        "rollback": {},
        **extra,
    }
    deploy_id: str = center.api.deploy("docker", body)["deploy_id"]
    return deploy_id


def answer(port: int, path: str = "/", timeout: float = 1.0) -> str | None:
    """The body of GET 127.0.0.1:port/path, or ``None`` when nothing answers well."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return str(r.read().decode())
    except Exception:
        return None


def managed(client: docker.DockerClient, name: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{NAME_LABEL}={name}"}))


def statuses(center: DeployCenter, deploy_id: str) -> list[str]:
    return [row["status"] for row in center.api.history(deploy_id)]


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} not seen within {timeout:g}s")
        time.sleep(0.1)


# ----------------------------------------------------------------------- deployments


def test_v1_deploys_healthy_and_answers(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    port = free_port()
    record = center.wait(deploy(center, name, "v1", port), timeout=90)
    assert record["status"] == "success", record["error"]
    assert record["progress"] == 100
    result = record["result"]
    container = client.containers.get(name)
    assert result["container_id"] == container.id and container.status == "running"
    assert result["image_id"] == container.image.id
    assert result["image_digest"].startswith("sha256:")
    assert record["health"][0]["check_type"] == "http" and record["health"][0]["success"]
    assert "web v1" in (answer(port) or "")
    history = statuses(center, record["deploy_id"])
    for earlier, later in [("pulling", "starting"), ("starting", "health_check")]:
        assert history.index(earlier) < history.index(later)
    progress = [row["progress"] for row in center.api.history(record["deploy_id"])]
    assert progress == sorted(progress)


def test_deployctl_deploy_docker_waits_for_success(center: DeployCenter, name: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DEPLOY_CENTER_URL": center.api.url,
        "DEPLOY_CENTER_TOKEN": (center.server_dir / "admin.token").read_text().strip(),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy_core.cli",
            "deploy",
            "docker",
            "--client",
            AGENT,
            "--image",
            f"{IMAGE}:v1",
            "--name",
            name,
            "--port",
            f"127.0.0.1:{port}:8080",
            "--health",
            f"http:{port}/healthz",
            "--wait",
            "--wait-timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert ": success" in done.stdout
    assert "web v1" in (answer(port) or "")


def test_v2_over_v1_fails_health_then_v1_is_back_and_alone(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    port = free_port()
    first = center.wait(deploy(center, name, "v1", port), timeout=90)
    assert first["status"] == "success", first["error"]

    record = center.wait(deploy(center, name, "v2", port), timeout=120)

    assert record["status"] == "rolled_back", record["error"]
    assert "health check failed" in record["error"] and "HTTP 404" in record["error"]
    assert record["rollback"]["strategy"] == "previous_container"
    assert record["rollback"]["success"] is True
    assert [h["success"] for h in record["rollback"]["health"]] == [True]
    assert record["result"]["previous_container_id"] == first["result"]["container_id"]
    [left] = managed(client, name)
    assert left.id == first["result"]["container_id"]
    assert left.name == name and left.status == "running"
    assert "web v1" in (answer(port) or "")
    history = statuses(center, record["deploy_id"])
    assert history.index("failed") < history.index("rolling_back") < history.index("rolled_back")


def test_missing_image_fails_with_the_engines_message(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    deploy_id = deploy(center, name, "no-such-tag", free_port(), rollback=False)
    record = center.wait(deploy_id, timeout=60)
    assert record["status"] == "failed"
    with pytest.raises(docker.errors.NotFound) as engine:
        client.images.pull(f"{IMAGE}:no-such-tag")
    assert engine.value.explanation in record["error"]
    assert "manifest unknown" in record["error"]
    assert managed(client, name) == []
    assert "starting" not in statuses(center, deploy_id)


def test_start_first_keeps_the_service_answering_through_the_swap(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    old_port, new_port = free_port(), free_port()
    first = center.wait(deploy(center, name, "v1", old_port), timeout=90)
    assert first["status"] == "success", first["error"]

    polls: list[tuple[float, bool, bool]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            old_ok = answer(old_port, "/healthz", 0.5) is not None
            new_ok = answer(new_port, "/healthz", 0.5) is not None
            polls.append((time.monotonic(), old_ok, new_ok))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        deploy_id = deploy(center, name, "healthcheck", new_port, start_first=True)
        record = center.wait(deploy_id, timeout=90)
        end = time.monotonic() + 1.0
        eventually(lambda: polls and polls[-1][0] > end, 5, "polls after the deployment")
    finally:
        stop.set()
        poller.join(5)

    assert record["status"] == "success", record["error"]
    assert len(polls) > 20
    gaps = [t for t, old_ok, new_ok in polls if not (old_ok or new_ok)]
    assert gaps == [], f"{len(gaps)} of {len(polls)} polls found neither container answering"
    assert any(old_ok and new_ok for _, old_ok, new_ok in polls), "no overlap seen"
    assert polls[-1][1:] == (False, True)  # the old one is gone, the new one serves
    assert [c.id for c in managed(client, name)] == [record["result"]["container_id"]]
    messages = [row["message"] for row in center.api.history(deploy_id)]
    assert any("keeps running" in m for m in messages)


def test_stop_first_swap_on_one_port_has_a_gap_the_poller_sees(
    center: DeployCenter, name: str
) -> None:
    # Proves the poller above can see an outage: the same swap without start_first.
    port = free_port()
    assert center.wait(deploy(center, name, "v1", port), timeout=90)["status"] == "success"
    polls: list[bool] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            polls.append(answer(port, "/healthz", 0.5) is not None)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        record = center.wait(deploy(center, name, "healthcheck", port), timeout=90)
    finally:
        stop.set()
        poller.join(5)
    assert record["status"] == "success", record["error"]
    assert False in polls and polls[-1] is True


def test_manual_rollback_after_success_brings_the_previous_version_back(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    port = free_port()
    first = center.wait(deploy(center, name, "v1", port, env={"FLAVOUR": "one"}), timeout=90)
    assert first["status"] == "success", first["error"]
    second = center.wait(deploy(center, name, "healthcheck", port), timeout=90)
    assert second["status"] == "success", second["error"]
    # Success removed the v1 container; its spec went to the server with the state.
    assert [c.id for c in managed(client, name)] == [second["result"]["container_id"]]

    rollback_id = center.api.rollback(second["deploy_id"])["deploy_id"]
    record = center.wait(rollback_id, timeout=90)

    assert record["status"] == "rolled_back", record["error"]
    assert [h["success"] for h in record["rollback"]["health"]] == [True]
    [back] = managed(client, name)
    assert back.image.id == first["result"]["image_id"]
    assert "FLAVOUR=one" in back.attrs["Config"]["Env"]
    assert "web v1" in (answer(port) or "")
    assert center.api.get(second["deploy_id"])["rolled_back_by"] == rollback_id


def test_unreachable_engine_fails_fast_with_a_clear_message(center: DeployCenter) -> None:
    center.env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    try:
        center.start_agent("no-engine")
    finally:
        center.env.pop("DOCKER_HOST")
    started = time.monotonic()
    deploy_id = center.api.deploy(
        "docker", {"client_id": "no-engine", "image": f"{IMAGE}:v1", "container_name": "x"}
    )["deploy_id"]
    record = center.wait(deploy_id, timeout=30)
    assert time.monotonic() - started < 10
    assert record["status"] == "failed"
    assert "Docker engine at unix:///nonexistent/docker.sock is not reachable" in record["error"]


# ----------------------------------------------------------------------- monitoring


def monitor(center: DeployCenter, query: str = "") -> dict[str, Any]:
    view: dict[str, Any] = center.api.request("GET", f"/api/docker/monitor/{AGENT}{query}")
    return view


def current(center: DeployCenter, container_id: str) -> dict[str, Any] | None:
    rows = [c for c in monitor(center)["containers"] if c["id"] == container_id]
    return rows[0] if rows else None


def test_monitor_shows_a_running_container_within_two_intervals_then_exited(
    center: DeployCenter, name: str, client: docker.DockerClient
) -> None:
    port = free_port()
    started = time.time()
    record = center.wait(deploy(center, name, "v1", port), timeout=90)
    assert record["status"] == "success", record["error"]
    container_id = record["result"]["container_id"]
    # Normally within two intervals; the waits are wide because busy machines run late.
    row = eventually(lambda: current(center, container_id), 10 * INTERVAL + 30, "the container")
    assert row["state"] == "running" and row["name"] == name and row["managed"] is True
    assert row["memory_usage"] > 0 and row["memory_limit"] >= row["memory_usage"]
    assert row["image"] == f"{IMAGE}:v1" and row["restarts"] == 0

    client.containers.get(container_id).stop(timeout=5)
    row = eventually(
        lambda: (r := current(center, container_id)) and r["state"] == "exited" and r,
        10 * INTERVAL + 30,
        "the stopped container as exited",
    )
    assert row["exit_code"] == 0 and row["memory_usage"] is None

    view = monitor(center, f"?since={started}&container={name}")
    states = [s["state"] for s in view["samples"]]
    assert states[0] == "running" and states[-1] == "exited"
    assert all(s["container_id"] == container_id for s in view["samples"])
    assert view["interval"] == INTERVAL and view["error"] is None
    before = monitor(center, f"?until={started - 3600}")
    assert before["samples"] == []

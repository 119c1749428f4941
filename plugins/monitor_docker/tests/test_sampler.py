"""The agent-side sampler: settings, the numbers ``docker stats`` shows, and real containers
on a real engine."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from monitor_bed import IMAGE, RunContainer

from deploy_core.agent.context import AgentServiceContext
from monitor_docker.models import EVENT, MonitorBatch
from monitor_docker.sampler import (
    MonitorSettings,
    Sampler,
    SamplerError,
    cpu_percent,
    memory_usage,
    run_monitor,
)


def test_settings_come_from_config_then_environment_then_defaults() -> None:
    assert MonitorSettings.load({}, {}) == MonitorSettings(15.0, "managed")
    env = {"DEPLOY_MONITOR_DOCKER_INTERVAL": "2.5", "DEPLOY_MONITOR_DOCKER_SCOPE": "all"}
    assert MonitorSettings.load({}, env) == MonitorSettings(2.5, "all")
    assert MonitorSettings.load({"interval": 30, "scope": "managed"}, env) == MonitorSettings(
        30.0, "managed"
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"interval": "often"}, "must be a number"),
        ({"interval": 0}, "must be 0.2-86400"),
        ({"scope": "some"}, "'managed' or 'all'"),
    ],
)
def test_bad_settings_say_what_is_wrong(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MonitorSettings.load(config, {})


def test_cpu_percent_is_the_share_between_two_samples() -> None:
    stats = {"cpu_stats": {"cpu_usage": {"total_usage": 3_000}, "system_cpu_usage": 20_000}}
    stats["cpu_stats"]["online_cpus"] = 2  # type: ignore[index]
    assert cpu_percent(None, stats) is None  # the first sample has nothing to compare with
    # 1 000 ns of the container's over 10 000 ns of the system's, on 2 CPUs: 20 %.
    assert cpu_percent((2_000, 10_000), stats) == 20.0
    assert cpu_percent((5_000, 10_000), stats) is None  # counter went back: restarted


def test_memory_leaves_out_the_reclaimable_page_cache() -> None:
    v1 = {"memory_stats": {"usage": 10_000, "stats": {"total_inactive_file": 4_000}}}
    v2 = {"memory_stats": {"usage": 10_000, "stats": {"inactive_file": 1_000}}}
    assert memory_usage(v1) == 6_000
    assert memory_usage(v2) == 9_000
    assert memory_usage({"memory_stats": {}}) is None


def test_a_running_managed_container_is_sampled_with_its_memory(
    run_container: RunContainer,
) -> None:
    managed = run_container()
    unmanaged = run_container(managed=False)
    sampler = Sampler("managed")
    try:
        first = {s.id: s for s in sampler.collect()}
        time.sleep(0.5)
        second = {s.id: s for s in sampler.collect()}
    finally:
        sampler.close()
    assert managed.id in first and unmanaged.id not in first
    seen = second[managed.id]
    assert seen.state == "running" and seen.managed and seen.restarts == 0
    assert seen.memory_usage is not None and seen.memory_usage > 0
    assert seen.memory_limit is not None and seen.memory_limit >= seen.memory_usage
    assert first[managed.id].cpu_percent is None and seen.cpu_percent is not None
    assert seen.image == IMAGE and seen.started_at


def test_a_stopped_container_shows_exited_with_its_code(
    run_container: RunContainer,
) -> None:
    container = run_container()
    container.stop(timeout=5)
    sampler = Sampler("managed")
    try:
        [seen] = [s for s in sampler.collect() if s.id == container.id]
    finally:
        sampler.close()
    assert seen.state == "exited"
    assert seen.exit_code == 0  # the test image leaves on SIGTERM
    assert seen.memory_usage is None and seen.cpu_percent is None


def test_scope_all_includes_unmanaged_containers(run_container: RunContainer) -> None:
    unmanaged = run_container(managed=False)
    sampler = Sampler("all")
    try:
        samples = {s.id: s for s in sampler.collect()}
    finally:
        sampler.close()
    assert samples[unmanaged.id].managed is False


async def test_an_unreachable_engine_is_a_sampler_error_at_once() -> None:
    sampler = Sampler(address="unix:///nonexistent/docker.sock", timeout=60)
    started = time.monotonic()
    with pytest.raises(SamplerError, match="cannot sample the Docker engine"):
        await sampler.sample(15)
    # At once: well before its 60 s timeout (a wide margin for busy machines).
    assert time.monotonic() - started < 60


async def test_the_service_sends_a_batch_every_interval(
    run_container: RunContainer, tmp_path: Path
) -> None:
    container = run_container()
    sent: list[tuple[str, dict[str, Any]]] = []

    async def send_event(name: str, payload: dict[str, Any]) -> None:
        sent.append((name, payload))

    ctx = AgentServiceContext("c1", tmp_path, send_event, {"interval": 1.0})
    task = asyncio.create_task(run_monitor(ctx))
    try:
        end = time.monotonic() + 10
        while len(sent) < 3 and time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(sent) >= 3, f"{len(sent)} batches in 10 s"
    assert {name for name, _ in sent} == {EVENT}
    batches = [MonitorBatch.model_validate(payload) for _, payload in sent]
    assert all(container.id in [c.id for c in b.containers] for b in batches)
    gaps = [b.ts - a.ts for a, b in itertools.pairwise(batches)]
    # In order and never faster than the interval; no ceiling (busy machines run late).
    assert all(gap >= 0.9 for gap in gaps), gaps


async def test_the_service_reports_an_engine_error_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    sent: list[dict[str, Any]] = []

    async def send_event(name: str, payload: dict[str, Any]) -> None:
        sent.append(payload)

    ctx = AgentServiceContext("c1", tmp_path, send_event, {"interval": 0.2})
    task = asyncio.create_task(run_monitor(ctx))
    await asyncio.sleep(1.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(sent) == 1
    assert "unix:///nonexistent/docker.sock" in sent[0]["error"]
    assert sent[0]["containers"] == []

"""Agent side: the ``docker_monitor`` service samples containers and sends ``docker.monitor``
events (SPEC deploy-26).

Settings come from the agent's service config (``interval``, ``scope``), else from the
agent's environment (``DEPLOY_MONITOR_DOCKER_INTERVAL``, ``DEPLOY_MONITOR_DOCKER_SCOPE``).
Statistics are read one-shot (no second-long wait per container); CPU % is computed between
two consecutive samples of the same container, so the first sample of each has none.
The docker SDK blocks: collection runs in a daemon thread with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import docker
import requests
from docker.errors import APIError, DockerException, NotFound

from deploy_core.plugin import AgentServiceContext
from monitor_docker.models import EVENT, MANAGED_LABEL, NAME_LABEL, ContainerSample, MonitorBatch

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_INTERVAL = "DEPLOY_MONITOR_DOCKER_INTERVAL"
ENV_SCOPE = "DEPLOY_MONITOR_DOCKER_SCOPE"
DEFAULT_INTERVAL = 15.0
MIN_INTERVAL = 0.2
API_TIMEOUT = 10.0
STATS_STATES = {"running", "paused"}
PARALLEL = 16
NEVER = "0001-01-01T00:00:00Z"

Scope = Literal["managed", "all"]


class SamplerError(Exception):
    """The engine could not be sampled; the message says why."""


@dataclass(frozen=True)
class MonitorSettings:
    """How often to sample, and which containers."""

    interval: float = DEFAULT_INTERVAL
    scope: Scope = "managed"

    @classmethod
    def load(cls, config: Mapping[str, Any], env: Mapping[str, str]) -> MonitorSettings:
        """From the service config, else the environment, else the defaults.

        :raises ValueError: naming the setting and the bad value.
        """
        raw_interval = config.get("interval", env.get(ENV_INTERVAL, DEFAULT_INTERVAL))
        try:
            interval = float(raw_interval)
        except (TypeError, ValueError):
            raise ValueError(
                f"docker monitor interval must be a number of seconds, got {raw_interval!r}"
            ) from None
        if not MIN_INTERVAL <= interval <= 86400:
            raise ValueError(
                f"docker monitor interval must be {MIN_INTERVAL}-86400 seconds, got {interval:g}"
            )
        scope = str(config.get("scope", env.get(ENV_SCOPE, "managed")))
        if scope not in ("managed", "all"):
            raise ValueError(f"docker monitor scope must be 'managed' or 'all', got {scope!r}")
        return cls(interval=interval, scope=cast(Scope, scope))


# --------------------------------------------------------------------------- numbers


def cpu_percent(previous: tuple[int, int] | None, stats: Mapping[str, Any]) -> float | None:
    """CPU use since ``previous`` (container, system nanoseconds) as ``docker stats`` shows
    it: 100 is one CPU fully busy."""
    cpu = stats.get("cpu_stats") or {}
    total = (cpu.get("cpu_usage") or {}).get("total_usage")
    system = cpu.get("system_cpu_usage")
    if previous is None or total is None or system is None:
        return None
    cpu_delta, system_delta = total - previous[0], system - previous[1]
    if cpu_delta < 0 or system_delta <= 0:
        return None  # restarted container or counter reset
    cpus = cpu.get("online_cpus") or len((cpu.get("cpu_usage") or {}).get("percpu_usage") or [1])
    return round(float(cpu_delta / system_delta * cpus * 100.0), 3)


def cpu_counters(stats: Mapping[str, Any]) -> tuple[int, int] | None:
    """(container, system) CPU nanoseconds of one statistics sample."""
    cpu = stats.get("cpu_stats") or {}
    total = (cpu.get("cpu_usage") or {}).get("total_usage")
    system = cpu.get("system_cpu_usage")
    return (int(total), int(system)) if total is not None and system is not None else None


def memory_usage(stats: Mapping[str, Any]) -> int | None:
    """Memory in use without the reclaimable page cache, as ``docker stats`` counts it
    (cgroup v1: ``total_inactive_file``; v2: ``inactive_file``)."""
    memory = stats.get("memory_stats") or {}
    usage = memory.get("usage")
    if usage is None:
        return None
    detail = memory.get("stats") or {}
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0)) or 0
    return int(usage - inactive) if inactive < usage else int(usage)


def sample_of(
    attrs: Mapping[str, Any], stats: Mapping[str, Any] | None, cpu: float | None
) -> ContainerSample:
    """A :class:`ContainerSample` from inspect data and (for running ones) statistics."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    status = state.get("Status", "dead")
    health = (state.get("Health") or {}).get("Status")
    started = state.get("StartedAt")
    memory = (stats or {}).get("memory_stats") or {}
    return ContainerSample(
        id=attrs["Id"],
        name=str(attrs.get("Name", "")).lstrip("/"),
        logical_name=labels.get(NAME_LABEL),
        image=config.get("Image", ""),
        state=status,
        health=health if health in ("starting", "healthy", "unhealthy") else None,
        exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
        started_at=started if started and started != NEVER else None,
        restarts=int(attrs.get("RestartCount") or 0),
        cpu_percent=cpu,
        memory_usage=memory_usage(stats) if stats else None,
        memory_limit=memory.get("limit"),
        managed=labels.get(MANAGED_LABEL) == "1",
    )


# --------------------------------------------------------------------------- sampling


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread (a hung engine call never holds up the agent's exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if future.done():
            return
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value: Any = fn()
            failed = False
        except BaseException as exc:
            value, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, value, failed)

    threading.Thread(target=run, name="docker-monitor", daemon=True).start()
    return future


class Sampler:
    """Samples one engine; keeps the CPU counters between samples."""

    def __init__(
        self, scope: Scope = "managed", *, timeout: float = API_TIMEOUT, address: str | None = None
    ) -> None:
        self.scope = scope
        self.timeout = timeout
        self.address = address
        self._api: docker.APIClient | None = None
        self._cpu: dict[str, tuple[int, int]] = {}

    def _client(self) -> docker.APIClient:
        if self._api is None:
            kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
            if self.address is not None:
                kwargs["base_url"] = self.address
            self._api = docker.APIClient(version="auto", timeout=self.timeout, **kwargs)
        return self._api

    def close(self) -> None:
        """Close the engine connection (a new one is made on the next sample)."""
        if self._api is not None:
            self._api.close()
            self._api = None

    def collect(self) -> list[ContainerSample]:
        """Blocking: inspect (and, when running, read statistics of) every container in
        scope.  Containers are read side by side: the engine takes up to a second to
        answer a statistics request, even a one-shot one."""
        api = self._client()
        filters = {"label": f"{MANAGED_LABEL}=1"} if self.scope == "managed" else None
        ids = [summary["Id"] for summary in api.containers(all=True, filters=filters)]
        if not ids:
            self._cpu.clear()
            return []
        with ThreadPoolExecutor(min(len(ids), PARALLEL), "docker-monitor") as pool:
            read = [r for r in pool.map(self._read, ids) if r is not None]
        samples = []
        for attrs, stats in read:
            counters = cpu_counters(stats) if stats else None
            cpu = cpu_percent(self._cpu.get(attrs["Id"]), stats) if stats else None
            if counters is not None:
                self._cpu[attrs["Id"]] = counters
            samples.append(sample_of(attrs, stats, cpu))
        seen = {attrs["Id"] for attrs, _ in read}
        self._cpu = {k: v for k, v in self._cpu.items() if k in seen}
        return samples

    def _read(self, container_id: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        api = self._client()
        try:
            attrs: dict[str, Any] = api.inspect_container(container_id)
        except NotFound:
            return None  # removed between the listing and now
        stats = None
        if (attrs.get("State") or {}).get("Status") in STATS_STATES:
            try:
                stats = api.stats(container_id, stream=False, one_shot=True)
            except (APIError, ValueError) as exc:
                # A container stopping or starting right now may answer with nothing: it is
                # still reported, without usage this time.
                log.debug("no statistics for %s: %s", container_id[:12], exc)
        return attrs, stats

    async def sample(self, interval: float) -> MonitorBatch:
        """One batch, collected in a thread within ``timeout`` (plus a little per call).

        :raises SamplerError: the engine is unreachable or answered with an error.
        """
        ts = time.time()
        try:
            containers = await asyncio.wait_for(_in_thread(self.collect), self.timeout * 3)
        except TimeoutError:
            self.close()
            raise SamplerError(
                f"the Docker engine did not answer within {self.timeout * 3:g}s"
            ) from None
        except (DockerException, requests.RequestException, OSError, ValueError) as exc:
            self.close()
            where = self.address or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
            raise SamplerError(f"cannot sample the Docker engine at {where}: {exc}") from None
        return MonitorBatch(ts=ts, interval=interval, scope=self.scope, containers=containers)


async def run_monitor(ctx: AgentServiceContext) -> None:
    """The agent service: a batch now, then one every ``interval`` seconds, until cancelled.

    While the engine cannot be sampled, one batch carrying the error is sent when the error
    first appears (or changes), not every interval.
    """
    try:
        settings = MonitorSettings.load(ctx.config, os.environ)
    except ValueError as exc:
        log.error("docker monitor not started: %s", exc)
        return
    sampler = Sampler(settings.scope)
    log.info("docker monitor: every %gs, %s containers", settings.interval, settings.scope)
    last_error: str | None = None
    try:
        while True:
            started = time.monotonic()
            try:
                batch = await sampler.sample(settings.interval)
            except SamplerError as exc:
                if str(exc) != last_error:
                    log.warning("docker monitor: %s", exc)
                    batch = MonitorBatch(
                        ts=time.time(),
                        interval=settings.interval,
                        scope=settings.scope,
                        error=str(exc)[:2000],
                    )
                    await ctx.send_event(EVENT, batch.model_dump(mode="json"))
                last_error = str(exc)
            else:
                if last_error is not None:
                    log.info("docker monitor: the engine answers again")
                last_error = None
                await ctx.send_event(EVENT, batch.model_dump(mode="json"))
            await asyncio.sleep(max(0.0, settings.interval - (time.monotonic() - started)))
    finally:
        sampler.close()

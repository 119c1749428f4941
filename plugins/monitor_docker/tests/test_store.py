"""The server-side store on real databases: samples, current state, resent and late batches,
error batches, retention and the window queries."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from monitor_docker.models import ContainerSample, MonitorBatch
from monitor_docker.store import (
    DEFAULT_RETENTION,
    MonitorStore,
    MonitorTables,
    define_tables,
    parse_duration,
    retention_from,
)

T0 = 1_800_000_000.0


def sample(cid: str, name: str, **fields: Any) -> ContainerSample:
    values: dict[str, Any] = {"state": "running", "memory_usage": 1000, "memory_limit": 10**9}
    values.update(fields)
    return ContainerSample(id=cid * 12, name=name, **values)


def batch(ts: float, *containers: ContainerSample, error: str | None = None) -> MonitorBatch:
    return MonitorBatch(ts=ts, interval=15, containers=list(containers), error=error)


@pytest.fixture
def store(engine: sa.Engine) -> MonitorStore:
    metadata = sa.MetaData()
    define_tables(metadata)
    define_tables(metadata)  # the server may call the hook again: nothing changes
    metadata.create_all(engine)
    return MonitorStore(engine, MonitorTables.of(metadata), retention=3600)


def test_current_state_follows_the_newest_batch(store: MonitorStore) -> None:
    store.store("web-1", batch(T0, sample("a", "api"), sample("b", "db")), now=T0)
    store.store("web-1", batch(T0 + 15, sample("a", "api", state="exited", exit_code=3)), now=T0)
    view = store.view("web-1")
    assert [(c["name"], c["state"], c["exit_code"]) for c in view["containers"]] == [
        ("api", "exited", 3)
    ]
    assert view["last_report_ts"] == T0 + 15 and view["interval"] == 15
    assert "samples" not in view
    assert store.view("web-2")["containers"] == []  # clients do not see each other's


def test_a_resent_batch_adds_nothing_and_a_late_one_does_not_win(store: MonitorStore) -> None:
    store.store("web-1", batch(T0 + 15, sample("a", "api", restarts=2)), now=T0)
    store.store("web-1", batch(T0 + 15, sample("a", "api", restarts=2)), now=T0)
    store.store("web-1", batch(T0, sample("a", "api", restarts=1)), now=T0)
    view = store.view("web-1", since=0)
    assert [s["restarts"] for s in view["samples"]] == [1, 2]  # the late one is history
    assert view["containers"][0]["restarts"] == 2


def test_an_error_batch_keeps_the_last_known_containers(store: MonitorStore) -> None:
    store.store("web-1", batch(T0, sample("a", "api")), now=T0)
    store.store("web-1", batch(T0 + 15, error="engine gone"), now=T0)
    view = store.view("web-1")
    assert view["error"] == "engine gone"
    assert [c["name"] for c in view["containers"]] == ["api"]
    store.store("web-1", batch(T0 + 30, sample("a", "api")), now=T0)
    assert store.view("web-1")["error"] is None


def test_samples_past_the_retention_are_pruned_on_insert(store: MonitorStore) -> None:
    store.store("web-1", batch(T0, sample("a", "api")), now=T0)
    store.store("web-1", batch(T0 + 1800, sample("a", "api")), now=T0 + 1800)
    assert len(store.view("web-1", since=0)["samples"]) == 2
    pruned = store.store("web-1", batch(T0 + 3700, sample("a", "api")), now=T0 + 3700)
    assert pruned == 1
    assert [s["ts"] for s in store.view("web-1", since=0)["samples"]] == [T0 + 1800, T0 + 3700]


def test_the_window_container_and_limit_narrow_the_samples(store: MonitorStore) -> None:
    for i in range(5):
        store.store("web-1", batch(T0 + i, sample("a", "api"), sample("b", "db")), now=T0)
    view = store.view("web-1", since=T0 + 1, until=T0 + 3)
    assert [(s["ts"], s["name"]) for s in view["samples"]] == [
        (T0 + t, n) for t in (1, 2, 3) for n in ("api", "db")
    ]
    assert [s["ts"] for s in store.view("web-1", since=0, container="db")["samples"]] == [
        T0 + i for i in range(5)
    ]
    assert len(store.view("web-1", since=0, container="bbbb")["samples"]) == 5  # id prefix
    limited = store.view("web-1", since=0, limit=3)
    assert len(limited["samples"]) == 3 and limited["truncated"] is True
    assert store.view("web-1", until=T0)["truncated"] is False


@pytest.mark.parametrize(
    ("text", "seconds"), [("604800", 604800), ("7d", 604800), ("12h", 43200), ("30m", 1800)]
)
def test_retention_takes_plain_seconds_or_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert retention_from({"DEPLOY_MONITOR_DOCKER_RETENTION": text}) == seconds


def test_retention_from_the_server_settings_wins_over_the_environment() -> None:
    env = {"DEPLOY_MONITOR_DOCKER_RETENTION": "1d"}
    assert retention_from(env, {"retention": "12h"}) == 43200
    assert retention_from(env, {"retention": 600}) == 600
    assert retention_from(env, {}) == 86400
    with pytest.raises(ValueError, match="not a duration"):
        retention_from(env, {"retention": "soon"})


def test_retention_defaults_to_a_week_and_refuses_nonsense() -> None:
    assert retention_from({}) == DEFAULT_RETENTION == 7 * 86400
    for bad in ("", "0", "-1d", "1w", "soon"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)

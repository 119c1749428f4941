"""The series the web page draws (``GET /api/docker/monitor/{client_id}/series``): at most
``points`` points per container, each the mean of the samples in one of ``points`` equal
buckets of the container's span, on real databases; and the route's checks of its query."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from test_store import T0, batch, sample

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter
from monitor_docker.store import MAX_SERIES, MonitorStore, MonitorTables, define_tables


@pytest.fixture
def store(engine: sa.Engine) -> MonitorStore:
    metadata = sa.MetaData()
    define_tables(metadata)
    metadata.create_all(engine)
    return MonitorStore(engine, MonitorTables.of(metadata), retention=3600)


def feed(store: MonitorStore, count: int, **extra: Any) -> None:
    """``count`` batches 15 s apart: managed ``api`` (cpu i, memory 1000 + i) and an
    unmanaged ``side``."""
    for i in range(count):
        store.store(
            "web-1",
            batch(
                T0 + 15 * i,
                sample("a", "api", managed=True, cpu_percent=float(i), memory_usage=1000 + i),
                sample("b", "side", cpu_percent=50.0),
                **extra,
            ),
            now=T0 + 15 * i,
        )


def test_few_samples_are_the_points_themselves(store: MonitorStore) -> None:
    feed(store, 5)
    view = store.series("web-1", now=T0 + 60, points=10)
    assert [c["name"] for c in view["containers"]] == ["api"]  # managed only
    api = view["containers"][0]
    assert api["samples"] == 5 and api["managed"] is True and api["state"] == "running"
    assert api["series"] == {
        "ts": [T0 + 15 * i for i in range(5)],
        "cpu_percent": [0.0, 1.0, 2.0, 3.0, 4.0],
        "memory_usage": [1000, 1001, 1002, 1003, 1004],
    }
    everything = store.series("web-1", now=T0 + 60, points=10, include_all=True)
    assert [c["name"] for c in everything["containers"]] == ["api", "side"]
    assert everything["containers"][1]["series"]["cpu_percent"] == [50.0] * 5


def test_many_samples_are_cut_into_runs_of_means(store: MonitorStore) -> None:
    feed(store, 100)
    view = store.series("web-1", now=T0 + 1500, points=10)
    series = view["containers"][0]["series"]
    assert view["containers"][0]["samples"] == 100
    # Ten runs of ten samples: the mean of 0..9 is 4.5, and each point is its run's last time.
    assert series["cpu_percent"] == [4.5 + 10 * k for k in range(10)]
    assert series["memory_usage"] == [int(1004.5 + 10 * k) for k in range(10)]
    assert series["ts"] == [T0 + 15 * (10 * k + 9) for k in range(10)]
    # Uneven: 100 samples in 7 points, never more, the last point ends at the last sample.
    seven = store.series("web-1", now=T0 + 1500, points=7)["containers"][0]["series"]
    assert len(seven["ts"]) == 7 and seven["ts"][-1] == T0 + 15 * 99
    assert seven["ts"] == sorted(seven["ts"])


def test_the_window_is_the_retention_or_since(store: MonitorStore) -> None:
    feed(store, 10)  # T0 .. T0+135
    # Retention 3600 s: at T0+3630 only the samples from T0+30 on are in the window.
    late = store.series("web-1", now=T0 + 3630, points=50)["containers"][0]["series"]
    assert late["ts"][0] == T0 + 30 and len(late["ts"]) == 8
    since = store.series("web-1", now=T0 + 140, points=50, since=T0 + 100)
    assert since["containers"][0]["series"]["ts"] == [T0 + 105, T0 + 120, T0 + 135]
    assert since["since"] == T0 + 100


def test_a_time_without_samples_stays_a_gap(store: MonitorStore) -> None:
    for ts in (T0, T0 + 15, T0 + 1485, T0 + 1500):  # the agent away in between
        store.store(
            "web-1", batch(ts, sample("a", "api", managed=True, cpu_percent=ts - T0)), now=ts
        )
    series = store.series("web-1", now=T0 + 1500, points=10)["containers"][0]["series"]
    # Buckets of 150 s: the first two samples share one, the last two the last; nothing
    # is drawn between them.
    assert series["ts"] == [T0 + 15, T0 + 1500]
    assert series["cpu_percent"] == [7.5, 1492.5]


def test_missing_cpu_is_a_gap_not_zero(store: MonitorStore) -> None:
    store.store("web-1", batch(T0, sample("a", "api", managed=True)), now=T0)  # no CPU yet
    store.store("web-1", batch(T0 + 15, sample("a", "api", managed=True, cpu_percent=3.0)), now=T0)
    series = store.series("web-1", now=T0 + 20)["containers"][0]["series"]
    assert series["cpu_percent"] == [None, 3.0]


def test_no_report_and_other_clients(store: MonitorStore) -> None:
    feed(store, 3)
    view = store.series("web-2", now=T0 + 60)
    assert view["containers"] == [] and view["last_report"] is None
    assert view["truncated"] is False


def test_at_most_max_series_containers(store: MonitorStore) -> None:
    containers = [
        sample("a", "x", managed=True).model_copy(update={"id": f"{i:012x}", "name": f"n{i:04d}"})
        for i in range(MAX_SERIES + 3)
    ]
    store.store("web-1", batch(T0, *containers), now=T0)
    view = store.series("web-1", now=T0 + 1, points=2)
    assert len(view["containers"]) == MAX_SERIES and view["truncated"] is True
    assert view["containers"][0]["name"] == "n0000"


def test_the_route_checks_its_query(deploy_center: DeployCenter) -> None:
    deploy_center.env["DEPLOY_MONITOR_DOCKER_INTERVAL"] = "1"
    deploy_center.start_agent("quiet")
    base = "/api/docker/monitor/quiet/series"
    bad = {
        "?points=1": "points must be an integer from 2 to 500",
        "?points=501": "points must be an integer from 2 to 500",
        "?points=%C2%B2": "points must be",  # "²": a digit to str.isdigit(), not to int()
        "?points=-3": "points must be",
        "?since=nan": "must be a finite time",
        "?since=yesterday": "query parameter since must be",
        "?all=yes": "all must be 0 or 1",
        "?limit=5": "unknown query parameter 'limit'",
    }
    for query, message in bad.items():
        with pytest.raises(ApiError) as err:
            deploy_center.api.request("GET", base + query)
        assert err.value.status == 422 and message in str(err.value), query
    with pytest.raises(ApiError) as err:
        deploy_center.api.request("GET", "/api/docker/monitor/nobody/series")
    assert err.value.status == 404 and "unknown client" in str(err.value)
    view = deploy_center.api.request("GET", base + "?points=2&all=1")
    assert view["client_id"] == "quiet" and view["points"] == 2
    assert isinstance(view["containers"], list)

"""The server's metrics in one process: series stay bounded however many deployments run,
label values are folded past their bound, and a record published again after its finish is
not counted twice (issue 16 §1)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy_core.plugins import get_plugins
from deploy_core.server.metrics import MAX_LABEL_VALUES, OTHER, LabelGuard
from deploy_core.testing import in_process_center

pytestmark = pytest.mark.skipif(
    "deploy.shell" not in get_plugins().deploy_types, reason="needs the deploy_shell plugin"
)


async def _series(http: Any) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


async def _until(predicate: Any) -> None:
    """Wait (at most 30 s) until ``predicate()``: a change is counted when the server
    publishes it, which may follow the commit an API read already sees by a moment."""
    for _ in range(600):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the metric did not move")


def _sample(center: Any, name: str, **labels: str) -> float:
    value = center.server.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def _finished(http: Any, deploy_id: str) -> dict[str, Any]:
    for _ in range(600):
        record: dict[str, Any] = (await http.get(f"/api/deploy/{deploy_id}")).json()
        if record["finished"]:
            return record
        await asyncio.sleep(0.05)
    raise TimeoutError(f"deployment {deploy_id} did not finish")


async def _deploy(http: Any, script: str) -> str:
    answer = await http.post("/api/deploy/shell", json={"client_id": "web-1", "script": script})
    assert answer.status_code == 202, answer.text
    deploy_id: str = answer.json()["deploy_id"]
    await _finished(http, deploy_id)
    return deploy_id


async def test_fifty_deployments_add_no_series(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        for script in ("true", "exit 1"):
            await _deploy(center.http, script)
        total = "deploy_center_deployments_finished_total"
        await _until(
            lambda: (
                _sample(center, total, type="deploy.shell", status="success")
                + _sample(center, total, type="deploy.shell", status="failed")
                == 2
            )
        )
        await _series(center.http)  # a scrape is timed too: its series exist from now on
        before = await _series(center.http)
        ids = [await _deploy(center.http, "true" if n % 2 else "exit 2") for n in range(50)]
        after = await _series(center.http)
        # Message kinds may show up late (a heartbeat's ping): a handful at most.
        new = {s for s in after - before if not s[0].startswith("deploy_center_quic_")}
        assert new == set(), sorted(new)
        assert len(after) - len(before) < 10
        values = {value for _name, labels in after for _label, value in labels}
        assert not any(deploy_id in value for deploy_id in ids for value in values)
        assert "web-1" not in values
        finished = {dict(labels)["status"]: 0 for name, labels in after if "finished_total" in name}
        assert set(finished) == {"success", "failed"}


async def test_a_finished_record_published_again_counts_once(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        deploy_id = await _deploy(center.http, "true")
        server = center.server
        record = (await center.http.get(f"/api/deploy/{deploy_id}")).json()

        def finished() -> float:
            value = server.metrics.registry.get_sample_value(
                "deploy_center_deployments_finished_total",
                {"type": "deploy.shell", "status": "success"},
            )
            return value or 0.0

        await _until(lambda: finished() == 1)
        for _ in range(3):
            server.listeners.publish(record)
        assert finished() == 1


def test_label_values_are_bounded() -> None:
    guard = LabelGuard()
    seen = {guard(f"deploy.type-{n}") for n in range(1000)}
    assert len(seen) == MAX_LABEL_VALUES + 1
    assert OTHER in seen
    # A value seen before keeps its own name; long values are cut.
    assert guard("deploy.type-3") == "deploy.type-3"
    assert len(LabelGuard()("x" * 10_000)) == 64


async def test_an_observer_that_fails_does_not_break_publishing(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        # A record missing the fields metrics read: logged, never raised into publish().
        center.server.listeners.publish({"deploy_id": "x" * 32})
        deploy_id = await _deploy(center.http, "true")
        assert deploy_id


@pytest.mark.skipif(
    "script" not in get_plugins().rollback_strategies, reason="needs the rollback_basic plugin"
)
async def test_rollbacks_are_counted_by_trigger_and_strategy(tmp_path: Path) -> None:
    rollback = {"strategy": "script", "script": "true"}
    async with in_process_center(tmp_path, get_plugins()) as center:
        http, registry = center.http, center.server.metrics.registry

        def rollbacks(trigger: str) -> float:
            labels = {"trigger": trigger, "strategy": "script"}
            return registry.get_sample_value("deploy_center_rollbacks_total", labels) or 0.0

        body = {"client_id": "web-1", "script": "exit 1", "rollback": rollback}
        failed = (await http.post("/api/deploy/shell", json=body)).json()["deploy_id"]
        assert (await _finished(http, failed))["status"] == "rolled_back"
        await _until(lambda: rollbacks("agent") == 1)
        assert rollbacks("server") == 0

        body = {"client_id": "web-1", "script": "true", "rollback": rollback}
        done = (await http.post("/api/deploy/shell", json=body)).json()["deploy_id"]
        assert (await _finished(http, done))["status"] == "success"
        asked = await http.post(f"/api/deploy/{done}/rollback", json={})
        assert asked.status_code == 202, asked.text
        await _finished(http, asked.json()["deploy_id"])
        assert (rollbacks("agent"), rollbacks("server")) == (1, 1)
        started = registry.get_sample_value(
            "deploy_center_deployments_started_total", {"type": "deploy.rollback"}
        )
        assert started == 1


async def test_odd_methods_and_many_paths_add_a_bounded_number_of_series(tmp_path: Path) -> None:
    async with in_process_center(tmp_path, get_plugins()) as center:
        http = center.http
        await http.get("/api/no-such-thing")
        await _series(http)
        before = await _series(http)
        for n in range(200):
            await http.get(f"/api/no/such/{n:04d}-route")
            await http.get(f"/api/deploy/{n:032x}")  # unknown deployments: one template
            await http.request(f"X{n:04d}", "/api/info")  # a method per request
        after = await _series(http)
        added = after - before
        routes = {dict(labels).get("route") for _name, labels in added}
        methods = {dict(labels).get("method") for _name, labels in added}
        assert routes <= {"/api/deploy/{deploy_id}", "/api/info", "unmatched", None}, routes
        assert methods <= {"GET", "other", None}, methods
        # Each new (method, route, status) is one histogram: buckets, count, sum, created.
        assert len(added) < 4 * 20, len(added)


async def test_the_database_counts_on_sqlite_and_postgresql(db_url: str) -> None:
    import time
    from types import SimpleNamespace

    from deploy_core.server.callbacks import Listeners
    from deploy_core.server.db import make_engine, upgrade
    from deploy_core.server.metrics import ServerMetrics
    from deploy_core.server.records import RecordStore

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        store = RecordStore(engine, server_id="s1")
        for client_id in ("web-1", "web-2", "web-3", "web-4"):
            store.enroll(client_id, "aa" * 32)
        store.revoke_client("web-4")
        for n in range(3):  # one at a time per client: each on its own
            store.create_deployment(
                deploy_id=f"{n:032x}",
                client_id=f"web-{n + 1}",
                command_type="deploy.shell",
                request={"params": {"script": "true"}},
                deadline=time.time() + 600,
            )
        server = SimpleNamespace(engine=engine, listeners=Listeners())
        metrics = ServerMetrics(server)  # type: ignore[arg-type]
        text = (await metrics.exposition()).decode()
    finally:
        engine.dispose()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    active = ("deploy_center_deployments_active", (("status", "pending"), ("type", "deploy.shell")))
    assert samples[active] == 3
    assert samples[("deploy_center_agents_known", (("state", "enrolled"),))] == 3
    assert samples[("deploy_center_agents_known", (("state", "revoked"),))] == 1
    # No transport in this server: its metrics are left out, not made up.
    assert not any(name.startswith("deploy_center_agents_connected") for name, _ in samples)

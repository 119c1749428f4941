"""The agent's metrics say which server it is connected to (issue 15 item 5)."""

from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from deploy_core.agent.metrics import AgentMetrics  # noqa: E402


def test_the_server_gauge_names_the_server_while_connected_and_is_absent_otherwise() -> None:
    where: list[str | None] = ["127.0.0.1:8481"]
    metrics = AgentMetrics(connected=lambda: where[0] is not None, server=lambda: where[0])
    value = metrics.registry.get_sample_value
    assert value("deploy_center_agent_server", {"server": "127.0.0.1:8481"}) == 1
    assert value("deploy_center_agent_connected") == 1
    where[0] = None
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert "deploy_center_agent_server{" not in text
    assert value("deploy_center_agent_connected") == 0
    where[0] = "b.example:8471"
    assert value("deploy_center_agent_server", {"server": "b.example:8471"}) == 1
    assert value("deploy_center_agent_server", {"server": "127.0.0.1:8481"}) is None


def test_without_a_server_callable_the_gauge_stays_empty() -> None:
    metrics = AgentMetrics(connected=lambda: True)
    text = prometheus_client.generate_latest(metrics.registry).decode()
    assert "deploy_center_agent_server{" not in text
    assert "# TYPE deploy_center_agent_server gauge" in text

"""An agent's own Prometheus metrics, served only when its config asks for them::

    [metrics]
    listen = "127.0.0.1:9471"

The endpoint is prometheus_client's small HTTP server in a thread: plain HTTP without
authentication, so it listens on loopback unless the operator names another address (the
agent warns then).  docs/operating.md lists the metrics.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from deploy_core import __version__

log = logging.getLogger(__name__)

PREFIX = "deploy_center_agent"
DEFAULT_LISTEN = "127.0.0.1:9471"
DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
MAX_TYPES = 64
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]{1,253})):(?P<port>\d{1,5})$"
)


class MetricsConfigError(ValueError):
    """The ``[metrics]`` table is wrong; the message says how."""


def listen_address(table: Any) -> tuple[str, int] | None:
    """The address of the ``[metrics]`` table (``None`` without one).

    :raises MetricsConfigError: not a table of just ``listen = "HOST:PORT"``, or a bad
        address (``[::1]:9471`` for IPv6).
    """
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) - {"listen"}:
        raise MetricsConfigError(f'[metrics] holds only listen = "{DEFAULT_LISTEN}"')
    value = table.get("listen", DEFAULT_LISTEN)
    match = _HOST_PORT.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match["port"]) < 65536:
        raise MetricsConfigError(
            f"[metrics] listen must be HOST:PORT with a port from 1 to 65535 (e.g. "
            f'"{DEFAULT_LISTEN}", "[::1]:9471"), got {value!r:.80}'
        )
    if match["v6"]:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise MetricsConfigError(
                f"[metrics] listen: {match['v6']!r} is not an IPv6 address"
            ) from None
    return match["v6"] or match["host"], int(match["port"])


class AgentMetrics:
    """The agent's registry (its own, not the process-wide one) and what it counts."""

    def __init__(
        self, connected: Callable[[], bool], server: Callable[[], str | None] = lambda: None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._types: set[str] = set()
        self.deployments = Counter(
            f"{PREFIX}_deployments",
            "Deployments this agent finished, by type and final status.",
            ["type", "status"],
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_deployment_duration_seconds",
            "Time this agent spent on a deployment, start to callback, by type.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.connects = Counter(
            f"{PREFIX}_connects", "Connections to the server authenticated.", registry=r
        )
        info = Gauge(
            f"{PREFIX}_build_info", "Always 1; the agent's version.", ["version"], registry=r
        )
        info.labels(version=__version__).set(1)
        r.register(_Connected(connected, server))
        self._server: Any = None

    def _type(self, command_type: str) -> str:
        if command_type in self._types or len(self._types) < MAX_TYPES:
            self._types.add(command_type)
            return command_type[:64]
        return "other"

    def finished(self, command_type: str, status: Any, seconds: float) -> None:
        """A deployment ended with ``status`` after ``seconds``."""
        kind = self._type(command_type)
        self.deployments.labels(kind, str(getattr(status, "value", status))).inc()
        self.duration.labels(kind).observe(max(0.0, seconds))

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start the HTTP endpoint; returns the address it listens on.

        :raises OSError: the address cannot be bound.
        """
        if not _loopback(host):
            log.warning(
                "agent metrics listen on %s:%d, which is not a loopback address: anyone who "
                "reaches it can read them (no authentication)",
                host,
                port,
            )
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        log.info("agent metrics on http://%s:%d/metrics", host, bound[1])
        return host, int(bound[1])

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Connected(Collector):
    def __init__(self, connected: Callable[[], bool], server: Callable[[], str | None]) -> None:
        self.connected = connected
        self.server = server

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            f"{PREFIX}_connected", "1 while the agent is connected to its server."
        )
        gauge.add_metric([], 1 if self.connected() else 0)
        yield gauge
        server = GaugeMetricFamily(
            f"{PREFIX}_server",
            "1 for the server (HOST:PORT) the agent is connected to; absent while disconnected.",
            labels=["server"],
        )
        where = self.server()
        if where is not None:
            server.add_metric([where], 1)
        yield server

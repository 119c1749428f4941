"""The ``--health`` shorthands of the ``http`` and ``tcp`` checks on ``deployctl deploy``
commands: ``http:8080/healthz``, ``http://host:8080/path``, ``tcp:5432``, ``tcp:host:5432``.

Registered with each :class:`~deploy_core.plugin.HealthCheckType` (``shorthand``); the
command line hands over what follows ``http:`` or ``tcp:``.
"""

from __future__ import annotations

from typing import Any

HTTP_USAGE = "PORT[/PATH] or http://HOST:PORT/PATH"
TCP_USAGE = "[HOST:]PORT"


def _address(text: str) -> tuple[dict[str, Any], str | None]:
    """``[//][HOST:]PORT[/PATH]`` → ``{"port": …, "host": …}`` and the path (without its
    leading ``/``), ``None`` when there is none."""
    hostport, slash, path = text.removeprefix("//").partition("/")
    host, _, port = hostport.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"no port in {text!r}")
    options: dict[str, Any] = {"port": int(port)}
    if host:
        options["host"] = host
    return options, path if slash else None


def http_shorthand(text: str) -> dict[str, Any]:
    """``8080/healthz`` → ``{"port": 8080, "path": "/healthz"}``; the path defaults to
    ``/``."""
    options, path = _address(text)
    options["path"] = "/" + (path or "")
    return options


def tcp_shorthand(text: str) -> dict[str, Any]:
    """``db:5432`` → ``{"host": "db", "port": 5432}``."""
    options, path = _address(text)
    if path is not None:
        raise ValueError("a tcp check has no path")
    return options

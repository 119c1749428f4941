"""Log lines for people (``text``) or for log shippers (``json``: one object per line), with
the deployment and the client a line is about where the process knows them.

The deploy id and client id come from ``extra={"deploy_id": ..., "client_id": ...}`` on the
call, or else from context variables the server and the agent set where they handle a
deployment or an agent's connection (:func:`bind`).  Standard library only: the agent
imports this too.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The deployment being handled in this task or thread, if any.
DEPLOY_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("deploy_id", default=None)
#: The agent (client) being served, or this agent's own id.
CLIENT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("client_id", default=None)

# What every LogRecord has; anything else on a record came from ``extra=`` and is emitted
# (but not uvicorn's ``color_message``, the message again with terminal colours).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


def bind(**ids: str | None) -> None:
    """Set ``deploy_id`` and/or ``client_id`` for what this task (and the tasks and threads
    it starts from now on) logs; ``None`` clears one."""
    for name, value in ids.items():
        {"deploy_id": DEPLOY_ID, "client_id": CLIENT_ID}[name].set(value)


def _utc(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-12-05T10:45:40.123Z``."""
    stamp = dt.datetime.fromtimestamp(created, dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _plain(value: Any) -> Any:
    """``value`` if JSON can carry it, else its text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, then
    ``deploy_id``/``client_id`` when known, other ``extra=`` fields, and ``exc_info`` /
    ``stack_info`` as text.  Never spans lines: newlines in a message are escaped by JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("deploy_id", DEPLOY_ID), ("client_id", CLIENT_ID)):
            value = getattr(record, name, None) or var.get()
            if value:
                line[name] = str(value)
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in line:
                line[name] = _plain(value)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``), replacing whatever was
    set up before (a subcommand's ``--log-format`` reconfigures after the group's)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    # Python's warnings go through logging too, so a JSON stream stays JSON.
    logging.captureWarnings(fmt == "json")

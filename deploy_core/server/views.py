"""How deployment records are shown: to API callers, live subscribers, ``--wait`` listeners
and plugins' ``deploy_status_changed``/``deploy_finished`` hooks alike.

The HTTP handlers render with these, and so does the server when it tells listeners of a
change; neither depends on the other.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as the API shows times: ISO 8601 in UTC with a ``Z``."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def render_record(record: dict[str, Any]) -> dict[str, Any]:
    """A deployment record as the API shows it."""
    return {
        "deploy_id": record["deploy_id"],
        "client_id": record["client_id"],
        "command_type": record["command_type"],
        "status": record["status"],
        "stage": record["stage"],
        "progress": record["progress"],
        "finished": record["finished_at"] is not None,
        "result": record["result"],
        "error": record["error"],
        "health": record["health"],
        "rollback": record["rollback"],
        "rollback_of": record["rollback_of"],
        "rolled_back_by": record["rolled_back_by"],
        "agent_status": record["agent_status"],
        "request": record["request"],
        "created_at": iso_time(record["created_at"]),
        "updated_at": iso_time(record["updated_at"]),
        "finished_at": iso_time(record["finished_at"]),
        "deadline": iso_time(record["deadline"]),
        "updated_ts": record["updated_at"],
    }


def render_history(row: dict[str, Any]) -> dict[str, Any]:
    """One status-history row as the API shows it."""
    return {
        "status": row["status"],
        "stage": row["stage"],
        "progress": row["progress"],
        "message": row["message"],
        "source": row["source"],
        "seq": row["seq"],
        "timestamp": iso_time(row["ts"]),
    }

"""The rows the server's stores return: frozen, typed, one class per kind of record.

A store reads a table and hands back one of these instead of a ``{column: value}`` dict, so
a misspelt column is a type error and nothing downstream can change a record it was given.
Each class takes its fields from a result row by column name (:meth:`Row.from_row`; columns
a class does not name are left out, so a column added by a migration changes nothing until
the class names it), and says how the API shows it (``to_api``).

Frozen is shallow: the JSON columns (``request``, ``result``, ``capabilities`` …) are the
dicts and lists the database driver made; treat them as read-only too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as the API shows times: ISO 8601 in UTC with a ``Z``."""
    if ts is None:
        return None
    return _iso(ts)


@functools.lru_cache(maxsize=4096)
def _iso(ts: float) -> str:
    # Cached: a record's view is made for every status report it gets (listeners, metrics),
    # and its creation time and deadline are the same each time.
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


_FIELD_SETS: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
        _FIELD_SETS[cls] = frozenset(names)
    return names


class Row:
    """What every row class shares: built from a result row, read back as a plain dict."""

    __slots__ = ()

    @classmethod
    def from_row(cls, row: Any) -> Self:
        """The row of a SQLAlchemy result row (or of a ``{column: value}`` mapping) with this
        class's columns; other columns of ``row`` are ignored.

        :raises KeyError: ``row`` lacks one of this class's columns."""
        mapping: Mapping[str, Any] = getattr(row, "_mapping", row)
        return cls(**{name: mapping[name] for name in _field_names(cls)})

    def as_dict(self) -> dict[str, Any]:
        """The row as a ``{column: value}`` dict (a new dict; the values are the row's)."""
        return {name: getattr(self, name) for name in _field_names(type(self))}

    def replaced(self, **changes: Any) -> Self:
        """A copy with ``changes``: :func:`dataclasses.replace` without its scan of the
        fields on every call (the ingest makes one per status report; ``replace`` took a
        tenth of the server's CPU in a flood of them).

        :raises TypeError: ``changes`` names a field the row does not have."""
        cls = type(self)
        names = _field_names(cls)
        if not changes.keys() <= _FIELD_SETS[cls]:
            unknown = sorted(changes.keys() - _FIELD_SETS[cls])
            raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}")
        return cls(*[changes[n] if n in changes else getattr(self, n) for n in names])


@dataclass(frozen=True, slots=True)
class DeploymentRow(Row):
    """A ``deployments`` row: one deployment and where it is."""

    deploy_id: str
    client_id: str
    command_type: str
    status: str
    stage: str
    progress: int
    last_seq: int
    request: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    health: list[dict[str, Any]] | None
    rollback: dict[str, Any] | None
    rollback_state: Any
    rollback_of: str | None
    rolled_back_by: str | None
    rollback_wanted: bool
    agent_status: str | None
    deadline: float
    dispatched_at: float | None
    acked_at: float | None
    created_at: float
    updated_at: float
    finished_at: float | None
    log_bytes: int
    log_truncated: bool
    target: str | None

    @property
    def finished(self) -> bool:
        """Whether the deployment reached its end (by its agent or the watchdog)."""
        return self.finished_at is not None

    def to_api(self) -> dict[str, Any]:
        """The deployment as the API shows it (``DeploymentView``)."""
        return {
            "deploy_id": self.deploy_id,
            "client_id": self.client_id,
            "command_type": self.command_type,
            "status": self.status,
            "stage": self.stage,
            "progress": self.progress,
            "finished": self.finished_at is not None,
            "result": self.result,
            "error": self.error,
            "health": self.health,
            "rollback": self.rollback,
            "rollback_of": self.rollback_of,
            "rolled_back_by": self.rolled_back_by,
            "agent_status": self.agent_status,
            "request": self.request,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            "finished_at": iso_time(self.finished_at),
            "deadline": iso_time(self.deadline),
            "updated_ts": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class HistoryRow(Row):
    """A ``status_history`` row: one status a deployment passed through."""

    id: int
    deploy_id: str
    seq: int | None
    status: str
    stage: str
    progress: int
    message: str
    source: str
    ts: float

    def to_api(self) -> dict[str, Any]:
        """The entry as the API shows it (``HistoryEntry``)."""
        return {
            "status": self.status,
            "stage": self.stage,
            "progress": self.progress,
            "message": self.message,
            "source": self.source,
            "seq": self.seq,
            "timestamp": iso_time(self.ts),
        }


@dataclass(frozen=True, slots=True)
class LogLineRow(Row):
    """One line of a deployment's output, as read back from its chunks
    (:func:`deploy_core.server.log_chunks.read`); ``id`` is its line id."""

    id: int
    deploy_id: str
    ts: float
    stream: str
    stage: str
    line: str

    def to_api(self) -> dict[str, Any]:
        """The line as the API shows it (``LogEntry``)."""
        return {
            "id": self.id,
            "timestamp": iso_time(self.ts),
            "stream": self.stream,
            "stage": self.stage,
            "line": self.line,
        }


@dataclass(frozen=True, slots=True)
class ClientRow(Row):
    """A ``clients`` row without its key, and what the agent signs in with
    (``credential``: ``public_key`` or ``shared_key``)."""

    client_id: str
    public_key: str | None
    enrolled_at: float
    connected: bool
    server_id: str | None
    connected_since: float | None
    disconnected_since: float | None
    last_seen: float | None
    remote: str | None
    capabilities: dict[str, Any] | None
    revoked_at: float | None
    credential: str
    # The agent's labels as stored; a row written otherwise may hold something else.
    labels: Any

    def to_api(self, *, connected_here: bool) -> dict[str, Any]:
        """The client as the API shows it (``ClientView``); ``connected_here``: whether
        its agent is connected to the replica answering."""
        caps = self.capabilities or {}
        return {
            "client_id": self.client_id,
            "connected": bool(self.connected),
            "connected_here": connected_here,
            "connected_since": iso_time(self.connected_since) if self.connected else None,
            "disconnected_since": None if self.connected else iso_time(self.disconnected_since),
            "last_seen": iso_time(self.last_seen),
            "remote": self.remote,
            "enrolled_at": iso_time(self.enrolled_at),
            "revoked_at": iso_time(self.revoked_at),
            "credential": self.credential,
            "plugins": caps.get("plugins", {}),
            "capabilities": caps,
            "labels": self.labels if isinstance(self.labels, dict) else {},
        }


@dataclass(frozen=True, slots=True)
class ClientCredentials(Row):
    """What an enrolled agent proves itself with: its ``public_key`` and/or the shared
    ``agent_key`` of older agents (hex, ``None`` when it has none), and whether it was
    revoked."""

    public_key: str | None
    agent_key: str | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class LockRow(Row):
    """A ``client_locks`` row: the deployment that holds a client, and until when."""

    client_id: str
    deploy_id: str
    owner: str
    acquired_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class ApiTokenRow(Row):
    """A named API token without its hash."""

    name: str
    scope: str
    created_at: float
    last_used: float | None

    def to_api(self) -> dict[str, Any]:
        """The token as ``GET /api/tokens`` lists it."""
        return {
            "name": self.name,
            "scope": self.scope,
            "created_at": iso_time(self.created_at),
            "last_used": iso_time(self.last_used),
        }


@dataclass(frozen=True, slots=True)
class JoinTokenRow(Row):
    """A join token without its hash."""

    token_id: str
    created_at: float
    expires_at: float | None
    uses_left: int | None
    note: str

    def to_api(self) -> dict[str, Any]:
        """The token as ``GET /api/join-tokens`` lists it."""
        return {
            "token_id": self.token_id,
            "created_at": iso_time(self.created_at),
            "expires_at": iso_time(self.expires_at),
            "uses_left": self.uses_left,
            "note": self.note,
        }

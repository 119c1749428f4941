"""Outbound webhooks: signed HTTP POSTs to an operator's URLs when deployments start and
finish and when agents come and go (docs/webhooks.md).

Durable: each (webhook, event) is a row of the ``webhook_deliveries`` outbox, retried with
exponential back-off and jitter until it is delivered or ``max_age`` has passed (then it is
``failed``).  Events reach the outbox right after the change they report is committed: the
server's :class:`~deploy_core.server.callbacks.Listeners` feed for deployments, the transport's
callbacks for agents.  A periodic sweep enqueues every finished deployment a webhook has no
row for yet, so ``deployment.finished`` is delivered at least once even when the server died
between the commit and the enqueue; the other events are enqueued once, after the commit.

Delivery never blocks a deployment: the worker is its own task, with bounded concurrency, a
total time limit per request, and at most ``max_response_bytes`` read of an answer.

Signature: ``X-Deploy-Center-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>``
with ``X-Deploy-Center-Timestamp`` (Unix seconds, fresh for each attempt) and
``X-Deploy-Center-Delivery`` (the delivery's id, the same for every attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import socket
import ssl
import time
import unicodedata
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from deploy_core import __version__
from deploy_core.durations import human_duration
from deploy_core.server import db
from deploy_core.server.callbacks import Listeners
from deploy_core.server.db_health import OutageLog
from deploy_core.server.rollouts import FINAL, Rollouts, RolloutStore, render_summary
from deploy_core.server.rows import DeploymentRow, iso_time
from deploy_core.server.secret_box import SecretBox, SecretKeyMismatch
from deploy_core.webhook_events import (
    AGENT_CONNECTED,
    AGENT_DISCONNECTED,
    DEPLOYMENT_FINISHED,
    DEPLOYMENT_STARTED,
    EVENTS,
    ROLLOUT_FINISHED,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Deploy-Center-Signature"
TIMESTAMP_HEADER = "X-Deploy-Center-Timestamp"
DELIVERY_HEADER = "X-Deploy-Center-Delivery"
EVENT_HEADER = "X-Deploy-Center-Event"

#: Sent on request to one webhook (``POST /api/webhooks/{id}/ping``); not subscribable.
PING = "ping"

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
DELIVERY_STATUSES = (PENDING, DELIVERED, FAILED)

MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 1024
MAX_DESCRIPTION_LENGTH = 200
MAX_WEBHOOKS = 100
# How much of an error (and of a refusing answer's body) the delivery log keeps.
MAX_ERROR_LENGTH = 500
ERROR_SUMMARY_LENGTH = 500


class WebhookError(ValueError):
    """A webhook's URL, secret, events or description is not acceptable; ``str()`` says why."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class WebhookSettings:
    """The ``[webhooks]`` table of the server configuration."""

    #: Hosts (names or addresses, as written in the URL) that may be sent ``http://``.
    allow_http_hosts: tuple[str, ...] = ()
    #: Seconds a delivery is retried after its event before it is marked failed.
    max_age: float = 86400.0
    #: The first retry waits about this long; each next one twice as long, jittered.
    retry_initial: float = 10.0
    #: The longest wait between two attempts.
    retry_max_interval: float = 3600.0
    #: Seconds one attempt may take in all (connect, send, answer).
    timeout: float = 10.0
    #: Deliveries in flight at once.
    concurrency: int = 4
    #: Bytes of an answer read at most (the rest is not waited for).
    max_response_bytes: int = 65536
    #: Delivered and failed rows are deleted this long after they ended.
    keep_deliveries: float = 7 * 86400.0
    #: Seconds between sweeps for finished deployments missing from the outbox.
    sweep_interval: float = 60.0
    #: A PEM file of CAs to verify ``https://`` targets with instead of the system's.
    ca_file: str | None = None

    @property
    def per_webhook(self) -> int:
        """Deliveries in flight at once to one webhook: half of ``concurrency`` (at least
        one), so that a receiver that never answers leaves the others room."""
        return max(1, self.concurrency // 2)

    def __post_init__(self) -> None:
        for name in ("max_age", "retry_max_interval", "keep_deliveries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        for name in ("retry_initial", "timeout", "sweep_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        if not 1 <= self.concurrency <= 64:
            raise ValueError("concurrency must be 1 to 64")
        if not 1024 <= self.max_response_bytes <= 16 * 1024 * 1024:
            raise ValueError("max_response_bytes must be 1024 to 16777216")
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"ca_file {self.ca_file}: no CA certificates read ({exc})"
                ) from None

    @classmethod
    def from_table(cls, table: Any) -> WebhookSettings:
        """Settings from a TOML table; :raises ValueError: naming what is wrong."""
        if not isinstance(table, dict):
            raise ValueError("[webhooks] must be a table")
        known = {f.name: f for f in fields(cls)}
        if unknown := sorted(set(table) - set(known)):
            raise ValueError(
                f"[webhooks] has no setting {', '.join(unknown)} (known: {', '.join(known)})"
            )
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "allow_http_hosts":
                if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
                    raise ValueError("[webhooks] allow_http_hosts must be a list of host names")
                values[key] = tuple(h.lower().strip("[]") for h in value)
            elif key == "ca_file":
                if not isinstance(value, str) or not value:
                    raise ValueError("[webhooks] ca_file must be a path")
                values[key] = value
            elif key in ("concurrency", "max_response_bytes"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"[webhooks] {key} must be an integer")
                values[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"[webhooks] {key} must be a number of seconds")
                values[key] = float(value)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"[webhooks] {exc}") from None


# --------------------------------------------------------------------------- checks


def _printable(text: str) -> bool:
    return not any(unicodedata.category(ch).startswith("C") for ch in text)


def check_url(url: str, allow_http_hosts: Iterable[str] = ()) -> str:
    """``url`` if it may be a webhook target: ``https://``, or ``http://`` to an allowed host;
    a host, no user name or password, no fragment.  :raises WebhookError: why not."""
    if not isinstance(url, str) or not url:
        raise WebhookError("the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or not _printable(url) or " " in url:
        raise WebhookError(
            "the URL must be ASCII without spaces or control characters (percent-encode "
            "the rest; punycode for international host names)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookError(f"the URL is not valid: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise WebhookError(
            f"only https:// URLs (or http:// to a host the server allows) can be webhooks, "
            f"not {scheme + '://' if scheme else 'a URL without a scheme'}"
        )
    if "@" in parts.netloc:
        raise WebhookError(
            "the URL must not carry a user name or password; authenticate the webhook by "
            "its signature"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookError("the URL has no host")
    if port == 0:
        raise WebhookError("the URL's port must be 1 to 65535")
    if parts.fragment or url.endswith("#"):
        raise WebhookError("the URL must not have a #fragment")
    if scheme == "http" and host not in {h.lower() for h in allow_http_hosts}:
        raise WebhookError(
            f"http:// to {host} is not allowed: use https://, or have the server's "
            f'administrator add "{host}" to [webhooks] allow_http_hosts'
        )
    return url


def check_secret(secret: str) -> str:
    """``secret`` if it can sign deliveries.  :raises WebhookError: why not."""
    if not isinstance(secret, str) or not secret:
        raise WebhookError("the secret is empty")
    if len(secret) < MIN_SECRET_LENGTH:
        raise WebhookError(f"the secret must be at least {MIN_SECRET_LENGTH} characters")
    if len(secret) > MAX_SECRET_LENGTH:
        raise WebhookError(f"the secret must be at most {MAX_SECRET_LENGTH} characters")
    if not _printable(secret):
        raise WebhookError("the secret must not contain control characters or line breaks")
    return secret


def check_events(events: Sequence[str]) -> list[str]:
    """The events, each known and once, in :data:`EVENTS` order.  :raises WebhookError:"""
    if not events:
        raise WebhookError(f"name at least one event (of: {', '.join(EVENTS)})")
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise WebhookError(
            f"unknown event {', '.join(repr(e) for e in unknown)[:200]} "
            f"(known: {', '.join(EVENTS)})"
        )
    return [e for e in EVENTS if e in events]


def check_description(description: str) -> str:
    """``description`` if it fits.  :raises WebhookError: why not."""
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise WebhookError(f"the description is longer than {MAX_DESCRIPTION_LENGTH} characters")
    if not _printable(description):
        raise WebhookError("the description must not contain control characters or line breaks")
    return description


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Deploy-Center-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def host_of(url: str) -> str:
    """The host a URL points at, for logs (the path and query may carry tokens)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


# --------------------------------------------------------------------------- payloads


def deployment_data(view: dict[str, Any]) -> dict[str, Any]:
    """What a deployment event says of a deployment (as
    :meth:`~deploy_core.server.rows.DeploymentRow.to_api` shows it): ids, type, status,
    times and the start of its error; never its request (scripts, parameters), result,
    output or secret_env."""
    error = view.get("error")
    return {
        "deploy_id": view["deploy_id"],
        "client_id": view["client_id"],
        "type": view["command_type"],
        "status": view["status"],
        "finished": view["finished"],
        "error": error[:ERROR_SUMMARY_LENGTH] if isinstance(error, str) else None,
        "rollback_of": view["rollback_of"],
        "created_at": view["created_at"],
        "updated_at": view["updated_at"],
        "finished_at": view["finished_at"],
        "url": f"/api/deploy/{view['deploy_id']}",
    }


def rollout_data(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``rollout.finished`` says of a rollout (as its live feed shows it): ids, type,
    outcome, counts and times; never its request or secret_env."""
    keys = (
        "rollout_id", "status", "reason", "type", "command_type", "created_by", "selector",
        "total", "failures", "max_failures", "counts", "created_at", "finished_at",
    )  # fmt: skip
    return {**{k: summary.get(k) for k in keys}, "url": f"/api/rollouts/{summary['rollout_id']}"}


def _row(event: Event, webhook_id: str, now: float | None = None) -> dict[str, Any]:
    """The outbox row of ``event`` for one webhook: due now."""
    now = time.time() if now is None else now
    delivery_id = uuid.uuid4().hex
    return {
        "delivery_id": delivery_id,
        "webhook_id": webhook_id,
        "event": event.name,
        "event_key": f"{event.name}:{event.key}"[:200],
        "payload": _body(delivery_id, event.name, event.at, event.data),
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


def _body(delivery_id: str, event: str, created: float, data: dict[str, Any]) -> str:
    return json.dumps(
        {"id": delivery_id, "event": event, "created_at": iso_time(created), "data": data},
        separators=(",", ":"),
        sort_keys=True,
    )


@dataclass
class Event:
    """One fact to report: ``key`` names it so that it is enqueued once per webhook."""

    name: str
    key: str
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- the store


def _webhook_view(row: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """A webhook as the API shows it: never its secret."""
    return {
        "id": row["webhook_id"],
        "url": row["url"],
        "events": list(row["events"]),
        "description": row["description"],
        "created_at": iso_time(row["created_at"]),
        "deliveries": {s: counts.get(s, 0) for s in DELIVERY_STATUSES},
    }


def _delivery_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["delivery_id"],
        "event": row["event"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "created_at": iso_time(row["created_at"]),
        "last_attempt_at": iso_time(row["last_attempt_at"]),
        "next_attempt_at": iso_time(row["next_attempt_at"]) if row["status"] == PENDING else None,
        "finished_at": iso_time(row["finished_at"]),
    }


@dataclass
class Due:
    """A delivery claimed for one attempt, with what sending it needs."""

    delivery_id: str
    webhook_id: str
    event: str
    url: str
    secret: dict[str, str]
    payload: str
    attempts: int
    created_at: float


class WebhookStore:
    """The webhooks and their outbox in the database (blocking calls: run them in a thread)."""

    def __init__(self, engine: Engine, secret_box: SecretBox, *, lease: float = 300.0) -> None:
        """:param lease: seconds a claimed delivery is left alone (longer than an attempt)."""
        self.engine = engine
        self.box = secret_box
        self.lease = lease

    # -- webhooks

    def create(self, url: str, events: list[str], secret: str, description: str) -> dict[str, Any]:
        """Store a checked webhook; its view.  :raises WebhookError: too many webhooks."""
        row = {
            "webhook_id": secrets.token_hex(8),
            "url": url,
            "events": events,
            "secret": self.box.seal({"secret": secret}),
            "description": description,
            "created_at": time.time(),
        }
        with self.engine.begin() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(db.webhooks)).scalar_one()
            if count >= MAX_WEBHOOKS:
                raise WebhookError(f"there are already {count} webhooks (at most {MAX_WEBHOOKS})")
            conn.execute(db.webhooks.insert().values(**row))
        return _webhook_view(row, {})

    def all(self) -> list[dict[str, Any]]:
        """Every webhook, oldest first, with its deliveries counted by status."""
        t, d = db.webhooks, db.webhook_deliveries
        with self.engine.connect() as conn:
            rows = [db.row_dict(r) for r in conn.execute(sa.select(t).order_by(t.c.created_at))]
            counts: dict[str, dict[str, int]] = {}
            for webhook_id, status, n in conn.execute(
                sa.select(d.c.webhook_id, d.c.status, sa.func.count()).group_by(
                    d.c.webhook_id, d.c.status
                )
            ):
                counts.setdefault(webhook_id, {})[status] = n
        return [_webhook_view(r, counts.get(r["webhook_id"], {})) for r in rows]

    def get(self, webhook_id: str) -> dict[str, Any] | None:
        """One webhook's view, or ``None``."""
        return next((w for w in self.all() if w["id"] == webhook_id), None)

    def remove(self, webhook_id: str) -> bool:
        """Delete a webhook and its deliveries; whether it existed."""
        with self.engine.begin() as conn:
            conn.execute(
                db.webhook_deliveries.delete().where(
                    db.webhook_deliveries.c.webhook_id == webhook_id
                )
            )
            gone = conn.execute(db.webhooks.delete().where(db.webhooks.c.webhook_id == webhook_id))
        return bool(gone.rowcount)

    def subscriptions(self) -> dict[str, tuple[frozenset[str], float]]:
        """``{webhook_id: (events, created_at)}``."""
        t = db.webhooks
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.webhook_id, t.c.events, t.c.created_at)).all()
        return {r.webhook_id: (frozenset(r.events), r.created_at) for r in rows}

    def deliveries(
        self, webhook_id: str, *, limit: int = 50, status: str | None = None
    ) -> list[dict[str, Any]]:
        """A webhook's deliveries, newest first."""
        d = db.webhook_deliveries
        query = sa.select(d).where(d.c.webhook_id == webhook_id)
        if status is not None:
            query = query.where(d.c.status == status)
        query = query.order_by(d.c.created_at.desc(), d.c.delivery_id).limit(limit)
        with self.engine.connect() as conn:
            return [_delivery_view(db.row_dict(r)) for r in conn.execute(query)]

    # -- the outbox

    def _insert_ignoring_duplicates(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        dialect = conn.dialect.name
        insert: Any
        if dialect == "postgresql":
            insert = postgresql.insert(db.webhook_deliveries)
        elif dialect == "sqlite":
            insert = sqlite.insert(db.webhook_deliveries)
        else:  # pragma: no cover - the server runs on SQLite or PostgreSQL
            raise RuntimeError(f"webhooks need SQLite or PostgreSQL, not {dialect}")
        insert = insert.on_conflict_do_nothing(
            index_elements=["webhook_id", "event_key"]
        ).returning(db.webhook_deliveries.c.delivery_id)
        # Counted by what comes back: psycopg's rowcount says -1 for a skipped conflict.
        return sum(len(conn.execute(insert.values(**row)).all()) for row in rows)

    def enqueue(self, events: Sequence[Event], webhook_ids: dict[str, list[str]]) -> int:
        """Add a delivery of each event to each webhook in ``webhook_ids[event.name]`` (one
        per webhook and event key); how many were new."""
        now = time.time()
        return self._insert(
            [_row(e, webhook_id, now) for e in events for webhook_id in webhook_ids.get(e.name, ())]
        )

    def ping(self, webhook_id: str) -> str | None:
        """Enqueue a ``ping`` to one webhook, to check that it is set up; its delivery's id,
        or ``None`` when there is no such webhook."""
        row = _row(Event(PING, uuid.uuid4().hex, {"webhook_id": webhook_id}), webhook_id)
        return str(row["delivery_id"]) if self._insert([row]) else None

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        with self.engine.begin() as conn:
            # A webhook removed meanwhile gets nothing (the foreign key would refuse it).
            alive = set(
                conn.execute(
                    sa.select(db.webhooks.c.webhook_id).where(
                        db.webhooks.c.webhook_id.in_({r["webhook_id"] for r in rows})
                    )
                ).scalars()
            )
            return self._insert_ignoring_duplicates(
                conn, [r for r in rows if r["webhook_id"] in alive]
            )

    def _unreported(
        self,
        event: str,
        key: sa.ColumnElement[str],
        finished_at: sa.ColumnElement[float],
        window: float,
        limit: int,
    ) -> dict[str, list[str]]:
        """``{webhook_id: [key, ...]}``: what ended (``finished_at``) within ``window``
        seconds, after the webhook was made, and has no ``event`` delivery for it yet."""
        d = db.webhook_deliveries
        found: dict[str, list[str]] = {}
        for webhook_id, (events, created_at) in self.subscriptions().items():
            if event not in events:
                continue
            query = (
                sa.select(key)
                .where(finished_at.is_not(None))
                .where(finished_at >= max(time.time() - window, created_at))
                .where(
                    ~sa.exists().where(
                        d.c.webhook_id == webhook_id,
                        d.c.event_key == sa.literal(event + ":") + key,
                    )
                )
                .order_by(finished_at)
                .limit(limit)
            )
            with self.engine.connect() as conn:
                if keys := list(conn.execute(query).scalars()):
                    found[webhook_id] = keys
        return found

    def sweep_finished(self, window: float, limit: int = 500) -> int:
        """Enqueue ``deployment.finished`` for deployments that finished within the last
        ``window`` seconds (and after the webhook was made) and have no delivery yet for a
        webhook subscribed to it; how many were added."""
        dep = db.deployments
        added = 0
        missing = self._unreported(
            DEPLOYMENT_FINISHED, dep.c.deploy_id, dep.c.finished_at, window, limit
        )
        for webhook_id, ids in missing.items():
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(dep).where(dep.c.deploy_id.in_(ids))).all()
            events = [finished_event(DeploymentRow.from_row(r).to_api()) for r in rows]
            added += self.enqueue(events, {DEPLOYMENT_FINISHED: [webhook_id]})
        return added

    def sweep_rollouts(self, rollouts: RolloutStore, window: float, limit: int = 100) -> int:
        """``rollout.finished`` for rollouts that ended within ``window`` seconds (after the
        webhook was made) with no delivery yet, as :meth:`sweep_finished` for deployments."""
        r = db.rollouts
        added = 0
        missing = self._unreported(ROLLOUT_FINISHED, r.c.rollout_id, r.c.finished_at, window, limit)
        for webhook_id, ids in missing.items():
            targets = rollouts.targets(ids)
            events = []
            for rollout_id in ids:
                row = rollouts.get(rollout_id)
                if row is not None and row["status"] in FINAL:
                    summary = render_summary(row, targets.get(rollout_id, []))
                    events.append(Event(ROLLOUT_FINISHED, rollout_id, rollout_data(summary)))
            added += self.enqueue(events, {ROLLOUT_FINISHED: [webhook_id]})
        return added

    def due(
        self,
        limit: int,
        now: float | None = None,
        *,
        busy: dict[str, int] | None = None,
        per_webhook: int | None = None,
    ) -> list[Due]:
        """Claim up to ``limit`` deliveries whose attempt is due: each claimed row's next
        attempt moves ``lease`` seconds ahead, so another worker (or replica) leaves it
        alone while it is in flight, and picks it up again if this one died.

        :param busy: deliveries in flight by webhook id.
        :param per_webhook: at most this many in flight for one webhook (with ``busy``), so
            that a slow receiver cannot take every slot from the others."""
        now = time.time() if now is None else now
        busy = dict(busy or {})
        cap = per_webhook or limit
        d, w = db.webhook_deliveries, db.webhooks
        full = [webhook_id for webhook_id, n in busy.items() if n >= cap]
        query = (
            sa.select(d, w.c.url, w.c.secret)
            .join(w, w.c.webhook_id == d.c.webhook_id)
            .where(d.c.status == PENDING, d.c.next_attempt_at <= now)
            .where(d.c.webhook_id.not_in(full))
            .order_by(d.c.next_attempt_at)
            .limit(min(500, limit * 20))
        )
        claimed: list[Due] = []
        with self.engine.begin() as conn:
            for row in conn.execute(query).all():
                if len(claimed) >= limit:
                    break
                if busy.get(row.webhook_id, 0) >= cap:
                    continue
                taken = conn.execute(
                    d.update()
                    .where(
                        d.c.delivery_id == row.delivery_id,
                        d.c.status == PENDING,
                        d.c.next_attempt_at == row.next_attempt_at,
                    )
                    .values(next_attempt_at=now + self.lease)
                )
                if taken.rowcount:
                    claimed.append(Due(**{f.name: getattr(row, f.name) for f in fields(Due)}))
                    busy[row.webhook_id] = busy.get(row.webhook_id, 0) + 1
        return claimed

    def release(self, due: Due) -> None:
        """Give a claimed delivery back, due now, without counting an attempt."""
        d = db.webhook_deliveries
        with self.engine.begin() as conn:
            conn.execute(
                d.update()
                .where(d.c.delivery_id == due.delivery_id, d.c.status == PENDING)
                .values(next_attempt_at=time.time())
            )

    def open_secret(self, due: Due) -> str:
        """The webhook's secret.  :raises SecretKeyMismatch: sealed under another key."""
        return self.box.open(due.secret)["secret"]

    def record_attempt(
        self,
        due: Due,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        next_attempt_at: float | None,
    ) -> None:
        """Store an attempt's outcome: delivered, pending until ``next_attempt_at``, or
        failed (``next_attempt_at`` ``None`` and not ``ok``)."""
        now = time.time()
        d = db.webhook_deliveries
        values: dict[str, Any] = {
            "attempts": due.attempts + 1,
            "last_attempt_at": now,
            "last_status_code": status_code,
            "last_error": error[:MAX_ERROR_LENGTH] if error else None,
        }
        if ok:
            values |= {"status": DELIVERED, "finished_at": now}
        elif next_attempt_at is None:
            values |= {"status": FAILED, "finished_at": now}
        else:
            values |= {"next_attempt_at": next_attempt_at}
        with self.engine.begin() as conn:
            conn.execute(
                d.update()
                .where(d.c.delivery_id == due.delivery_id, d.c.status == PENDING)
                .values(**values)
            )

    def prune(self, before: float) -> int:
        """Delete deliveries that ended before ``before``; how many."""
        d = db.webhook_deliveries
        with self.engine.begin() as conn:
            gone = conn.execute(
                d.delete().where(d.c.finished_at.is_not(None), d.c.finished_at < before)
            )
        return int(gone.rowcount or 0)


def finished_event(view: dict[str, Any]) -> Event:
    """``deployment.finished`` of a finished deployment's view."""
    return Event(DEPLOYMENT_FINISHED, view["deploy_id"], deployment_data(view))


def backoff(attempts: int, settings: WebhookSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: doubling from
    ``retry_initial`` up to ``retry_max_interval``, each between half and all of that."""
    delay: float = min(
        settings.retry_max_interval, settings.retry_initial * 2.0 ** min(attempts - 1, 40)
    )
    return delay * (0.5 + random.random() / 2)  # jitter, not a secret


def _transport_error(exc: Exception) -> str:
    """What went wrong below HTTP, as precisely as the exception's chain says (httpx wraps
    "connection refused" as "All connection attempts failed")."""
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"{type(exc).__name__}: TLS: {cause.verify_message} ({cause.reason})"
        if isinstance(cause, ssl.SSLError):  # an OSError too, with a misleading errno
            return f"{type(exc).__name__}: TLS: {cause.reason or cause}"
        if isinstance(cause, socket.gaierror):
            return f"{type(exc).__name__}: cannot resolve the host ({cause.strerror})"
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            return f"{type(exc).__name__}: {os.strerror(cause.errno).lower()}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- the service


class Webhooks:
    """The server's webhooks: takes events, keeps the outbox, delivers."""

    SUBSCRIPTIONS_TTL = 5.0
    QUEUE_SIZE = 10000
    SEEN_SIZE = 20000

    def __init__(
        self,
        engine: Engine,
        secret_box: SecretBox,
        settings: WebhookSettings | None = None,
        listeners: Listeners | None = None,
    ) -> None:
        self.settings = settings or WebhookSettings()
        self.store = WebhookStore(engine, secret_box, lease=self.settings.timeout + 60)
        self.listeners = listeners
        self.rollouts: Rollouts | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue(self.QUEUE_SIZE)
        self._wake = asyncio.Event()
        self._subs: dict[str, tuple[frozenset[str], float]] = {}
        self._subs_read = 0.0
        self._seen: OrderedDict[str, None] = OrderedDict()
        # Deliveries in flight, with the webhook each is for.
        self._in_flight: dict[asyncio.Task[None], str] = {}
        self.delivered = 0
        self.failed_attempts = 0
        self.dropped = 0
        # A database outage is logged in a few lines per loop, not one per pass.
        self._enqueue_outage = OutageLog(log, "webhooks outbox")
        self._sweep_outage = OutageLog(log, "webhooks sweep")
        self._deliver_outage = OutageLog(log, "webhooks delivery")

    # -- events in

    def wake(self) -> None:
        """Something was enqueued outside the event path (a ping): look at the outbox now."""
        self._wake.set()

    def invalidate(self) -> None:
        """Webhooks changed: read the subscriptions again before the next event."""
        self._subs_read = 0.0

    def emit(self, name: str, key: str, data: dict[str, Any]) -> None:
        """Report an event (never blocks; dropped with a warning if the queue is full)."""
        assert name in EVENTS, name
        fresh = self._subs_read and time.monotonic() - self._subs_read < self.SUBSCRIPTIONS_TTL
        if fresh and not any(name in events for events, _ in self._subs.values()):
            return  # nobody listens for it
        try:
            self._queue.put_nowait(Event(name, key, data))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "webhooks: event queue full (the database is too slow to take them): "
                    "%d events not enqueued so far, the latest %s",
                    self.dropped,
                    name,
                )

    def deployment_changed(self, view: dict[str, Any]) -> None:
        """A deployment's record changed (as listeners see it)."""
        deploy_id = view["deploy_id"]
        if view["finished"]:
            if self._first(f"f:{deploy_id}"):
                event = finished_event(view)
                self.emit(event.name, event.key, event.data)
        elif view["status"] != "pending" and self._first(f"s:{deploy_id}"):
            self.emit(DEPLOYMENT_STARTED, deploy_id, deployment_data(view))

    def follow_rollouts(self, rollouts: Rollouts) -> None:
        """Report ``rollout.finished`` of these rollouts (call before :meth:`run`)."""
        self.rollouts = rollouts

    def rollout_changed(self, summary: dict[str, Any]) -> None:
        """A rollout's summary changed (as its live feed shows it)."""
        if summary.get("finished_at") and self._first(f"r:{summary['rollout_id']}"):
            self.emit(ROLLOUT_FINISHED, summary["rollout_id"], rollout_data(summary))

    def agent_connected(self, client_id: str, remote: str) -> None:
        """An agent connected to this server."""
        self.emit(
            AGENT_CONNECTED,
            f"{client_id}:{uuid.uuid4().hex}",
            {"client_id": client_id, "remote": remote, "at": iso_time(time.time())},
        )

    def agent_disconnected(self, client_id: str) -> None:
        """An agent's connection to this server ended."""
        self.emit(
            AGENT_DISCONNECTED,
            f"{client_id}:{uuid.uuid4().hex}",
            {"client_id": client_id, "at": iso_time(time.time())},
        )

    def _first(self, key: str) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.SEEN_SIZE:
            self._seen.popitem(last=False)
        return True

    async def _subscriptions(self) -> dict[str, tuple[frozenset[str], float]]:
        if time.monotonic() - self._subs_read >= self.SUBSCRIPTIONS_TTL or not self._subs_read:
            self._subs = await asyncio.to_thread(self.store.subscriptions)
            self._subs_read = time.monotonic()
        return self._subs

    # -- the loops

    async def run(self) -> None:
        """Every loop of the service, until cancelled."""
        import httpx

        settings = self.settings
        verify: ssl.SSLContext | bool = True
        if settings.ca_file:
            verify = ssl.create_default_context(cafile=settings.ca_file)
        async with httpx.AsyncClient(
            verify=verify,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(settings.timeout),
            limits=httpx.Limits(max_connections=settings.concurrency),
            headers={"User-Agent": f"DeployCenter-Webhooks/{__version__}"},
        ) as client:
            loops = [self._enqueue_loop(), self._deliver_loop(client), self._sweep_loop()]
            if self.listeners is not None:
                loops.append(self._watch_deployments(self.listeners))
            if self.rollouts is not None:
                loops.append(self._watch_rollouts(self.rollouts))
            tasks = [asyncio.create_task(c, name=f"webhooks-{i}") for i, c in enumerate(loops)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in [*tasks, *self._in_flight]:
                    task.cancel()
                await asyncio.gather(*tasks, *self._in_flight, return_exceptions=True)

    async def _watch_deployments(self, listeners: Listeners) -> None:
        async with listeners.subscribe("*", remote=False) as queue:  # once per change
            while True:
                view = await queue.get()
                try:
                    self.deployment_changed(view)
                except Exception:
                    log.exception("webhooks: could not take a deployment change")

    async def _watch_rollouts(self, rollouts: Rollouts) -> None:
        async with rollouts.feed.subscribe(remote=False) as queue:
            while True:
                summary = await queue.get()
                try:
                    self.rollout_changed(summary)
                except Exception:
                    log.exception("webhooks: could not take a rollout change")

    async def _enqueue_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 200:
                batch.append(self._queue.get_nowait())
            try:
                subs = await self._subscriptions()
                targets: dict[str, list[str]] = {}
                for event in batch:
                    targets[event.name] = [
                        wid for wid, (events, _c) in subs.items() if event.name in events
                    ]
                added = 0
                if any(targets.values()):
                    added = await asyncio.to_thread(self.store.enqueue, batch, targets)
                if added:
                    self._wake.set()
                self._enqueue_outage.ok()
            except Exception as exc:
                if not self._enqueue_outage.failed(exc):
                    log.exception("webhooks: could not enqueue %d events", len(batch))
                await asyncio.sleep(1)

    async def _sweep_loop(self) -> None:
        settings = self.settings
        window = min(settings.max_age, settings.keep_deliveries)
        last_prune = 0.0
        while True:
            try:
                if await asyncio.to_thread(self.store.sweep_finished, window):
                    self._wake.set()
                if self.rollouts is not None:
                    swept = await asyncio.to_thread(
                        self.store.sweep_rollouts, self.rollouts.store, window
                    )
                    if swept:
                        self._wake.set()
                if time.monotonic() - last_prune > 3600:
                    last_prune = time.monotonic()
                    if pruned := await asyncio.to_thread(
                        self.store.prune, time.time() - settings.keep_deliveries
                    ):
                        log.info(
                            "webhooks: deleted %d deliveries that ended more than %s ago",
                            pruned,
                            human_duration(settings.keep_deliveries),
                        )
                self._sweep_outage.ok()
            except Exception as exc:
                if not self._sweep_outage.failed(exc):
                    log.exception("webhooks: sweep failed")
            await asyncio.sleep(settings.sweep_interval)

    async def _deliver_loop(self, client: httpx.AsyncClient) -> None:
        settings = self.settings
        while True:
            self._wake.clear()
            room = settings.concurrency - len(self._in_flight)
            claimed: list[Due] = []
            try:
                # No webhook at all (as of a few seconds ago): nothing can be due.  (Inside
                # the try: reading the webhooks fails too while the database is unreachable,
                # and this loop must outlive that.)
                if room > 0 and (await self._subscriptions()):
                    busy = Counter(self._in_flight.values())
                    claimed = await asyncio.to_thread(
                        self.store.due, room, busy=busy, per_webhook=settings.per_webhook
                    )
                self._deliver_outage.ok()
            except Exception as exc:
                if not self._deliver_outage.failed(exc):
                    log.exception("webhooks: could not read the outbox")
            for due in claimed:
                task = asyncio.create_task(self._attempt(client, due))
                self._in_flight[task] = due.webhook_id
                task.add_done_callback(self._done)
            # Woken by a new event, an attempt that ended, or the next poll for retries.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(1.0, settings.retry_initial))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wake.set()

    async def _attempt(self, client: httpx.AsyncClient, due: Due) -> None:
        settings = self.settings
        ok, code, error = False, None, None
        final = False
        try:
            check_url(due.url, settings.allow_http_hosts)
            secret = self.store.open_secret(due)
        except (WebhookError, SecretKeyMismatch) as exc:
            error, final = str(exc), True
        else:
            try:
                ok, code, error = await self._post(client, due, secret)
            except asyncio.CancelledError:
                # The server is stopping: hand the delivery back now rather than leave it
                # claimed for the lease (a blocking call, at shutdown only, and short).
                with contextlib.suppress(Exception):
                    self.store.release(due)
                raise
        attempts = due.attempts + 1
        next_at = None
        if not ok and not final:
            wait = backoff(attempts, settings)
            if time.time() + wait <= due.created_at + settings.max_age:
                next_at = time.time() + wait
        where = f"webhook {due.webhook_id} ({host_of(due.url)})"
        if ok:
            self.delivered += 1
            log.debug("%s: delivered %s %s", where, due.event, due.delivery_id)
        else:
            self.failed_attempts += 1
            if next_at is None:
                log.warning(
                    "%s: gave up on %s %s after %d attempts: %s",
                    where,
                    due.event,
                    due.delivery_id,
                    attempts,
                    error,
                )
            else:
                log.info(
                    "%s: attempt %d of %s failed (%s); next in %s",
                    where,
                    attempts,
                    due.delivery_id,
                    error,
                    human_duration(next_at - time.time()),
                )
        try:
            await asyncio.to_thread(
                self.store.record_attempt,
                due,
                ok=ok,
                status_code=code,
                error=error,
                next_attempt_at=next_at,
            )
        except Exception as exc:
            # The claim's lease runs out and the delivery is attempted again.
            if not self._deliver_outage.failed(exc):
                log.exception("webhooks: could not record an attempt of %s", due.delivery_id)

    async def _post(
        self, client: httpx.AsyncClient, due: Due, secret: str
    ) -> tuple[bool, int | None, str | None]:
        """One POST; (delivered, status code, error)."""
        import httpx

        body = due.payload.encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            SIGNATURE_HEADER: signature(secret, timestamp, body),
            TIMESTAMP_HEADER: timestamp,
            DELIVERY_HEADER: due.delivery_id,
            EVENT_HEADER: due.event,
        }
        limit = self.settings.max_response_bytes
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with client.stream("POST", due.url, content=body, headers=headers) as resp:
                    head = b""
                    async for chunk in resp.aiter_raw():
                        head += chunk[: limit - len(head)]
                        if len(head) >= limit:
                            break
        except TimeoutError:
            return False, None, f"no complete answer within {self.settings.timeout:g} s"
        except httpx.HTTPError as exc:
            return False, None, _transport_error(exc)
        code = resp.status_code
        if 200 <= code < 300:
            return True, code, None
        text = head[:200].decode("utf-8", "replace")
        text = "".join(ch if _printable(ch) else " " for ch in text).strip()
        if 300 <= code < 400:
            return False, code, f"HTTP {code}: redirects are not followed; use the final URL"
        return False, code, f"HTTP {code}" + (f": {text}" if text else "")

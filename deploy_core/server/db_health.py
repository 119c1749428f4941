"""Whether this replica reaches its database, and what it does when it does not (issue 15
item 6; docs/cluster.md, "When PostgreSQL is unreachable").

- **Noticed in seconds.**  :func:`~deploy_core.server.db.make_engine` gives PostgreSQL
  connections a connect timeout and TCP keepalives; :meth:`DbHealth.watch` adds a breaker on
  new connections: once one failed, one attempt at a time goes to the database (at most one
  per :attr:`DbHealth.retry_interval`) and the others fail at once, so a dead database does
  not fill the worker threads with connection attempts.
- **Answered, never hung.**  :class:`OutageGuard` (around the token check) and the Starlette
  handler of :func:`outage_response` turn a database outage into ``503`` with the project's
  error shape (``{"error": ..., "detail": {...}}``) and a ``Retry-After``, on every route.
- **Fenced.**  A replica whose every database call has failed for longer than its lease
  period (:data:`~deploy_core.server.leases.LEASE_SECONDS`: its duties went to others by
  then) is *fenced*: it refuses new work (:meth:`DbHealth.refuse_new_work`, ``503``), says so
  in its metrics (``deploy_center_database_fenced``) and logs once on entering and once on
  leaving; it resumes by itself as soon as a statement succeeds again.  The clock is the last
  statement the database answered (any: the heartbeat loop, server/heartbeats.py, makes one
  every few seconds), and a replica is fenced only if a call failed since then, so a quiet
  replica with a long heartbeat interval is never fenced for being quiet.
- **Health for load balancers.**  ``GET /healthz`` (public, like ``/openapi.json``) answers
  ``200 {"ok": true, "server_id": ...}`` while the database answers and the replica is not
  fenced, else ``503`` with the reason; the probe (``SELECT 1``) is shared and cached for
  :attr:`DbHealth.probe_every` seconds, so a flood of probes is one query a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

#: The load balancers' health route (public).
HEALTH_PATH = "/healthz"
#: What a 503 asks the caller to wait before trying again (seconds).
RETRY_AFTER = 5
#: Connection attempts at most one per this many seconds once one failed.
RETRY_INTERVAL = 1.0
#: How long a health probe's answer is reused (seconds).
PROBE_EVERY = 1.0
#: How long a health probe waits for the database before it says "no answer".
PROBE_TIMEOUT = 3.0
#: An outage's details are logged at most once per this many seconds.
LOG_EVERY = 10.0
#: How the breaker's refusals begin (they are not the outage's cause).
NOT_TRIED = "not tried: "


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached or lost the connection (not a
    bug in a statement: an integrity or programming error is not an outage)."""
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.TimeoutError)  # no pooled connection came free in time


def describe_error(exc: BaseException) -> str:
    """The driver's first line about ``exc``, for one log line (it may name the database
    host; the driver's own text often runs over several lines)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}".rstrip(": ")


class OutageLog:
    """What one background loop logs while the database is unreachable: one line (no
    traceback) at the first failed pass, at most one more every :data:`LOG_EVERY` seconds
    while the outage lasts, and one line when a pass works again.  Anything that is not an
    outage is left to the caller, which logs it with its traceback::

        try:
            await one_pass()
        except Exception as exc:
            if not outage.failed(exc):
                log.exception("watchdog pass failed")
        else:
            outage.ok()
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        every: float = LOG_EVERY,
        clock: Callable[[], float] = time.monotonic,
        outage: Callable[[BaseException], bool] = is_outage,
        failures: str = "passes failed",
    ) -> None:
        """:param what: the loop's name, which begins its lines (``"watchdog"``).
        :param outage: whether an error means the database is unreachable (the loops on
        SQLAlchemy use :func:`is_outage`; the cluster bus also counts its driver's own).
        :param failures: what the count of failures is called in the lines."""
        if not every > 0:
            raise ValueError(f"every must be more than 0 seconds, not {every!r}")
        self.logger = logger
        self.what = what
        self.every = every
        self.clock = clock
        self.is_outage = outage
        self.failures_are = failures
        #: When the current outage began for this loop (``None``: not in one).
        self.since: float | None = None
        #: Passes failed by the current outage.
        self.failures = 0
        self._logged_at = -math.inf

    def failed(self, exc: BaseException) -> bool:
        """A pass failed with ``exc``: an outage is counted and logged (see the class's
        text); returns whether it was one (``False``: the caller logs ``exc``)."""
        if not self.is_outage(exc):
            return False
        now = self.clock()
        if self.since is None:
            self.since, self.failures = now, 0
        self.failures += 1
        if now - self._logged_at >= self.every:
            self._logged_at = now
            if self.failures == 1:
                self.logger.warning(
                    "%s: the database is unreachable (%s); trying again, logged at most "
                    "every %g s until it answers",
                    self.what,
                    describe_error(exc),
                    self.every,
                )
            else:
                self.logger.warning(
                    "%s: the database is still unreachable after %.0f s, %d %s (%s)",
                    self.what,
                    now - self.since,
                    self.failures,
                    self.failures_are,
                    describe_error(exc),
                )
        return True

    def ok(self) -> None:
        """A pass worked: logs the end of an outage, once."""
        if self.since is None:
            return
        self.logger.info(
            "%s: the database answers again (unreachable for %.0f s, %d %s)",
            self.what,
            self.clock() - self.since,
            self.failures,
            self.failures_are,
        )
        self.since, self.failures, self._logged_at = None, 0, -math.inf


class DatabaseUnavailable(Exception):
    """The replica refuses a request because of its database: answered with ``503``."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class DbHealth:
    """One replica's view of its database (see the module's text)."""

    def __init__(
        self,
        engine: Engine,
        *,
        server_id: str,
        fence_after: float,
        clock: Callable[[], float] = time.monotonic,
        retry_interval: float = RETRY_INTERVAL,
        probe_every: float = PROBE_EVERY,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        """:param fence_after: seconds without an answer from the database before the
        replica is fenced (its lease period)."""
        if not fence_after > 0:
            raise ValueError(f"fence_after must be more than 0 seconds, not {fence_after!r}")
        self.engine = engine
        self.server_id = server_id
        self.fence_after = fence_after
        self.clock = clock
        self.retry_interval = retry_interval
        self.probe_every = probe_every
        self.probe_timeout = probe_timeout
        self.last_ok = clock()
        self.last_failure: float | None = None
        self.last_error: str | None = None
        self._fenced = False
        self._logged_at = -math.inf
        self._down_since: float | None = None  # "database unreachable" logged since then
        self._lock = threading.Lock()
        self._connect_failed_at: float | None = None
        self._trial = False
        self._probe: asyncio.Task[None] | None = None
        self._probed: tuple[float, str | None] | None = None

    # ------------------------------------------------------------------ what happened

    def reached(self) -> None:
        """The database answered a statement just now (the heartbeat pass says so); the end
        of a logged outage is logged once."""
        self.last_ok = self.clock()
        if self._down_since is not None:
            log.info(
                "database answers again (unreachable for %.0f s)", self.last_ok - self._down_since
            )
            self._down_since = None

    def failed(self, exc: BaseException) -> bool:
        """A database call failed with ``exc``; an outage is remembered and logged (at most
        once per :data:`LOG_EVERY` seconds), anything else is left to its caller.  Returns
        whether it was an outage."""
        if not is_outage(exc):
            return False
        now = self.clock()
        self.last_failure = now
        if not str(getattr(exc, "orig", exc)).startswith(NOT_TRIED) or self.last_error is None:
            self.last_error = describe_error(exc)
        if self._down_since is None:
            self._down_since = now
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.warning("database unreachable: %s", self.last_error)
        return True

    def watch(self) -> None:
        """Follow every statement of the engine (answered or failed), and put the breaker on
        its new PostgreSQL connections."""
        engine = self.engine

        @sa.event.listens_for(engine, "after_cursor_execute")
        def _answered(*_args: Any) -> None:
            self.last_ok = self.clock()

        @sa.event.listens_for(engine, "handle_error")
        def _error(context: Any) -> None:
            if context.is_pre_ping:
                return  # a stale pooled connection: the pool connects again, and that counts
            self.failed(context.sqlalchemy_exception or context.original_exception)

        if engine.dialect.name == "postgresql":
            sa.event.listen(engine, "do_connect", self._connect)

    def _connect(self, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        """New connections once one failed: one attempt at a time, at most one per
        :attr:`retry_interval`; the others fail at once with the driver's own error."""
        with self._lock:
            failed_at = self._connect_failed_at
            if failed_at is not None:
                if self._trial or self.clock() - failed_at < self.retry_interval:
                    raise dialect.loaded_dbapi.OperationalError(
                        f"{NOT_TRIED}the database did not answer "
                        f"{self.clock() - failed_at:.1f} s ago (one attempt per "
                        f"{self.retry_interval:g} s while it is unreachable)"
                    )
                self._trial = True
        try:
            conn = dialect.connect(*cargs, **cparams)
        except Exception:
            with self._lock:
                self._connect_failed_at = self.clock()
                self._trial = False
            raise
        with self._lock:
            self._connect_failed_at = None
            self._trial = False
        return conn

    # ------------------------------------------------------------------ what it means

    def unreachable_for(self) -> float:
        """Seconds since the database last answered, when a call failed since (else 0)."""
        if self.last_failure is None or self.last_failure < self.last_ok:
            return 0.0
        return max(0.0, self.clock() - self.last_ok)

    def check(self) -> bool:
        """Whether the replica is fenced now; logs the change when it is one."""
        silent = self.unreachable_for()
        fenced = silent > self.fence_after
        if fenced != self._fenced:
            self._fenced = fenced
            if fenced:
                log.error(
                    "server %s is fenced: no answer from its database for %.0f s (more than "
                    "its %g s lease); it refuses new work until the database answers (%s)",
                    self.server_id,
                    silent,
                    self.fence_after,
                    self.last_error,
                )
            else:
                log.warning(
                    "server %s is no longer fenced: its database answers again", self.server_id
                )
        return fenced

    def fenced_reason(self) -> str | None:
        """Why new work is refused, or ``None`` while the replica is not fenced."""
        if not self.check():
            return None
        return (
            f"this replica has not reached its database for {self.unreachable_for():.0f} s "
            f"(more than its {self.fence_after:g} s lease); send the request to another "
            "replica or try again later"
        )

    def refuse_new_work(self) -> None:
        """Raise :class:`DatabaseUnavailable` while the replica is fenced."""
        reason = self.fenced_reason()
        if reason is not None:
            raise DatabaseUnavailable(reason, self._detail(fenced=True))

    def _detail(self, *, fenced: bool) -> dict[str, Any]:
        return {
            "server_id": self.server_id,
            "fenced": fenced,
            "unreachable_seconds": round(self.unreachable_for(), 1),
        }

    # ------------------------------------------------------------------ the health probe

    async def probe(self) -> str | None:
        """Why this replica should get no traffic now (``None``: it may): the database did
        not answer ``SELECT 1`` or the replica is fenced.  One probe at a time, its answer
        reused for :attr:`probe_every` seconds."""
        now = self.clock()
        if self._probed is not None and now - self._probed[0] < self.probe_every:
            return self._probed[1] or self.fenced_reason()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(asyncio.to_thread(self._select_one))
        reason: str | None = None
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), self.probe_timeout)
        except TimeoutError:
            reason = f"the database did not answer within {self.probe_timeout:g} s"
        except Exception as exc:
            if not is_outage(exc):
                log.exception("the health probe failed")
            reason = "the database is unreachable"
        self._probed = (self.clock(), reason)
        return reason or self.fenced_reason()

    def _select_one(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))


def refuse_if_fenced(health: DbHealth | None) -> None:
    """Raise :class:`DatabaseUnavailable` (``503``) when the replica is fenced: the start of
    every handler that takes new work (deploy, rollback, rollout)."""
    if health is not None:
        health.refuse_new_work()


# --------------------------------------------------------------------------- HTTP


def outage_response(health: DbHealth | None, exc: BaseException) -> Response:
    """The ``503`` answer to a request that met a database outage or a fenced replica."""
    if isinstance(exc, DatabaseUnavailable):
        message, detail = exc.message, exc.detail
    else:
        if health is not None:
            health.failed(exc)
        message = (
            "the server cannot reach its database; try again in a few seconds (the server "
            "log says why)"
        )
        detail = health._detail(fenced=health.check()) if health is not None else {}
    return JSONResponse(
        {"error": message, "detail": detail},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER)},
    )


class OutageGuard:
    """ASGI middleware: ``503`` for a database outage met before the answer began (the token
    check reads the database too, before any route runs)."""

    def __init__(self, app: ASGIApp, health: Callable[[], DbHealth | None]) -> None:
        """:param health: the replica's :class:`DbHealth` (``None`` before it started)."""
        self.app = app
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started or not (is_outage(exc) or isinstance(exc, DatabaseUnavailable)):
                raise
            await outage_response(self.health(), exc)(scope, receive, send)


async def health_response(health: DbHealth | None) -> Response:
    """The answer of ``GET /healthz`` (a route of the app, public, in the OpenAPI document):
    ``200 {"ok": true, "server_id"}``, or ``503`` with ``Retry-After``, the reason and the
    outage's detail."""
    if health is None:
        return JSONResponse(
            {"ok": False, "error": "the server is starting"},
            503,
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    if (reason := await health.probe()) is not None:
        return JSONResponse(
            {
                "ok": False,
                "server_id": health.server_id,
                "error": reason,
                "detail": health._detail(fenced=health.check()),
            },
            503,
            headers={"Retry-After": str(RETRY_AFTER)},
        )
    return JSONResponse({"ok": True, "server_id": health.server_id})

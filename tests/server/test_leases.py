"""Duty leases with an injected clock, on SQLite and PostgreSQL: who holds when, renewal,
expiry, release, a failed renewal, and the compare-and-set under threads racing for one
duty."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deploy_core.server import leases
from deploy_core.server.db import make_engine, upgrade
from deploy_core.server.leases import Leases


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_one_holder_until_expiry_then_the_other(engine: Engine) -> None:
    clock = Clock()
    a = Leases(engine, "a", ["watchdog"], seconds=15, clock=clock)
    b = Leases(engine, "b", ["watchdog"], seconds=15, clock=clock)
    assert a.try_all() == ["watchdog"] and a.holds("watchdog")
    clock.now += 1
    assert b.try_all() == [] and not b.holds("watchdog")
    # A believes it holds until 15 s after the clock reading before its statement, no longer.
    clock.now = 1014.999
    assert a.holds("watchdog")
    assert b.try_all() == []  # the row has not expired either
    clock.now = 1015.0
    assert not a.holds("watchdog")
    assert b.try_all() == []  # expires_at < now: exactly at expiry it is not free yet
    clock.now = 1015.001
    assert b.try_all() == ["watchdog"]
    assert a.try_all() == [] and not a.holds("watchdog")  # A comes back: B keeps it
    with engine.connect() as conn:
        assert leases.current(conn, clock.now) == {
            "watchdog": {"holder": "b", "expires_at": pytest.approx(1030.001)}
        }


def test_renewal_extends_and_keeps_the_lease(engine: Engine) -> None:
    clock = Clock()
    a = Leases(engine, "a", ["watchdog", "retention"], seconds=10, clock=clock)
    b = Leases(engine, "b", ["watchdog", "retention"], seconds=10, clock=clock)
    assert a.try_all() == ["watchdog", "retention"]
    for _ in range(5):  # renewed every 2.5 s (seconds / 4), as keep() does
        clock.now += 2.5
        assert a.try_all() == ["watchdog", "retention"]
        assert b.try_all() == []
    assert a.held() == ["watchdog", "retention"] and b.held() == []
    clock.now += 10.001  # A stopped renewing (dead): both move to B after one lease period
    assert b.try_all() == ["watchdog", "retention"]


def test_release_hands_over_at_once_and_only_its_own(engine: Engine) -> None:
    clock = Clock()
    a = Leases(engine, "a", ["watchdog"], seconds=15, clock=clock)
    b = Leases(engine, "b", ["retention", "watchdog"], seconds=15, clock=clock)
    assert a.try_all() == ["watchdog"]
    assert b.try_all() == ["retention"]
    b.release_all()  # B's release must not free A's watchdog
    assert b.held() == []
    assert Leases(engine, "c", ["watchdog"], clock=clock).try_all() == []
    a.release_all()
    assert not a.holds("watchdog")
    assert b.try_all() == ["retention", "watchdog"]


def test_a_failed_renewal_keeps_only_what_the_last_success_allows(engine: Engine) -> None:
    clock = Clock()
    a = Leases(engine, "a", ["watchdog"], seconds=15, clock=clock)
    assert a.try_all() == ["watchdog"]
    clock.now += 5
    broken = Leases(sa.create_engine("sqlite:///file:nowhere?mode=ro&uri=true"), "a", ["watchdog"])
    a.engine = broken.engine  # the database is unreachable for this try
    assert a.try_all() == ["watchdog"]  # still within the first lease
    clock.now = 1015.0
    assert a.try_all() == []  # and not a moment past it
    broken.engine.dispose()


def test_a_lease_lasts_more_than_zero_seconds(engine: Engine) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="more than 0 seconds"):
            Leases(engine, "a", ["watchdog"], seconds=bad)


def test_racing_takers_one_wins_each_round(engine: Engine) -> None:
    """Eight threads try the same expired lease at once, many rounds: exactly one wins each."""

    def take(name: str, now: float, barrier: threading.Barrier, wins: list[str]) -> None:
        barrier.wait()
        with engine.begin() as conn:
            if leases.acquire(conn, "watchdog", name, 15, now):
                wins.append(name)

    for round_ in range(20):
        now = 2000.0 + round_ * 100  # every round starts after the last lease expired
        wins: list[str] = []
        barrier = threading.Barrier(8, timeout=60)
        threads = [
            threading.Thread(target=take, args=(f"s{n}", now, barrier, wins)) for n in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(wins) == 1, (round_, wins)

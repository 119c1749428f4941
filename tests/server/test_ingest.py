"""The ingest's group commit (server/ingest.py) on a real database, SQLite and PostgreSQL:
many pieces in one transaction, a failing piece alone, nothing answered before its commit,
and what close() does with what is queued.

The writer is held at its transaction by :class:`Gate` (no test waits for a time): work
queued while it is held goes into the next transaction together.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from ingest_gate import WAIT, Gate, queued
from sqlalchemy.engine import Connection

from deploy_core.models import DeployCallbackPayload, DeployStatus, DeployStatusReport, LogLine
from deploy_core.server.db import make_engine, status_history, upgrade
from deploy_core.server.ingest import Ingest, IngestClosed
from deploy_core.server.records import RecordStore

SHELL = "deploy.shell"


@pytest_asyncio.fixture
async def store(db_url: str) -> AsyncIterator[RecordStore]:
    engine = make_engine(db_url)
    await asyncio.to_thread(upgrade, engine)
    yield RecordStore(engine, server_id="s1")
    engine.dispose()


@pytest_asyncio.fixture
async def ingest(store: RecordStore) -> AsyncIterator[Ingest]:
    writer = Ingest(store.engine, stats_every=None)
    writer.start()
    yield writer
    await writer.close()


def create(store: RecordStore, deploy_id: str, client_id: str) -> None:
    store.create_deployment(
        deploy_id=deploy_id,
        client_id=client_id,
        command_type=SHELL,
        request={"params": {"script": "true"}},
        deadline=time.time() + 600,
    )


def report(deploy_id: str, seq: int, message: str = "") -> DeployStatusReport:
    return DeployStatusReport(
        deploy_id=deploy_id,
        command_type=SHELL,
        status=DeployStatus.SCRIPT_RUNNING,
        progress=min(seq, 100),
        stage="script_running",
        message=message or f"report {seq}",
        seq=seq,
    )


def applying(store: RecordStore, client_id: str, rep: DeployStatusReport) -> Callable[..., Any]:
    return lambda conn: store.apply_report_in(conn, client_id, rep)


def agent_lines(store: RecordStore, deploy_id: str) -> list[tuple[int | None, str]]:
    """The agent's reports in the history (callbacks have no ``seq``)."""
    history = store.history(deploy_id)
    return [(h.seq, h.message) for h in history if h.seq is not None]


async def test_many_clients_reports_land_in_order_once_in_shared_transactions(
    store: RecordStore, ingest: Ingest
) -> None:
    clients, reports = 40, 12
    for n in range(clients):
        await asyncio.to_thread(create, store, f"d{n}", f"c{n}")
    await asyncio.to_thread(create, store, "plug", "plug")
    gate = Gate(ingest)
    plug = asyncio.ensure_future(ingest.submit(applying(store, "plug", report("plug", 0))))
    await gate.wait_arrived()

    async def agent(n: int) -> list[bool]:
        applied = []
        for seq in range(reports):
            result = await ingest.submit(applying(store, f"c{n}", report(f"d{n}", seq)))
            applied.append(result.applied)
        # A resend of an old report and a callback, then the callback again.
        old = await ingest.submit(applying(store, f"c{n}", report(f"d{n}", 3, "resent")))
        callback = DeployCallbackPayload(
            callback_id=f"d{n}",
            command_type=SHELL,
            deploy_type="shell",
            status=DeployStatus.SUCCESS,
            success=True,
        )
        first = await ingest.submit(lambda conn: store.finish_in(conn, f"c{n}", callback))
        again = await ingest.submit(lambda conn: store.finish_in(conn, f"c{n}", callback))
        return [*applied, old.applied, first.applied, again.applied]

    agents = asyncio.gather(*(agent(n) for n in range(clients)))
    await queued(ingest, clients)  # every agent's first report waits behind the plug
    gate.open()
    results = await asyncio.wait_for(agents, WAIT)
    await plug

    for n, applied in enumerate(results):
        assert applied == [True] * reports + [False, True, False], n
        assert agent_lines(store, f"d{n}") == [(seq, f"report {seq}") for seq in range(reports)]
        finishes = [h for h in store.history(f"d{n}") if h.status == "success"]
        assert len(finishes) == 1, n  # the repeated callback changed nothing
        record = store.get(f"d{n}")
        assert record is not None and record.status == "success"
        assert record.last_seq == reports - 1
    # Every finish released its client in its transaction (the plug never finished).
    assert [lock.client_id for lock in store.locks()] == ["plug"]
    total = clients * (reports + 3) + 1
    assert ingest.stats.committed == sum(gate.batches) == total and ingest.stats.failed == 0
    # The agents' first reports, queued behind the plug, went in one transaction.
    assert gate.batches[:2] == [1, clients]
    assert ingest.stats.batches == len(gate.batches) < total


async def test_a_piece_failing_mid_batch_fails_alone(store: RecordStore, ingest: Ingest) -> None:
    for n in range(4):
        await asyncio.to_thread(create, store, f"d{n}", f"c{n}")
    gate = Gate(ingest)
    plug = asyncio.ensure_future(ingest.submit(applying(store, "c0", report("d0", 0))))
    await gate.wait_arrived()

    def broken(conn: Connection) -> None:
        store.apply_report_in(conn, "c2", report("d2", 0))  # its writes are rolled back
        raise RuntimeError("disk on fire")

    pieces = [
        applying(store, "c1", report("d1", 0)),
        broken,
        applying(store, "c3", report("d3", 0)),
        applying(store, "c1", report("d1", 1)),
    ]
    futures = [asyncio.ensure_future(ingest.submit(piece)) for piece in pieces]
    await queued(ingest, len(pieces))
    gate.open()
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
    await plug

    assert isinstance(outcomes[1], RuntimeError) and "disk on fire" in str(outcomes[1])
    assert [o.applied for i, o in enumerate(outcomes) if i != 1] == [True, True, True]
    assert gate.batches == [1, 4, 1, 1, 1, 1]  # the batch of 4, then each piece alone
    assert ingest.stats.fallbacks == 1 and ingest.stats.failed == 1
    assert agent_lines(store, "d1") == [(0, "report 0"), (1, "report 1")]
    assert agent_lines(store, "d3") == [(0, "report 0")]
    assert agent_lines(store, "d2") == []  # nothing of the failed piece stayed
    record = store.get("d2")
    assert record is not None and record.last_seq == -1


async def test_nothing_is_answered_before_its_transaction_commits(
    store: RecordStore, ingest: Ingest
) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")
    gate = Gate(ingest)
    answer = asyncio.ensure_future(ingest.submit(applying(store, "c0", report("d0", 0))))
    await gate.wait_arrived()  # the writer holds it, its transaction not begun
    for _ in range(20):
        await asyncio.sleep(0)
    assert not answer.done()
    assert agent_lines(store, "d0") == []
    gate.open()
    assert (await asyncio.wait_for(answer, WAIT)).applied
    assert agent_lines(store, "d0") == [(0, "report 0")]


async def test_what_is_queued_in_the_next_turn_joins_the_first_piece_s_transaction(
    store: RecordStore, ingest: Ingest
) -> None:
    # The messages of one datagram (an agent's command ACK, its reports, its callback) are
    # queued over a turn or two of the loop; the idle writer waits one turn before it takes
    # its batch, so they share one transaction.
    await asyncio.to_thread(create, store, "d0", "c0")
    batches = ingest.stats.batches

    async def next_turn() -> Any:
        await asyncio.sleep(0)  # queued after the writer was woken by the first
        return await ingest.submit(applying(store, "c0", report("d0", 1)))

    first = asyncio.ensure_future(ingest.submit(applying(store, "c0", report("d0", 0))))
    second = asyncio.ensure_future(next_turn())
    assert (await asyncio.wait_for(first, WAIT)).applied
    assert (await asyncio.wait_for(second, WAIT)).applied
    assert ingest.stats.batches == batches + 1
    assert agent_lines(store, "d0") == [(0, "report 0"), (1, "report 1")]


async def test_a_failed_commit_answers_with_the_error_and_stores_nothing(
    store: RecordStore, ingest: Ingest
) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")

    def violates(conn: Connection) -> None:
        store.apply_report_in(conn, "c0", report("d0", 0))
        row = {"deploy_id": "no-such-deployment", "status": "x", "source": "agent", "ts": 0.0}
        conn.execute(status_history.insert().values(**row))  # a foreign key it breaks

    with pytest.raises(sa.exc.IntegrityError):
        await asyncio.wait_for(ingest.submit(violates), WAIT)
    assert agent_lines(store, "d0") == []
    # The writer goes on.
    assert (await ingest.submit(applying(store, "c0", report("d0", 0)))).applied


async def test_close_commits_what_is_queued_and_refuses_more(
    store: RecordStore, ingest: Ingest
) -> None:
    for n in range(3):
        await asyncio.to_thread(create, store, f"d{n}", f"c{n}")
    gate = Gate(ingest)
    futures = [asyncio.ensure_future(ingest.submit(applying(store, "c0", report("d0", 0))))]
    await gate.wait_arrived()  # held with the first; the others queue behind it
    futures += [
        asyncio.ensure_future(ingest.submit(applying(store, f"c{n}", report(f"d{n}", 0))))
        for n in (1, 2)
    ]
    await queued(ingest, 2)
    closing = asyncio.ensure_future(ingest.close())
    for _ in range(20):
        await asyncio.sleep(0)
    with pytest.raises(IngestClosed):
        await ingest.submit(applying(store, "c0", report("d0", 1)))
    gate.open()
    await asyncio.wait_for(closing, WAIT)
    assert all(f.result().applied for f in futures)
    for n in range(3):
        assert agent_lines(store, f"d{n}") == [(0, "report 0")]


async def test_foreign_and_unknown_deployments_change_nothing(
    store: RecordStore, ingest: Ingest
) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")
    assert (await ingest.submit(applying(store, "intruder", report("d0", 0)))).record is None
    assert (await ingest.submit(applying(store, "c0", report("nope", 0)))).record is None
    assert not await ingest.submit(lambda conn: store.mark_acked_in(conn, "intruder", "d0"))
    assert await ingest.submit(lambda conn: store.mark_acked_in(conn, "c0", "d0"))
    record = store.get("d0")
    assert record is not None and record.last_seq == -1 and record.acked_at is not None


def test_bad_limits_are_refused(store: RecordStore) -> None:
    for kwargs in ({"max_batch": 0}, {"max_queued": 0}, {"linger": -1.0}):
        with pytest.raises(ValueError):
            Ingest(store.engine, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reports_applied_together_give_what_one_by_one_gives(db_url: str, seed: int) -> None:
    """apply_reports_in (one read, one UPDATE, one INSERT for many) against apply_report_in
    for each, on twin deployments: duplicates, old and out-of-order seqs, other clients',
    unknown and finished deployments, logs past the byte limit."""
    engine = make_engine(db_url)
    upgrade(engine)
    store = RecordStore(engine, server_id="s1", max_log_bytes=300)
    rng = random.Random(seed)
    try:
        for n in range(5):
            for world in "ab":
                create(store, f"{world}{n}", f"{world}-c{n}")
        for world in "ab":  # one finished before the reports come
            done = DeployCallbackPayload(
                callback_id=f"{world}4", command_type=SHELL, deploy_type="shell",
                status=DeployStatus.FAILED, success=False,
            )  # fmt: skip
            store.finish(f"{world}-c4", done)
        items = []
        for _ in range(80):
            n = rng.randrange(6)  # 5: a deployment nobody has
            owner = rng.random() < 0.85
            seq = rng.randrange(12)
            lines = [LogLine(line="x" * rng.randrange(1, 60)) for _ in range(rng.randrange(3))]
            items.append((n, owner, seq, lines))

        def item(world: str, n: int, owner: bool, seq: int, lines: list[LogLine]) -> Any:
            client = f"{world}-c{n if owner else (n + 1) % 5}"
            rep = report(f"{world}{n}", seq).model_copy(update={"logs": lines})
            return client, rep

        one_by_one = [store.apply_report(*item("a", *i)) for i in items]
        with engine.begin() as conn:
            together = store.apply_reports_in(conn, [item("b", *i) for i in items])

        def same(applied: Any) -> tuple[Any, ...]:
            rec = applied.record
            view = None
            if rec is not None:
                view = tuple(getattr(rec, k) for k in ("status", "stage", "progress", "last_seq",
                                                       "log_bytes", "log_truncated"))  # fmt: skip
            return applied.applied, applied.previous, view

        assert [same(x) for x in one_by_one] == [same(x) for x in together]
        for n in range(5):
            a, b = store.get(f"a{n}"), store.get(f"b{n}")
            assert a is not None and b is not None
            keys = ("status", "stage", "progress", "last_seq", "log_bytes", "log_truncated")
            assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys], n
            history = [
                [(h.seq, h.status, h.stage, h.progress, h.message, h.source)
                 for h in store.history(f"{world}{n}")]
                for world in "ab"
            ]  # fmt: skip
            assert history[0] == history[1], n
            logs = [[line.line for line in store.logs(f"{w}{n}")] for w in "ab"]
            assert logs[0] == logs[1], n
        assert any(x.applied for x in together) and any(x.record is None for x in together)
    finally:
        engine.dispose()


async def test_the_figures_are_logged_for_windows_that_committed_something(
    store: RecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")
    writer = Ingest(store.engine, stats_every=0.05)
    writer.start()
    caplog.set_level("INFO", logger="deploy_core.server.ingest")

    def logged() -> list[int]:
        found = (re.match(r"ingest: (\d+) messages in", r.getMessage()) for r in caplog.records)
        return [int(m[1]) for m in found if m]

    try:
        for seq in range(3):
            await writer.submit_grouped(store.apply_reports_in, ("c0", report("d0", seq)))
        for _ in range(int(WAIT / 0.01)):
            if sum(logged()) >= 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # quiet windows after it: they must log nothing
    finally:
        await writer.close()
    assert sum(logged()) == 3 and 0 not in logged(), logged()
    assert all("p99" in r.getMessage() for r in caplog.records if "ingest:" in r.getMessage())


async def test_a_full_queue_makes_submitters_wait_not_fail(store: RecordStore) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")
    writer = Ingest(store.engine, max_queued=2, max_batch=2, stats_every=None)
    writer.start()
    gate = Gate(writer)
    try:
        first = asyncio.ensure_future(writer.submit_grouped(store.apply_reports_in,
                                                            ("c0", report("d0", 0))))  # fmt: skip
        await gate.wait_arrived()
        later = [
            asyncio.ensure_future(
                writer.submit_grouped(store.apply_reports_in, ("c0", report("d0", seq)))
            )
            for seq in range(1, 6)
        ]
        await queued(writer, 2)
        for _ in range(20):
            await asyncio.sleep(0)
        assert writer.queued == 2 and not any(f.done() for f in later)  # 3 wait for room
        gate.open()
        results = await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
    finally:
        await writer.close()
    assert all(r.applied for r in results)
    assert agent_lines(store, "d0") == [(seq, f"report {seq}") for seq in range(6)]
    assert max(gate.batches) == 2  # never more than max_batch in one transaction


async def test_close_with_submitters_waiting_for_room_leaves_none_hanging(
    store: RecordStore,
) -> None:
    await asyncio.to_thread(create, store, "d0", "c0")
    writer = Ingest(store.engine, max_queued=1, stats_every=None)
    writer.start()
    gate = Gate(writer)
    pieces = [
        asyncio.ensure_future(
            writer.submit_grouped(store.apply_reports_in, ("c0", report("d0", 0)))
        )
    ]
    await gate.wait_arrived()
    pieces += [
        asyncio.ensure_future(
            writer.submit_grouped(store.apply_reports_in, ("c0", report("d0", seq)))
        )
        for seq in (1, 2, 3)
    ]
    await queued(writer, 1)  # one queued, two waiting for room
    closing = asyncio.ensure_future(writer.close())
    for _ in range(20):
        await asyncio.sleep(0)
    gate.open()
    await asyncio.wait_for(closing, WAIT)
    outcomes = await asyncio.wait_for(asyncio.gather(*pieces, return_exceptions=True), WAIT)
    stored = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(isinstance(o, IngestClosed) for o in outcomes if isinstance(o, BaseException))
    assert len(stored) >= 2 and all(o.applied for o in stored)  # the held one and the queued
    assert agent_lines(store, "d0") == [(seq, f"report {seq}") for seq in range(len(stored))]


def _pieces(spec: list[tuple[str, str | None]]) -> list[Any]:
    """Pieces for :func:`regrouped`: (function, key) each; function ``"-"`` is ungrouped."""
    from deploy_core.server.ingest import _Piece

    funcs: dict[str, Any] = {}

    def func(name: str) -> Any:
        return funcs.setdefault(name, lambda conn, args: list(args))

    return [
        _Piece(lambda conn: None, None, 0.0)  # type: ignore[arg-type]
        if name == "-"
        else _Piece(None, None, 0.0, func(name), index, key)  # type: ignore[arg-type]
        for index, (name, key) in enumerate(spec)
    ]


def test_regrouping_gathers_each_function_and_keeps_each_keys_order() -> None:
    from deploy_core.server.ingest import regrouped

    # Three agents, each: report, report, callback; interleaved as a rollout's arrive.
    spec = [("r", "a"), ("r", "b"), ("r", "a"), ("f", "a"), ("r", "b"), ("r", "c")]
    spec += [("f", "b"), ("r", "c"), ("f", "c")]
    order = regrouped(_pieces(spec))
    assert [spec[i][0] for i in order] == ["r"] * 6 + ["f"] * 3
    for key in "abc":
        mine = [i for i in order if spec[i][1] == key]
        assert mine == sorted(mine), key
    # Without keys (or across an ungrouped piece) nothing moves.
    unkeyed = [(name, None) for name, _ in spec]
    assert regrouped(_pieces(unkeyed)) == list(range(len(spec)))
    barrier = [("r", "a"), ("f", "a"), ("-", None), ("r", "b"), ("f", "b"), ("r", "c")]
    assert regrouped(_pieces(barrier)) == [0, 1, 2, 3, 5, 4]


@pytest.mark.parametrize("seed", range(20))
def test_regrouping_random_batches_moves_nothing_it_must_not(seed: int) -> None:
    from deploy_core.server.ingest import regrouped

    rng = random.Random(seed)
    spec = [
        (rng.choice("rfa-") if rng.random() < 0.9 else "r", rng.choice(["a", "b", "c", "d", None]))
        for _ in range(rng.randrange(1, 60))
    ]
    order = regrouped(_pieces(spec))
    assert sorted(order) == list(range(len(spec)))  # each piece once
    position = {index: at for at, index in enumerate(order)}
    for i, (name_i, key_i) in enumerate(spec):
        for j in range(i + 1, len(spec)):
            name_j, key_j = spec[j]
            fixed = name_i == "-" or name_j == "-" or key_i is None or key_j is None
            if fixed or key_i == key_j:
                assert position[i] < position[j], (i, j, spec)


async def test_interleaved_reports_and_callbacks_of_many_agents_take_one_call_each(
    store: RecordStore, ingest: Ingest
) -> None:
    """A rollout's finish: each agent's last report then its callback, interleaved with the
    others'; queued with keys they go in one apply_reports_in and one finish_many_in call,
    each agent's report still before its callback."""
    clients = 30
    for n in range(clients):
        await asyncio.to_thread(create, store, f"d{n}", f"c{n}")
    await asyncio.to_thread(create, store, "plug", "plug")
    calls: dict[str, list[int]] = {"reports": [], "finishes": []}
    apply_reports, finish_many = store.apply_reports_in, store.finish_many_in

    def counted_reports(conn: Connection, items: list[Any]) -> list[Any]:
        calls["reports"].append(len(items))
        return apply_reports(conn, items)

    def counted_finishes(conn: Connection, items: list[Any]) -> list[Any]:
        calls["finishes"].append(len(items))
        return finish_many(conn, items)

    gate = Gate(ingest)
    plug = asyncio.ensure_future(ingest.submit(applying(store, "plug", report("plug", 0))))
    await gate.wait_arrived()
    futures = []
    for n in range(clients):
        client = f"c{n}"
        futures.append(
            await ingest.queue_grouped(
                counted_reports, (client, report(f"d{n}", 7, "last")), key=client
            )
        )
        callback = DeployCallbackPayload(
            callback_id=f"d{n}", command_type=SHELL, deploy_type="shell",
            status=DeployStatus.SUCCESS, success=True,
        )  # fmt: skip
        futures.append(await ingest.queue_grouped(counted_finishes, (client, callback), key=client))
    gate.open()
    results = await asyncio.wait_for(asyncio.gather(*futures), WAIT)
    await plug
    assert calls == {"reports": [clients], "finishes": [clients]}
    assert all(result.applied for result in results)
    for n in range(clients):
        record = store.get(f"d{n}")
        assert record is not None and record.status == "success" and record.last_seq == 7
        statuses = [h.message for h in store.history(f"d{n}")]
        assert statuses.index("last") < len(statuses) - 1  # the report went in before the end


@pytest.mark.parametrize("senders", [1, 2])
async def test_the_writer_lingers_only_when_several_senders_wait(
    store: RecordStore, monkeypatch: pytest.MonkeyPatch, senders: int
) -> None:
    """Pieces queued during a transaction: of one agent (its last report, then its callback)
    they go at once, of several the writer lingers for more (a busy fleet)."""
    linger = 0.0173  # a value nothing else sleeps for
    lingered: list[float] = []
    sleep = asyncio.sleep

    async def recording(delay: float, *args: Any, **kwargs: Any) -> Any:
        if delay == linger:
            lingered.append(delay)
        return await sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", recording)
    ingest = Ingest(store.engine, stats_every=None, linger=linger)
    ingest.start()
    try:
        for n in range(2):
            await asyncio.to_thread(create, store, f"d{n}", f"c{n}")
        gate = Gate(ingest)
        first = asyncio.ensure_future(ingest.submit(applying(store, "c0", report("d0", 0))))
        await gate.wait_arrived()  # held in its transaction
        pieces = (
            [("c0", "d0", 1), ("c0", "d0", 2)]
            if senders == 1
            else [("c0", "d0", 1), ("c1", "d1", 0)]
        )
        later = [
            asyncio.ensure_future(
                ingest.submit_grouped(store.apply_reports_in, (client, report(d, seq)), key=client)
            )
            for client, d, seq in pieces
        ]
        await queued(ingest, 2)
        gate.open()
        await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
        assert lingered == ([] if senders == 1 else [linger])
        assert [(seq, line) for seq, line in agent_lines(store, "d0")][:2] == [
            (0, "report 0"),
            (1, "report 1"),
        ]
    finally:
        await ingest.close()

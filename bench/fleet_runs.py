"""The deployments ``bench/fleet.py`` measures: one at a time on one agent, and one to
each of many agents from several POSTing threads; and the workers' refusal counts summed."""

from __future__ import annotations

import os
import re
import statistics
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from fleet_harness import Fleet

from deploy_core.client import DeployClient

WARM_UP = 10


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 (the 99th of 100 quantiles; with few samples, near the largest)."""
    if len(values) < 2:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=100, method="inclusive")[98]


def dispatch_latency(
    api: DeployClient, client_id: str, samples: int, timeout: float
) -> tuple[list[float], list[str]]:
    """Seconds from ``POST /api/deploy/shell`` of ``true`` to the terminal record, one at a
    time (after a few not counted); and what went wrong, if anything."""
    times: list[float] = []
    failures: list[str] = []
    for n in range(WARM_UP + samples):
        started = time.perf_counter()
        try:
            deploy_id = api.deploy("shell", {"client_id": client_id, "script": "true"})["deploy_id"]
            record = api.wait(deploy_id, timeout=timeout)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            if len(failures) >= 3:
                break
            continue
        took = time.perf_counter() - started
        if record.get("status") != "success":
            failures.append(f"deployment {deploy_id} ended {record.get('status')}")
        elif n >= WARM_UP:
            times.append(took)
    return times, failures


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def fan_out(
    fleet: Fleet,
    ids: list[str],
    kind: str,
    body: Callable[[str], dict[str, Any]],
    *,
    threads: int,
    timeout: float,
) -> dict[str, Any]:
    """One ``POST /api/deploy/{kind}`` per agent from ``threads`` threads, then wait for
    all.  Returns the statuses counted, seconds the POSTs took, seconds from the first POST
    to the last ``finished_at`` the server recorded, and a one-line summary."""
    local = threading.local()
    clients: list[DeployClient] = []
    lock = threading.Lock()

    def api() -> DeployClient:
        if not hasattr(local, "api"):
            local.api = DeployClient(fleet.url, fleet.token, timeout=60)
            with lock:
                clients.append(local.api)
        client: DeployClient = local.api
        return client

    def post(client_id: str) -> tuple[str | None, str | None]:
        try:
            return api().deploy(kind, body(client_id))["deploy_id"], None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    deadline = time.monotonic() + timeout

    def wait(deploy_id: str) -> dict[str, Any] | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            record: dict[str, Any] = api().wait(deploy_id, timeout=left)
            return record
        except TimeoutError:
            return None
        except Exception as exc:
            return {"status": f"unknown ({type(exc).__name__})", "error": str(exc)}

    wall, started = time.time(), time.monotonic()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fleet-post")
    try:
        posted = list(pool.map(post, ids))
        posting = time.monotonic() - started
        accepted = [deploy_id for deploy_id, _ in posted if deploy_id]
        records = list(pool.map(wait, accepted))
        observed = time.monotonic() - started
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for client in clients:
            client.close()
    statuses: Counter[str] = Counter()
    statuses["refused at POST"] = sum(1 for deploy_id, _ in posted if deploy_id is None)
    errors = [error for _, error in posted if error][:3]
    finished: list[float] = []
    for record in records:
        statuses[record["status"] if record else "unfinished"] += 1
        if record and (at := _epoch(record.get("finished_at"))) is not None:
            finished.append(at - wall)
        if record and record.get("status") != "success" and record.get("error"):
            errors.append(str(record["error"])[:200])
    statuses = +statuses  # drop the zero counts
    last = max(finished) if finished else None
    shown = ", ".join(f"{n} {status}" for status, n in statuses.most_common())
    summary = (
        f"{shown}; last finished {last:.1f} s after the first POST" if last is not None else shown
    ) + f" (POSTs took {posting:.1f} s, {len(ids) / max(posting, 1e-9):.0f}/s)"
    if errors:
        summary += f"; e.g. {errors[0][:120]!r}"
    return {
        "statuses": dict(statuses),
        "post_s": posting,
        "last_finished_s": last,
        "observed_s": observed,
        "errors": errors[:5],
        "summary": summary,
    }


ROLLOUT_FINAL = ("succeeded", "failed", "aborted", "rolled_back")


def rollout_true(api: DeployClient, ids: list[str], timeout: float) -> dict[str, Any]:
    """``true`` on every agent of ``ids`` through one ``POST /api/rollouts`` with
    ``max_parallel`` = N, polled every 0.5 s by its summary (the newest rollout in the list:
    every target's rendering only at the end): its status, counts, seconds from the POST until
    the poll saw it end (``ended_s``) and until its last target finished (``last_finished_s``),
    and until a tenth, half and nine tenths had finished (``finished_s``)."""
    from datetime import datetime

    posted = time.time()
    answer = api.request(
        "POST",
        "/api/rollouts",
        json={
            "type": "shell",
            "request": {"script": "true"},
            "targets": {"clients": ids},
            "strategy": {"max_parallel": len(ids)},
        },
    )
    end = time.monotonic() + timeout
    summary: dict[str, Any] = {"status": "?"}
    while time.monotonic() < end and summary["status"] not in ROLLOUT_FINAL:
        time.sleep(0.5)
        summary = api.request("GET", "/api/rollouts", params={"limit": 1})["items"][0]
    ended = time.time() - posted
    rollout = api.request("GET", f"/api/rollouts/{answer['rollout_id']}")
    finishes = [
        datetime.fromisoformat(t["finished_at"].replace("Z", "+00:00")).timestamp()
        for b in rollout.get("batches", [])
        for t in b["targets"]
        if t["finished_at"]
    ]
    after = sorted(f - posted for f in finishes)
    return {
        "status": rollout["status"],
        "counts": rollout["counts"],
        "ended_s": ended,
        "last_finished_s": after[-1] if after else float("nan"),
        # Seconds from the POST by which a tenth, half, nine tenths of the targets finished.
        "finished_s": [after[int(p * (len(after) - 1))] for p in (0.1, 0.5, 0.9)] if after else [],
    }


def start_sleeps(api: DeployClient, ids: list[str], seconds: int, timeout: float) -> dict[str, str]:
    """Deploy ``sleep seconds`` on each agent of ``ids`` and wait until every one runs (or
    ended): client id → deployment id.
    :raises RuntimeError: some did not start within ``timeout`` seconds."""
    deploys = {
        cid: api.deploy("shell", {"client_id": cid, "script": f"sleep {seconds}"})["deploy_id"]
        for cid in ids
    }
    waiting, end = set(deploys.values()), time.monotonic() + timeout
    while waiting and time.monotonic() < end:
        for deploy_id in list(waiting):
            record = api.get(deploy_id)
            if record["status"] == "script_running" or record["finished"]:
                waiting.discard(deploy_id)
        time.sleep(0.2)
    if waiting:
        raise RuntimeError(f"{len(waiting)} `sleep` deployments did not start in {timeout:g} s")
    return deploys


def make_package(path: Path, megabytes: int) -> Path:
    """A tar.gz of ``megabytes`` MB of random bytes (so gzip cannot shrink it)."""
    payload = path.with_name("payload.bin")
    with payload.open("wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(1_000_000))
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(payload, arcname="payload.bin")
    payload.unlink()
    return path


def worker_totals(fleet: Fleet) -> dict[str, Any]:
    """What every worker's agents logged so far, summed."""
    totals: dict[str, Any] = {
        "refusals": 0,
        "busy": 0,
        "already_enrolled": 0,
        "connected": 0,
        "refused_ids": [],
        "crashed": [],
        "categories": Counter(),
    }
    for worker in fleet.workers:
        stats = worker.stats()
        for key in ("refusals", "busy", "already_enrolled", "connected"):
            totals[key] += int(stats.get(key, 0))
        totals["refused_ids"] += stats.get("refused_ids", [])
        totals["crashed"] += stats.get("crashed", [])
        totals["categories"].update(stats.get("categories", {}))
    return totals


_FIGURES = re.compile(
    r"ingest: (?P<messages>\d+) messages in (?P<transactions>\d+) transactions .*?"
    r"p50 (?P<p50>[\d.]+) ms, p99 (?P<p99>[\d.]+) ms"
)


def ingest_figures(server_log: Path, offset: int) -> list[dict[str, Any]]:
    """The ingest figures the server logged (server/ingest.py) past ``offset`` of its log."""
    if not server_log.exists():
        return []
    with server_log.open("rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    return [
        {
            "messages": int(m["messages"]),
            "transactions": int(m["transactions"]),
            "p50_ms": float(m["p50"]),
            "p99_ms": float(m["p99"]),
        }
        for m in _FIGURES.finditer(text)
    ]

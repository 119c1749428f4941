"""A package to M agents of the fleet (issue 13 §4), from ``bench/fleet.py --artifact-agents M``:
the same tar.gz deployed to the same M agents once through the server's artifact store (QUIC
file streams from the one server process) and once from a URL source (each agent downloads it
itself from a loopback web server: nginx when installed, else ``python -m http.server``),
in one run, with the ratio between the two.

Run alone, it profiles the server's side of the store's transfer instead::

    python bench/fleet_artifacts.py --profile [--agents 20] [--mb 20] [--procs 2]

starts a fleet (``fleet_harness.Fleet``) whose server runs under ``cProfile`` with a CPU-time
clock (``time.process_time``), switched on by SIGUSR1 once every agent is connected and the
package uploaded and dumped by SIGUSR2 once every agent has it, so only the transfer is
profiled; then prints where the server's CPU went: by part of the stack (aioquic, the
system calls, cryptography, the database …) and the top functions by own and cumulative
time. (The profile follows the main thread, where the event loop and QUIC run; CPU of
other threads lands on whatever the main thread was doing, usually waiting in ``epoll``.)

Or it compares the server's file workers (``deployctl server --file-workers N``)::

    python bench/fleet_artifacts.py --compare-workers 0,1,2 [--agents 20] [--mb 50] [--rounds 1]

one fleet of ``--agents`` agents; for each round and each N in turn, the server is killed
and started again with N file workers, the agents reconnect, and a fresh package (new
bytes, so no agent has it cached) goes to all of them through the store; prints each run's
time, MB/s in all, the server's CPU (its workers included) and RSS peak, and each N's median
MB/s against N = 0. (``bench/fleet.py`` runs its server with ``DEPLOY_CENTER_FILE_WORKERS``
from the environment, so ``DEPLOY_CENTER_FILE_WORKERS=2 python bench/fleet.py
--artifact-agents 100`` measures one setting there.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleet_harness import Fleet, PeakRss, cpu_seconds, free_port, process_tree
from fleet_runs import fan_out, make_package

NGINX_CONF = """\
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
}}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bench/fleet.py``'s options for this part (``--artifact-agents`` turns it on)."""
    parser.add_argument(
        "--url-server",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="what serves the URL source: nginx if installed (auto), or python -m http.server",
    )
    parser.add_argument(
        "--no-url-source", action="store_true", help="only the store, not the URL source"
    )


@contextlib.contextmanager
def web_server(root: Path, www: Path, which: str) -> Iterator[tuple[str, int, str]]:
    """A loopback web server over ``www``: yields (its name, port, pid-finder key)."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if which == "nginx" and nginx is None:
        raise RuntimeError("--url-server nginx: nginx is not installed")
    port = free_port(socket.SOCK_STREAM)
    if nginx is not None and which != "python":
        (root / "tmp").mkdir(exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=root, port=port, www=www))
        args = [nginx, "-c", str(conf), "-p", str(root)]
        name = "nginx"
    else:
        args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        args += ["--directory", str(www)]
        name = "python -m http.server"
    log = (root / "web-server.log").open("ab")
    proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
    try:
        end = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {root}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError as exc:
                if getattr(exc, "code", None) in (403, 404):
                    break  # it answers
                if time.monotonic() > end:
                    raise RuntimeError(f"{name} did not answer in 30 s") from None
                time.sleep(0.1)
        yield name, port, str(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _deploy(
    fleet: Fleet, targets: list[str], args: argparse.Namespace, package: dict[str, Any], tag: str
) -> dict[str, Any]:
    return fan_out(
        fleet,
        targets,
        "tar",
        lambda cid: {
            "client_id": cid,
            **package,
            "target_dir": str(fleet.root / f"targets-{tag}" / cid),
            "timeout": args.artifact_timeout,
        },
        threads=args.threads,
        timeout=args.artifact_timeout + 60,
    )


def ship_packages(fleet: Fleet, report: Any, args: argparse.Namespace, ids: list[str]) -> None:
    """The store, then the URL source, to the first ``--artifact-agents`` agents; adds
    ``artifact``, ``artifact_url`` and ``artifact_url_vs_store`` to ``report``."""
    root = fleet.root
    www = root / "www"
    www.mkdir(exist_ok=True)
    package = make_package(www / "package.tar.gz", args.artifact_mb)
    size = package.stat().st_size
    targets = ids[: args.artifact_agents]
    mb = args.artifact_mb

    # ---- through the server's store
    upload_started = time.monotonic()
    sha = fleet.api.upload_artifact(package)["sha256"]
    upload = time.monotonic() - upload_started
    cpu = fleet.cpu_sample()
    with PeakRss(fleet.server_pids) as peak:
        store = _deploy(fleet, targets, args, {"artifact": sha}, "store")
    store_cpu = fleet.cpu_text(cpu)
    store_rate = _rate(mb, store)
    report.add(
        "artifact",
        f"{mb} MB package to {len(targets)} (store)",
        store,
        f"{store['summary']}; {store_rate:.0f} MB/s in all; upload {upload:.1f} s; "
        f"{store_cpu}; server RSS peak {peak.kib / 1024:.0f} MiB",
    )
    if store["statuses"].get("success", 0) != len(targets):
        report.problem(f"package deployments (store) ended {store['statuses']}")
    shutil.rmtree(root / "targets-store", ignore_errors=True)  # 50 MB a host: make room
    if args.no_url_source:
        return

    # ---- from a URL source
    with web_server(root, www, args.url_server) as (name, port, pid):
        source = {"url": f"http://127.0.0.1:{port}/package.tar.gz", "sha256": sha, "size": size}
        cpu = fleet.cpu_sample()
        web_cpu = cpu_seconds(process_tree(int(pid)))
        started = time.monotonic()
        with PeakRss(fleet.server_pids) as peak:
            url = _deploy(fleet, targets, args, {"source": source}, "url")
        took = max(time.monotonic() - started, 1e-9)
        web_pct = (cpu_seconds(process_tree(int(pid))) - web_cpu) / took * 100
        url_cpu = fleet.cpu_text(cpu)
    url_rate = _rate(mb, url)
    report.add(
        "artifact_url",
        f"{mb} MB package to {len(targets)} (URL, {name})",
        url,
        f"{url['summary']}; {url_rate:.0f} MB/s in all; {url_cpu}; {name} {web_pct:.0f} %; "
        f"server RSS peak {peak.kib / 1024:.0f} MiB",
    )
    if url["statuses"].get("success", 0) != len(targets):
        report.problem(f"package deployments (URL) ended {url['statuses']}")
    shutil.rmtree(root / "targets-url", ignore_errors=True)
    if store.get("last_finished_s") and url.get("last_finished_s"):
        ratio = store["last_finished_s"] / url["last_finished_s"]
        report.add(
            "artifact_url_vs_store",
            f"{mb} MB to {len(targets)}: store time / URL time",
            ratio,
            f"{ratio:.2f}x ({store['last_finished_s']:.1f} s vs {url['last_finished_s']:.1f} s)",
        )


def _rate(mb: int, shipped: dict[str, Any]) -> float:
    done = mb * shipped["statuses"].get("success", 0)
    last = shipped.get("last_finished_s")
    return done / last if last else 0.0


# --------------------------------------------------------------------------- profiling

GROUPS = (
    ("aioquic", "aioquic/"),
    ("cryptography / TLS", "cryptography/"),
    ("pylsqpack", "pylsqpack"),
    ("deploy_core.transport", "deploy_core/transport/"),
    ("deploy_core.server", "deploy_core/server/"),
    ("sqlalchemy / sqlite", "sqlalchemy/"),
    ("uvicorn / starlette / httpx", ("uvicorn/", "starlette/", "h11/", "httpx/", "anyio/")),
    ("asyncio", "asyncio/"),
    ("socket / selectors", ("selectors.py", "socket.py")),
)


def group_of(filename: str, function: str) -> str:
    """Which part of the stack a profiled function belongs to."""
    for name, marks in GROUPS:
        for mark in (marks,) if isinstance(marks, str) else marks:
            if mark in filename:
                return name
    if filename == "~":
        if "sendto" in function or "recv" in function or "select" in function:
            return "system calls (sendto/recvfrom/epoll)"
        if "sha256" in function or "hashlib" in function or "_hashlib" in function:
            return "hashing"
        return "builtins (C)"
    return "other Python"


def summarise(profile: Path, top: int = 25) -> str:
    """Where the server's time went, from a cProfile file."""
    stats = pstats.Stats(str(profile))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in raw.values())  # own time
    groups: Counter[str] = Counter()
    for (filename, _line, function), row in raw.items():
        groups[group_of(filename, function)] += row[2]
    out = io.StringIO()
    out.write(f"server CPU profiled: {total:.1f} s of own time\n\nby part of the stack:\n")
    for name, seconds in groups.most_common():
        out.write(f"  {name:40s} {seconds:7.2f} s  {seconds / total * 100:5.1f} %\n")
    for order in ("tottime", "cumulative"):
        out.write(f"\ntop {top} by {order}:\n")
        buffer = io.StringIO()
        pstats.Stats(str(profile), stream=buffer).strip_dirs().sort_stats(order).print_stats(top)
        text = buffer.getvalue()
        out.write(text[text.find("   ncalls") :])
    return out.getvalue()


def serve_profiled(out: str, argv: list[str]) -> None:
    """Run ``deployctl`` (``argv``: its arguments) with a CPU-time profiler that SIGUSR1
    starts and SIGUSR2 stops and writes to ``out``."""
    import cProfile
    import runpy

    profiler = cProfile.Profile(time.process_time)
    signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

    def dump(*_: object) -> None:
        profiler.disable()
        profiler.dump_stats(out + ".tmp")
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["deployctl", *argv]
    runpy.run_module("deploy_core.cli", run_name="__main__", alter_sys=True)


def profile(args: argparse.Namespace) -> int:
    """Profile the server while every agent of a small fleet fetches one package."""
    root = Path(tempfile.mkdtemp(prefix="fleet-artifacts-"))
    prof = root / "server.prof"
    fleet = Fleet(root)
    # The server run by serve_profiled: python fleet_artifacts.py --serve-profiled F -m …
    fleet.server_wrapper = [str(Path(__file__).resolve()), "--serve-profiled", str(prof)]
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    try:
        fleet.start_server(60.0)
        token = fleet.make_join_token(uses=args.agents)
        for k in range(args.procs):
            fleet.start_worker(f"worker-{k}", ids[k :: args.procs], token)
        if fleet.wait_connected(set(ids), 60 + 0.2 * args.agents, time.monotonic()) is None:
            print("not all agents connected", file=sys.stderr)
            return 1
        package = make_package(root / "package.tar.gz", args.mb)
        sha = fleet.api.upload_artifact(package)["sha256"]
        server = fleet.server
        assert server is not None
        cpu = fleet.cpu_sample()
        os.kill(server.pid, signal.SIGUSR1)
        args.artifact_timeout, args.threads = 900.0, 8
        shipped = _deploy(fleet, ids, args, {"artifact": sha}, "store")
        os.kill(server.pid, signal.SIGUSR2)
        print(
            f"{args.mb} MB to {len(ids)} agents through the store: {shipped['summary']}; "
            f"{_rate(args.mb, shipped):.0f} MB/s in all; {fleet.cpu_text(cpu)}"
        )
        end = time.monotonic() + 60
        while not prof.exists() and time.monotonic() < end:
            time.sleep(0.2)
        print(summarise(prof))
        return 0
    finally:
        fleet.close()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def compare_workers(args: argparse.Namespace) -> int:
    """One fleet, a fresh package to every agent through the store with each number of file
    workers in turn (rounds interleaved); MB/s in all per run and the ratios to 0."""
    counts = [int(n) for n in args.compare_workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fleet-workers-"))
    fleet = Fleet(root)
    ids = [f"fleet-{i:05d}" for i in range(args.agents)]
    args.artifact_timeout, args.threads = args.timeout, 8
    rates: dict[int, list[float]] = {n: [] for n in counts}
    # The server's CPU (its workers included) per MB delivered, in ms: steadier than MB/s.
    costs: dict[int, list[float]] = {n: [] for n in counts}
    rows: list[str] = []
    saved = os.environ.get("DEPLOY_CENTER_FILE_WORKERS")
    try:
        for turn in range(args.rounds):
            for n in counts:
                os.environ["DEPLOY_CENTER_FILE_WORKERS"] = str(n)
                if fleet.server is not None:
                    fleet.kill_server()  # kill -9: its file workers must go with it
                fleet.start_server(60.0)
                if not fleet.workers:
                    token = fleet.make_join_token(uses=args.agents)
                    for k in range(args.procs):
                        fleet.start_worker(f"worker-{k}", ids[k :: args.procs], token)
                started = time.monotonic()
                if fleet.wait_connected(set(ids), 120 + 0.2 * args.agents, started) is None:
                    print(f"not all agents connected ({n} workers)", file=sys.stderr)
                    return 1
                package = make_package(root / "package.tar.gz", args.mb)
                sha = fleet.api.upload_artifact(package)["sha256"]
                cpu = fleet.cpu_sample()
                with PeakRss(fleet.server_pids) as peak:
                    shipped = _deploy(fleet, ids, args, {"artifact": sha}, f"w{n}-{turn}")
                rate = _rate(args.mb, shipped)
                rates[n].append(rate)
                delivered = args.mb * shipped["statuses"].get("success", 0)
                spent = fleet.cpu_sample()[1] - cpu[1]
                cost = spent * 1000 / delivered if delivered else 0.0
                costs[n].append(cost)
                row = (
                    f"round {turn + 1}, {n} file workers: {shipped['summary']}; {rate:.1f} MB/s "
                    f"in all; {fleet.cpu_text(cpu)}; server {cost:.0f} ms CPU per MB; "
                    f"server RSS peak {peak.kib / 1024:.0f} MiB; load {os.getloadavg()[0]:.1f}"
                )
                rows.append(row)
                print(row, flush=True)
                shutil.rmtree(root / f"targets-w{n}-{turn}", ignore_errors=True)
        base = statistics.median(rates[counts[0]]) if rates[counts[0]] else 0.0
        print(f"\n{args.mb} MB package to {args.agents} agents through the store, medians:")
        for n in counts:
            median = statistics.median(rates[n])
            ratio = f"{median / base:.2f}x" if base else "-"
            print(
                f"  {n} file workers: {median:6.1f} MB/s in all   {ratio} of {counts[0]}   "
                f"server {statistics.median(costs[n]):.0f} ms CPU per MB"
            )
        return 0
    finally:
        if saved is None:
            os.environ.pop("DEPLOY_CENTER_FILE_WORKERS", None)
        else:
            os.environ["DEPLOY_CENTER_FILE_WORKERS"] = saved
        fleet.close()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    if sys.argv[1:2] == ["--serve-profiled"]:
        out, rest = sys.argv[2], sys.argv[3:]
        if rest[:2] != ["-m", "deploy_core.cli"]:
            raise SystemExit(f"--serve-profiled OUT -m deploy_core.cli ARGS…, not {rest[:2]}")
        serve_profiled(out, rest[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--profile", action="store_true")
    mode.add_argument(
        "--compare-workers",
        metavar="N,N,...",
        help="numbers of file workers to compare, e.g. 0,1,2 (the first is the base)",
    )
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--mb", type=int, default=20, help="the package's size in MB")
    parser.add_argument("--rounds", type=int, default=1, help="--compare-workers rounds")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="a package deployment's timeout (s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    if args.compare_workers:
        return compare_workers(args)
    return profile(args)


if __name__ == "__main__":
    sys.exit(main())

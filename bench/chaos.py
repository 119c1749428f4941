"""The long chaos run: N shell deployments over several agents while agents are killed,
their QUIC traffic is cut and the server is restarted; then the checks of
``tests/e2e/test_chaos.py`` and the run's figures.

    python bench/chaos.py [--deployments 1000] [--agents 4] [--seed S] [--keep DIR]
    python bench/chaos.py --replicas 2 [--pg URL] [--replica-kills 4] ...

With ``--replicas 2`` two replicas share a fresh schema of the PostgreSQL database at
``--pg`` (default ``$DEPLOY_CENTER_TEST_PG``, else the test database on 127.0.0.1): one
replica at a time is killed with SIGKILL and restarted, at most ``--replica-kills`` times,
instead of the one server's restarts (issue 15).

Exits 1 when a check fails (the violations are printed with the seed to replay).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos_harness import ChaosConfig, ChaosRun, postgres_schema

TEST_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deployments", type=int, default=1000, help="at least this many")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--deadline", type=float, default=15.0, help="per request, seconds")
    parser.add_argument("--keep", type=Path, default=None, help="run in DIR and keep it")
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    parser.add_argument("--replica-kills", type=int, default=4, help="with --replicas 2")
    parser.add_argument(
        "--pg",
        default=os.environ.get("DEPLOY_CENTER_TEST_PG", TEST_PG),
        help="PostgreSQL database for --replicas 2 (a fresh schema in it)",
    )
    args = parser.parse_args()
    try:
        config = ChaosConfig(
            deployments=args.deployments,
            agents=args.agents,
            deadline=args.deadline,
            replicas=args.replicas,
            replica_kills=args.replica_kills,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    print(
        f"chaos run: {config.deployments} deployments, {config.agents} agents, "
        f"{config.replicas} replica(s), seed {config.seed}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-"))
        db_url = stack.enter_context(postgres_schema(args.pg)) if config.replicas == 2 else None
        root = args.keep or Path(tmp)
        report = ChaosRun(root / "center", config, db_url=db_url).run()
    if report.violations:
        print(report.failure_message(), file=sys.stderr)
        return 1
    print(report.figures())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

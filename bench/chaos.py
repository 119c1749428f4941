"""The long chaos run: N shell deployments over several agents while agents are killed,
their QUIC traffic is cut and the server is restarted; then the checks of
``tests/e2e/test_chaos.py`` and the run's figures.

    python bench/chaos.py [--deployments 1000] [--agents 4] [--seed S] [--keep DIR]

Exits 1 when a check fails (the violations are printed with the seed to replay).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chaos_harness import ChaosConfig, ChaosRun


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deployments", type=int, default=1000, help="at least this many")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--deadline", type=float, default=15.0, help="per request, seconds")
    parser.add_argument("--keep", type=Path, default=None, help="run in DIR and keep it")
    args = parser.parse_args()
    config = ChaosConfig(deployments=args.deployments, agents=args.agents, deadline=args.deadline)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    print(
        f"chaos run: {config.deployments} deployments, {config.agents} agents, seed {config.seed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = args.keep or Path(tmp)
        report = ChaosRun(root / "center", config).run()
    if report.violations:
        print(report.failure_message(), file=sys.stderr)
        return 1
    print(report.figures())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

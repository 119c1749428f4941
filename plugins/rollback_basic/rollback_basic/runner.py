"""Running a rollback script: the ``DEPLOY_*`` variables it gets and how its failure reads.

Shared by every strategy that runs a script (``inline``, ``script`` and the ``snapshot``
restart), so each of them sets the same environment and fails with the same kind of message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any

from deploy_core.plugin import DeployContext, ProcessResult, RollbackRequest
from pydantic import AfterValidator

from rollback_basic.errors import RollbackError

MAX_SCRIPT_BYTES = 100 * 1024  # SPEC deploy-30
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_script(script: str) -> str:
    if not script.strip():
        raise ValueError("the script is empty")
    size = len(script.encode())
    if size > MAX_SCRIPT_BYTES:
        raise ValueError(f"the script is {size} bytes; at most {MAX_SCRIPT_BYTES} are allowed")
    return script


def _check_env(env: dict[str, str]) -> dict[str, str]:
    bad = sorted(name for name in env if not ENV_NAME.fullmatch(name))
    if bad:
        raise ValueError(f"invalid environment variable names: {', '.join(bad)}")
    return env


def _check_abs_dir(path: str | None) -> str | None:
    if path is not None and not os.path.isabs(path):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


ScriptText = Annotated[str, AfterValidator(_check_script)]
"""Script content: not blank, at most 100 KB."""

ScriptEnv = Annotated[dict[str, str], AfterValidator(_check_env)]
"""Extra environment variables for a script; names must be valid shell names."""

AbsoluteDir = Annotated[str | None, AfterValidator(_check_abs_dir)]
"""An optional absolute directory path."""


def rollback_env(request: RollbackRequest[Any, Any]) -> dict[str, str]:
    """``DEPLOY_ACTION``, ``DEPLOY_ROLLBACK_OF`` and ``DEPLOY_FAILURE_REASON`` for a script:
    the deployment undone and why (``manual rollback`` for one an operator asked for)."""
    return {
        "DEPLOY_ACTION": "rollback",
        "DEPLOY_ROLLBACK_OF": request.deploy_id,
        "DEPLOY_FAILURE_REASON": request.reason or "manual",
    }


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, or ``""``."""
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def failure_of(result: ProcessResult, what: str, timeout: float) -> str | None:
    """Why ``result`` counts as a failure (``None`` when it exited 0)."""
    if result.timed_out:
        return f"{what} {result.timeout_text()} and was killed"
    if result.exit_code == 0:
        return None
    if result.exit_code is not None and result.exit_code < 0:
        outcome = f"{what} was killed by signal {-result.exit_code}"
    else:
        outcome = f"{what} exited with code {result.exit_code}"
    tail = last_line(result.stderr_tail) or last_line(result.stdout_tail)
    return f"{outcome}: {tail}" if tail else outcome


async def run_rollback_script(
    ctx: DeployContext,
    request: RollbackRequest[Any, Any],
    script: str,
    *,
    timeout: float,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    name: str = "rollback",
) -> ProcessResult:
    """Run ``script`` with ``env`` plus the rollback variables of ``request``
    (:func:`rollback_env`); raise :class:`RollbackError` unless it exits 0.

    :param name: what the script is called in log lines and errors (``rollback``, ``restart``).
    """
    if cwd is not None and not os.path.isdir(cwd):
        raise RollbackError(
            f"cannot run the {name} script: its working directory {cwd} does not exist"
        )
    full_env = {**(env or {}), **rollback_env(request)}
    ctx.log(f"running the {name} script (timeout {timeout:g} s, cwd {cwd or '(agent default)'})")
    result = await ctx.run_script(
        script, timeout=timeout, cwd=cwd, env=full_env, name=name, stream_prefix=f"{name}:"
    )
    reason = failure_of(result, f"{name} script", timeout)
    if reason is not None:
        raise RollbackError(reason)
    ctx.log(f"{name} script finished in {result.duration:.2f} s")
    return result

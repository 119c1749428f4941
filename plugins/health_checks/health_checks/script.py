"""The ``script`` check: healthy when a custom script exits 0."""

from __future__ import annotations

import os
import signal
from typing import Annotated, Literal

from pydantic import Field, field_validator

from deploy_core.plugin import DeployContext, DeployFailed, HealthCheckParams, ProcessResult

MAX_SCRIPT_BYTES = 100 * 1024  # SPEC deploy-30
MAX_TAIL_CHARS = 200

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvValue = Annotated[str, Field(max_length=32768, pattern=r"^[^\x00]*$")]


class ScriptCheckParams(HealthCheckParams):
    """``{"type": "script", "script": "curl -fsS localhost:8080/ready"}``"""

    type: Literal["script"] = "script"
    script: str = Field(
        min_length=1,
        description="shell script (run by its #! line, else /bin/sh); at most 100 KB",
    )
    workdir: str | None = Field(
        default=None,
        max_length=4096,
        pattern=r"^/[^\x00]*$",
        description="absolute directory the script runs in; default the agent's",
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, max_length=256, description="extra environment variables"
    )

    @field_validator("script")
    @classmethod
    def _script_size(cls, value: str) -> str:
        size = len(value.encode())
        if size > MAX_SCRIPT_BYTES:
            raise ValueError(
                f"script is {size} bytes; the limit is {MAX_SCRIPT_BYTES} bytes (100 KB): "
                "ship a longer check with the deployment and call it from a short script"
            )
        return value


async def probe_script(params: ScriptCheckParams, ctx: DeployContext) -> str | None:
    """Run the script once; ``None`` when it exits 0, else its exit code and last words.

    The working directory is held to the agent's constraints first (``workdir_roots``, and
    one the ``run_as`` user can enter), so a refused one is named as such, not probed."""
    try:
        if params.workdir is not None:
            ctx.check_path(params.workdir, "health-check working directory", access="read")
            if not os.path.isdir(params.workdir):
                return f"working directory {params.workdir} does not exist or is not a directory"
        result = await ctx.run_script(
            params.script,
            timeout=params.attempt_timeout,
            cwd=params.workdir,
            env=params.env,
            name="health",
        )
    except DeployFailed as exc:  # refused by the agent's constraints
        return str(exc)
    except OSError as exc:
        hint = "; check its #! line" if params.script.startswith("#!") else ""
        return f"cannot start the health script: {exc.strerror or exc}{hint}"
    if result.exit_code == 0 and not result.timed_out:
        return None
    return _failure(result, params.attempt_timeout)


def _failure(result: ProcessResult, timeout: float) -> str:
    if result.timed_out:
        what = result.timeout_text()
    elif result.exit_code is not None and result.exit_code < 0:
        what = f"killed by {_signal_name(-result.exit_code)}"
    else:
        what = f"exit code {result.exit_code}"
    said = _last_line(result.stderr_tail) or _last_line(result.stdout_tail)
    return f"{what}: {said}" if said else what


def _last_line(text: str) -> str:
    """The last non-blank line of ``text``, cut to :data:`MAX_TAIL_CHARS`."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line:
            return line if len(line) <= MAX_TAIL_CHARS else line[: MAX_TAIL_CHARS - 1] + "…"
    return ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

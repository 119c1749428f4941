"""``deploy.shell``: run a script with a working directory, environment and timeout
(SPEC deploy-08 … deploy-10)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    DeployParams,
    DeployStatus,
    DeployType,
    Stage,
    WireModel,
    hookimpl,
)

MAX_SCRIPT_BYTES = 100 * 1024
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class ShellParams(DeployParams):
    """Parameters of a ``deploy.shell`` deployment."""

    script: str = Field(min_length=1, description="script content; '#!' picks the interpreter")
    workdir: str | None = Field(None, max_length=4096, description="absolute working directory")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    timeout: float = Field(300.0, gt=0, le=86400, description="seconds before the script is killed")

    @field_validator("script")
    @classmethod
    def _script_size(cls, value: str) -> str:
        size = len(value.encode())
        if size > MAX_SCRIPT_BYTES:
            raise ValueError(f"script is {size} bytes; the limit is {MAX_SCRIPT_BYTES}")
        if "\x00" in value:
            raise ValueError("script contains a NUL byte")
        return value

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or "\x00" in value):
            raise ValueError("workdir must be an absolute path")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        if len(value) > 256:
            raise ValueError("at most 256 environment variables")
        for key, val in value.items():
            if not re.fullmatch(ENV_NAME, key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\x00" in val or len(val) > 32768:
                raise ValueError(f"environment variable {key} has a NUL byte or is over 32 KiB")
        return value


class DeployShellResult(WireModel):
    """What an operator needs to know about a shell deployment (SPEC deploy-05); registered
    as the deploy type's ``result``."""

    exit_code: int | None
    stdout_tail: str = ""
    stderr_tail: str = ""
    duration: float = 0.0
    timed_out: bool = False
    output_truncated: bool = False


STAGES = (
    Stage(DeployStatus.EXECUTING.value, 0, 10, "preparing"),
    Stage(DeployStatus.SCRIPT_RUNNING.value, 10, 90, "running the script"),
)


async def run_shell(ctx: DeployContext, params: ShellParams) -> DeployShellResult:
    """Run the script; fail with the exit code and output tails, or time out."""
    if params.workdir is not None and not Path(params.workdir).is_dir():
        raise DeployFailed(f"working directory {params.workdir} does not exist")
    if params.workdir is not None and not os.access(params.workdir, os.X_OK):
        raise DeployFailed(f"working directory {params.workdir} is not accessible")
    ctx.report(DeployStatus.SCRIPT_RUNNING, fraction=0.0, message="script started")
    proc = await ctx.run_script(
        params.script, timeout=params.timeout, cwd=params.workdir, env=params.env
    )
    result = DeployShellResult(
        exit_code=proc.exit_code,
        stdout_tail=proc.stdout_tail[-8192:],
        stderr_tail=proc.stderr_tail[-8192:],
        duration=round(proc.duration, 6),
        timed_out=proc.timed_out,
        output_truncated=proc.truncated,
    )
    if proc.timed_out:
        raise DeployFailed(
            f"script {proc.timeout_text()}; every process it started was killed",
            result=result,
            status=DeployStatus.TIMEOUT,
        )
    if proc.exit_code != 0:
        last = (proc.stderr_tail or proc.stdout_tail).strip().splitlines()[-1:] or [""]
        raise DeployFailed(
            f"script exited with code {proc.exit_code}" + (f": {last[0][:300]}" if last[0] else ""),
            result=result,
        )
    ctx.report(DeployStatus.SCRIPT_RUNNING, fraction=1.0, message="script finished")
    return result


@hookimpl
def deploy_register_deploy_types(register: Callable[[DeployType], None]) -> None:
    """Register ``deploy.shell``."""
    register(
        DeployType(
            name="deploy.shell",
            params=ShellParams,
            executor=run_shell,
            stages=STAGES,
            description="run a shell script on the target host",
            target=lambda params: params.workdir,
            result=DeployShellResult,
        )
    )


@hookimpl
def deploy_register_cli_commands(register: Callable[..., Any]) -> None:
    """Register ``deployctl deploy shell`` (imported here: an agent never calls this hook)."""
    from deploy_shell.cli import deploy_shell

    register(deploy_shell, group="deploy")

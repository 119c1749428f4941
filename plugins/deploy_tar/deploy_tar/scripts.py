"""A release's own scripts: the install script at deploy time, and again (or ``start``) when a
rollback brings the release back.

Both run the same way, so a script sees the same environment in both directions::

    DEPLOY_ACTION     install, or rollback
    DEPLOY_ID         the deployment (or rollback) running it
    RELEASE_DIR       the release being installed or started (also the working directory)
    PREVIOUS_RELEASE  at install: the release live until now ("" for the first);
                      at rollback: the release being abandoned
    TARGET_DIR        the directory holding releases/ and current

The script's text is read from the release and handed to
:meth:`~deploy_core.agent.context.DeployContext.run_script`, so the agent's constraints (size,
deny rules, run-as user, limits) apply to it like to any other script.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from deploy_core.plugin import DeployContext, ProcessResult, safefs
from deploy_tar.releases import ReleaseError

__all__ = ["DEFAULT_INSTALL_SCRIPT", "failure", "find_script", "output_tail", "run_release_script"]

DEFAULT_INSTALL_SCRIPT = "install.sh"
# Read at most this much of a script: the agent's constraints refuse far less by default.
MAX_READ = 1024 * 1024
TAIL_CHARS = 8192


def find_script(release_dir: Path, explicit: str | None) -> str | None:
    """The script to run, relative to the release: ``explicit`` (which must be there), else
    ``install.sh`` when the package has one at its root, else ``None``."""
    if explicit is not None:
        if not (release_dir / explicit).is_file():
            raise ReleaseError(
                f"the package has no file {explicit!r} (looked in {release_dir}); check the "
                "install_script path, which is relative to the package root"
            )
        return explicit
    default = release_dir / DEFAULT_INSTALL_SCRIPT
    return DEFAULT_INSTALL_SCRIPT if default.is_file() else None


def _read(release_dir: Path, script: str) -> str:
    path = (release_dir / script).resolve()
    if not path.is_relative_to(release_dir.resolve()):
        raise ReleaseError(f"script {script!r} resolves outside its release, to {path}")
    if not path.is_file():
        raise ReleaseError(f"script {script!r} is not a regular file in {release_dir}")
    data = _read_inside(release_dir, path.relative_to(release_dir.resolve()))
    if len(data) > MAX_READ:
        raise ReleaseError(f"script {script!r} is over {MAX_READ} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ReleaseError(f"script {script!r} is not UTF-8 text: {exc}") from None


def _read_inside(release_dir: Path, relative: Path) -> bytes:
    """Read ``relative`` (already resolved) inside the release as root, without following a
    link anywhere on the way: a script that swapped ``releases/`` or a parent for a link
    between the check above and this read gets a refusal, not a root-only file."""
    handle: safefs.Dir | None = None
    try:
        handle = safefs.open_dir(release_dir)
        for part in relative.parts[:-1]:
            inner = safefs.open_subdir(handle, part)
            handle.close()
            handle = inner
        fd = safefs.open_file_at(handle, relative.parts[-1], os.O_RDONLY | os.O_NONBLOCK)
    except safefs.UnsafePath as exc:
        raise ReleaseError(f"cannot read the script: {exc}") from None
    finally:
        if handle is not None:
            handle.close()
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReleaseError(f"script {relative} is not a regular file in {release_dir}")
        return file.read(MAX_READ + 1)


async def run_release_script(
    ctx: DeployContext,
    release_dir: Path,
    script: str,
    *,
    action: str,
    target_dir: Path,
    other_release: Path | None,
    env: Mapping[str, str],
    timeout: float,
) -> ProcessResult:
    """Run ``script`` of the release in ``release_dir``, in that directory, with ``env`` and
    the variables above; its output lines reach the server as ``<action>:stdout`` /
    ``<action>:stderr``.

    :param other_release: ``PREVIOUS_RELEASE``.
    :raises ReleaseError: the script cannot be read.
    :raises DeployFailed: the agent's constraints refused it.
    """
    text = _read(release_dir, script)
    full_env = {
        **env,
        "DEPLOY_ACTION": action,
        "RELEASE_DIR": str(release_dir),
        "PREVIOUS_RELEASE": str(other_release) if other_release is not None else "",
        "TARGET_DIR": str(target_dir),
    }
    ctx.log(
        f"running {script} of release {release_dir.name} ({action}, timeout {timeout:.0f} s)",
        stream="agent",
    )
    return await ctx.run_script(
        text,
        timeout=timeout,
        cwd=release_dir,
        env=full_env,
        name=action,
        stream_prefix=f"{action}:",
    )


def output_tail(result: ProcessResult) -> str:
    """The end of what the script wrote: stdout, then stderr under a marker line."""
    text = result.stdout_tail
    if result.stderr_tail:
        text += ("" if not text or text.endswith("\n") else "\n") + "--- stderr ---\n"
        text += result.stderr_tail
    return text[-TAIL_CHARS:]


def failure(result: ProcessResult, what: str, timeout: float) -> str | None:
    """Why ``result`` is a failure, in a sentence (``None`` when it exited 0)."""
    if result.timed_out:
        return f"{what} {result.timeout_text()}; every process it started was killed"
    if result.exit_code == 0:
        return None
    if result.exit_code is not None and result.exit_code < 0:
        outcome = f"{what} was killed by signal {-result.exit_code}"
    else:
        outcome = f"{what} exited with code {result.exit_code}"
    for text in (result.stderr_tail, result.stdout_tail):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return f"{outcome}: {lines[-1][:300]}"
    return outcome

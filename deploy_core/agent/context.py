"""What a plugin's agent-side code is handed: the deployment, a way to report, a way to run.

Deploy executors, health probes and rollback strategies all receive a :class:`DeployContext`.
They report stages with :meth:`DeployContext.report`, send output with
:meth:`DeployContext.log`, and run scripts with :meth:`DeployContext.run_script`, which applies
the timeout, the process-group kill, the output bound and the agent's constraints for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deploy_core.agent.artifacts import (
    ArtifactError,
    ArtifactProvider,
    ArtifactTimeout,
    FetchedArtifact,
)
from deploy_core.agent.constraints import (
    ConstraintPolicy,
    ConstraintRefusal,
    PathAccess,
    default_policy,
)
from deploy_core.agent.process import (
    DEFAULT_TAIL_BYTES,
    OutputBudget,
    Pace,
    ProcessResult,
    run_process,
)
from deploy_core.agent.tracking import ProcessTracker
from deploy_core.models import DeployCommand, DeployStatus, LogLine
from deploy_core.plugin import safefs
from deploy_core.plugin.errors import DeployFailed as DeployFailed  # defined by the contract
from deploy_core.registry import Stage, find_stage

# Variables a script inherits from the agent's own environment; nothing else leaks through
# (the agent's environment may hold credentials).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASK = "***"
# Shorter values would mask ordinary text everywhere ("1", "on").
MIN_MASKED = 3
# Of the server's log budget, the part kept for the tail of a run that overflows it (and the
# line that says so): at most this much, and at most a quarter of the budget.
LOG_TAIL_BYTES = 64 * 1024
LOG_MARKER_BYTES = 256


class Reporter(Protocol):
    """Where a context's reports and log lines go (the agent's outbox; a list in tests)."""

    def report(self, status: DeployStatus, progress: int, stage: str, message: str) -> None:
        """Record a status report for sending."""

    def log(self, line: LogLine) -> None:
        """Record one log line for sending with the next report."""


class DeployContext:
    """One deployment (or rollback) as seen by the plugin code that carries it out."""

    def __init__(
        self,
        *,
        command: DeployCommand,
        reporter: Reporter,
        data_dir: Path,
        stage_of: Callable[[str], Stage] | None = None,
        constraints: ConstraintPolicy | None = None,
        artifacts: ArtifactProvider | None = None,
        processes: ProcessTracker | None = None,
        plugin_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """:param stage_of: the stage a status belongs to, whose range ``report(status,
        fraction=…)`` maps into (the deploy type's :meth:`~deploy_core.registry.DeployType.stage`);
        ``None``: :func:`~deploy_core.registry.find_stage` over no stages.
        :param constraints: what scripts must satisfy and run under; the defaults when
        ``None``.
        :param artifacts: where :meth:`fetch_artifact` gets packages (the agent's fetcher);
        with ``None`` it fails the deployment.
        :param processes: the agent's process tracker, which journals every run's processes
        (cgroup, session) before it starts; with ``None`` runs are tracked but not journaled.
        :param plugin_settings: the agent config's ``[plugins.NAME]`` tables
        (:meth:`plugin_config`)."""
        self.command = command
        self.deploy_id = command.deploy_id
        self.command_type = command.command_type
        self.deadline = command.expires_at
        self.data_dir = data_dir
        self.constraints = constraints if constraints is not None else default_policy()
        self._reporter = reporter
        self.secret_env = dict(command.secret_env)
        self._secrets = masked_forms(command.secret_env.values())
        # What is left of the server's log budget for this deployment's runs (docs/api.md,
        # "Logs"); None: no budget (an older server).
        self._log_room = command.log_budget_bytes
        self._stage_of = stage_of or (lambda status: find_stage((), status))
        self._artifacts = artifacts
        self._processes = processes if processes is not None else ProcessTracker()
        self._plugin_settings = dict(plugin_settings or {})
        self._status = DeployStatus.EXECUTING
        self._stage = ""
        self._progress = 0

    # ------------------------------------------------------------------ reporting

    @property
    def progress(self) -> int:
        """The last progress reported (0-100)."""
        return self._progress

    def resume_at(self, progress: int) -> None:
        """Continue a deployment a previous agent process reported up to ``progress``, so
        what this one reports never moves it backwards."""
        self._progress = max(self._progress, min(max(progress, 0), 100))

    def report(
        self,
        status: DeployStatus | str,
        *,
        fraction: float | None = None,
        progress: int | None = None,
        stage: str | None = None,
        message: str = "",
    ) -> None:
        """Report a status (and stage) with progress.

        ``fraction`` (0.0-1.0) places progress inside the range the deploy type registered for
        this status; ``progress`` sets it outright.  Progress never goes down.
        """
        status = DeployStatus(status)
        if progress is None:
            progress = self._stage_of(status.value).at(fraction or 0.0)
        self._progress = max(self._progress, min(max(progress, 0), 100))
        self._status = status
        self._stage = stage if stage is not None else status.value
        self._reporter.report(status, self._progress, self._stage, self.mask(message))

    def log(self, line: str, *, stream: str = "stdout") -> None:
        """Send one line of output to the server, tagged with the current stage."""
        self._reporter.log(LogLine(stream=stream, stage=self._stage, line=self.mask(line)[:8192]))

    def log_lines(self, lines: list[str], *, stream: str = "stdout") -> None:
        """Send many lines of one stream at once (a chunk of a script's output): as one
        block when the reporter and the server can take it, else line by line."""
        block = getattr(self._reporter, "log_lines", None)
        if block is None or self.command.log_budget_bytes is None:  # an older server
            for line in lines:
                self.log(line, stream=stream)
            return
        if self._secrets:
            # Whole, so a multi-line secret is masked across the line breaks too.
            lines = self.mask("\n".join(lines)).split("\n")
        block(stream[:32], self._stage[:64], lines)

    def mask(self, text: str) -> str:
        """``text`` with every secret value of the deployment replaced by ``***``: each
        value whole, and each line of a multi-line value (a PEM key), so neither a text
        holding the whole value nor one line of output shows any of it.  A value spanning
        lines becomes one ``***`` per line, its line breaks kept: output holding it whole
        (read in one chunk) has the same lines as output read line by line, and the line
        after it is not glued to the mask."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _mask_for(secret))
        return text

    def mask_data(self, data: Any) -> Any:
        """:meth:`mask` applied to every string inside JSON-like ``data``."""
        if not self._secrets:
            return data
        if isinstance(data, str):
            return self.mask(data)
        if isinstance(data, dict):
            return {k: self.mask_data(v) for k, v in data.items()}
        if isinstance(data, list):
            return [self.mask_data(v) for v in data]
        return data

    # ------------------------------------------------------------------ artifacts

    async def fetch_artifact(
        self, sha256: str, *, progress: Callable[[int, int], None] | None = None
    ) -> FetchedArtifact:
        """Get an artifact of the server's store by SHA-256, verified (SPEC deploy-11).

        A copy cached by an earlier deployment is used without any transfer; otherwise the
        bytes come over QUIC, resuming after a dropped connection (waiting for the agent to
        reconnect until the deadline) or from what an interrupted fetch left on disk.

        :param sha256: the artifact's SHA-256, 64 hex digits.
        :param progress: ``progress(bytes_received, total_bytes)``, at most once per percent.
        :returns: the cached file (read it; never change, move or delete it) and what the
            transfer took: ``bytes_transferred``, ``bytes_resumed``, ``from_cache``.
        :raises DeployFailed: the artifact is unknown, failed verification twice, or did not
            arrive before the deadline (status ``timeout``).
        """
        if self._artifacts is None:
            raise DeployFailed("this agent cannot fetch artifacts (no fetcher configured)")
        try:
            return await self._artifacts.fetch(
                sha256, deadline=self.deadline, progress=progress, waiting=self._waiting
            )
        except ArtifactTimeout as exc:
            raise DeployFailed(str(exc), status=DeployStatus.TIMEOUT) from exc
        except ArtifactError as exc:
            raise DeployFailed(str(exc)) from exc

    def _waiting(self, position: int) -> None:
        """The server has this deployment's artifact waiting in line: say so, same status."""
        self.report(
            self._status,
            progress=self._progress,
            stage=self._stage,
            message=f"waiting for the server (position {position})",
        )

    # ------------------------------------------------------------------ paths

    def check_path(
        self, path: str | os.PathLike[str], purpose: str, *, access: PathAccess = "write"
    ) -> Path:
        """The resolved ``path`` a plugin is about to work on as root, for ``purpose``.

        Call it before anything is written.  Refused — :class:`DeployFailed` naming the
        rule, also logged — when the path resolves to ``/`` or into the agent's data
        directory, lies outside the constraints' ``workdir_roots``, or (with ``run_as``) is
        one the run-as user could not itself ``access`` (``read``, ``write`` or ``replace``;
        see :meth:`ConstraintPolicy.check_path`).  Then work on the returned path with
        :mod:`deploy_core.plugin.safefs`, which refuses a symlink swapped in afterwards.

        :param purpose: what the path is, for messages: ``"tar target_dir"``.
        """
        real = Path(os.path.realpath(path))
        data = Path(os.path.realpath(self.data_dir))
        if real == Path("/"):
            refusal = f"{purpose} {path} resolves to '/'; name the application's own directory"
        elif real == data or real.is_relative_to(data):
            refusal = (
                f"{purpose} {path} is inside the agent's data directory {data}; "
                "name the application's own directory"
            )
        else:
            refusal = None
        if refusal is not None:
            self.log(refusal, stream="agent")
            raise DeployFailed(refusal)
        try:
            self.constraints.check_path(path, purpose, access=access)
        except ConstraintRefusal as exc:
            self.log(str(exc), stream="agent")
            raise DeployFailed(str(exc)) from exc
        return real

    # ------------------------------------------------------------------ running things

    def remaining(self) -> float:
        """Seconds left before the deployment's deadline (never negative)."""
        return max(0.0, self.deadline - time.time())

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The settings the agent's operator gave plugin ``name``: the ``[plugins.NAME]``
        table of ``deployctl agent --config`` (a copy; empty when none)."""
        return dict(self._plugin_settings.get(name, {}))

    def script_env(
        self, extra: Mapping[str, str] | None = None, *, run_as: bool = True
    ) -> dict[str, str]:
        """The environment scripts get: a few safe variables of the agent's (with ``HOME``,
        ``USER`` and ``LOGNAME`` of the constraints' run-as user unless ``run_as`` is false),
        the deployment's identity, then ``extra``, then the deployment's secret variables."""
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        if run_as:
            env = self.constraints.environment(env)
        env["DEPLOY_ID"] = self.deploy_id
        env["DEPLOY_COMMAND"] = self.command_type
        if extra:
            env.update(extra)
        env.update(self.secret_env)
        return env

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        stream_prefix: str = "",
    ) -> ProcessResult:
        """Run ``argv`` with a timeout (never past the deadline), logging every output line.

        For a plugin's own commands: of the agent's constraints only ``workdir_roots``
        applies (a refusal raises :class:`DeployFailed`).  Scripts go through
        :meth:`run_script`, which applies them all.
        """
        self._enforce(self.constraints.check_workdir, cwd)
        return await self._run(
            argv, timeout=timeout, cwd=cwd, env=env, stream_prefix=stream_prefix, confine=None
        )

    async def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        stream_prefix: str,
        confine: str | None,
    ) -> ProcessResult:
        """Run ``argv``; with ``confine`` (the run's name) as the run-as user, under the
        limits, and with a failure a limit explains said so in the stderr tail."""

        def on_lines(stream: str, lines: list[str]) -> None:
            self.log_lines(lines, stream=stream_prefix + stream)

        # Never past the deadline, but give a step at least a second to report itself.
        step_timeout, timeout = timeout, min(timeout, max(self.remaining(), 1.0))
        run_name = confine or f"{self.deploy_id}-run-{uuid.uuid4().hex[:8]}"
        if confine is None:
            budget = self._output_budget(None)
            try:
                return await run_process(
                    argv,
                    timeout=timeout,
                    cwd=cwd,
                    env=self.script_env(env, run_as=False),
                    on_lines=on_lines,
                    output_budget=budget,
                    pace=self._pace(),
                    tracking=self._processes.start_run(self.deploy_id, run_name),
                    step_timeout=step_timeout,
                )
            finally:
                self._spend(budget)
        policy = self.constraints
        output_bytes = policy.limits.output_bytes
        budget = self._output_budget(output_bytes)
        with policy.confinement(confine) as confinement:
            for note in confinement.notes if confinement else ():
                self.log(note, stream="agent")
            try:
                result = await run_process(
                    argv,
                    timeout=timeout,
                    cwd=cwd,
                    env=self.script_env(env),
                    on_lines=on_lines,
                    tail_bytes=min(DEFAULT_TAIL_BYTES, output_bytes or DEFAULT_TAIL_BYTES),
                    confinement=confinement,
                    output_budget=budget,
                    pace=self._pace(),
                    tracking=self._processes.start_run(
                        self.deploy_id,
                        run_name,
                        limits_cgroup=confinement.cgroup if confinement else None,
                    ),
                    step_timeout=step_timeout,
                )
            except OSError as exc:
                why = policy.explain_start_error(exc)
                if why is None:
                    raise
                raise DeployFailed(f"the script could not start: {why}") from exc
            except subprocess.SubprocessError as exc:  # the preexec step failed in the child
                raise DeployFailed(
                    f"the script could not be put under the constraints (run_as, limits): {exc}"
                ) from exc
            finally:
                self._spend(budget)
            why = policy.explain(result, confinement)
        if why is None:
            return result
        self.log(f"[agent] {why}", stream="agent")
        tail = result.stderr_tail
        tail += ("" if not tail or tail.endswith("\n") else "\n") + f"[agent] {why}\n"
        return dataclasses.replace(result, stderr_tail=tail, limit_hit=why)

    def _output_budget(self, cap: int | None) -> OutputBudget:
        """The output budget of one run: the agent's own per-run limit (``cap``) when it is
        the smaller, else what is left of the server's budget for the deployment, with a tail
        kept for the end."""
        room = self._log_room
        if room is None:
            return OutputBudget(cap)
        # A quarter of what is left (at most LOG_TAIL_BYTES) for the tail, the marker's room,
        # the rest for the head: the run never sends more than the server keeps.
        tail = min(LOG_TAIL_BYTES, room // 4)
        head = max(0, room - tail - LOG_MARKER_BYTES)
        if cap is not None and cap <= head:
            return OutputBudget(cap)
        return OutputBudget(head, tail_bytes=tail)

    def _spend(self, budget: OutputBudget) -> None:
        if self._log_room is not None:
            self._log_room = max(0, self._log_room - budget.streamed - budget.sent_after)

    def _pace(self) -> Pace | None:
        """The reporter's back-pressure, if it has any (the agent's outbox does)."""
        wait: Pace | None = getattr(self._reporter, "wait_for_room", None)
        return wait

    def _enforce(self, check: Callable[[Any], None], subject: Any) -> None:
        """Run one constraint check; a refusal is logged and fails the step."""
        try:
            check(subject)
        except ConstraintRefusal as exc:
            self.log(str(exc), stream="agent")
            raise DeployFailed(str(exc)) from exc

    async def run_script(
        self,
        script: str,
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        name: str = "script",
        stream_prefix: str = "",
    ) -> ProcessResult:
        """Write ``script`` to a private file and run it: by its ``#!`` line if it has one,
        else with ``/bin/sh``.

        The agent's constraints are checked first — size, deny/allow rules, working
        directory — and a refusal raises :class:`DeployFailed` naming the rule before
        anything runs.  The script then runs as the run-as user, under the limits.
        """
        self._enforce(self.constraints.check_script, script)
        self._enforce(self.constraints.check_workdir, cwd)
        run_as = self.constraints.switch_to
        scripts, path = self._script_file(script, f"{self.deploy_id}-{name}.sh")
        argv = [str(path)] if script.startswith("#!") else ["/bin/sh", str(path)]
        try:
            return await self._run(
                argv,
                timeout=timeout,
                cwd=cwd,
                env=env,
                stream_prefix=stream_prefix,
                confine=f"{self.deploy_id}-{name}-{uuid.uuid4().hex[:8]}",
            )
        finally:
            with scripts, contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=scripts.fd)
            if run_as is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(scripts.path)

    def _script_file(self, script: str, name: str) -> tuple[safefs.Dir, Path]:
        """Write ``script`` as ``name`` into a directory only the agent can write, readable
        and runnable by whoever runs it; returns the open directory and the file's path.

        With ``run_as`` the file belongs to the run-as user, in a fresh root-owned directory
        it may enter but not change (the agent's data directory is closed to it): nothing
        the run-as user does can make the agent write or chown anything else.
        """
        run_as = self.constraints.switch_to
        if run_as is None:
            # The agent's own directory, resolved once (it may be reached through a link).
            scripts = os.path.realpath(self.data_dir / "scripts")
            folder = safefs.open_dir(scripts, create=True, mode=0o700)
            owner = None
        else:
            created = tempfile.mkdtemp(prefix="deploy-script-")  # 0700, exclusively made
            folder = safefs.open_dir(os.path.realpath(created))  # TMPDIR may be a link
            os.fchmod(folder.fd, 0o711)  # the run-as user may enter, not list or write
            owner = (run_as.uid, run_as.gid)
        try:
            # No fsync: the file lives for one run (an fsync here cost milliseconds on the
            # path of every deployment).
            safefs.write_file_at(folder, name, script.encode(), 0o700, owner=owner, durable=False)
        except BaseException:
            folder.close()
            raise
        return folder, Path(folder.path) / name


def _mask_for(secret: str) -> str:
    """What replaces ``secret``: :data:`MASK`, or for a value spanning lines one per line,
    its line breaks (and empty lines) kept."""
    if "\n" not in secret:
        return MASK
    return "\n".join(
        (MASK + "\r" if part.endswith("\r") else MASK) if part.strip("\r") else part
        for part in secret.split("\n")
    )


def masked_forms(values: Iterable[str]) -> list[str]:
    """Every text to mask for these secret values, longest first (so a secret containing
    another is masked whole): each value, its JSON-escaped form, and each line of a
    multi-line value that is at least :data:`MIN_MASKED` long (a log stream sees one line at
    a time)."""
    forms: set[str] = set()
    for value in values:
        if len(value) < MIN_MASKED:
            continue
        forms.update((value, value.replace("\n", "\r\n"), json.dumps(value)[1:-1]))
        for line in value.splitlines():
            for form in (line, line.strip()):
                if len(form) >= MIN_MASKED:
                    forms.add(form)
    return sorted(forms, key=len, reverse=True)


@dataclass
class AgentServiceContext:
    """What an agent service (a long-running plugin task) is handed."""

    client_id: str
    data_dir: Path
    send_event: Callable[[str, dict[str, Any]], Awaitable[None]]
    config: dict[str, Any]

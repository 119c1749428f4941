"""Carries out one deployment on the agent, start to callback (SPEC deploy-08 … -10, -17, -18).

deploy (the type's executor) → health checks → on failure: rollback strategy → health checks
again → one callback.  ``deploy.rollback`` commands run the second half only.  Every step is
reported; every error ends in the callback, never in a crash of the agent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from deploy_core.agent.artifacts import ArtifactProvider
from deploy_core.agent.constraints import ConstraintPolicy, default_policy
from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.agent.health import run_health_checks
from deploy_core.agent.journal import Journal
from deploy_core.agent.process import KILL_GRACE
from deploy_core.agent.reporter import MAX_BATCH_BYTES, MAX_UNACKED_BYTES, OutboxReporter
from deploy_core.agent.tracking import ENDED, ProcessTracker, RunRecord
from deploy_core.models import (
    COMMAND_ROLLBACK,
    EVENT_CALLBACK,
    UNDONE_STATUSES,
    DeployCallbackPayload,
    DeployCommand,
    DeployStatus,
    HealthCheckResult,
    RollbackResult,
    RollbackTarget,
)
from deploy_core.plugins import DeployPlugins
from deploy_core.registry import (
    HEALTH_STAGE,
    DeployParams,
    DeployType,
    RollbackReport,
    RollbackRequest,
    RollbackStrategy,
)

log = logging.getLogger(__name__)

# Extra seconds the core gives an executor or a rollback strategy past its own timeout before
# cancelling it: plugins enforce their timeouts themselves and report what they saw, which
# says more than the core's cancellation would.
EXECUTOR_GRACE = 10.0
HEALTH_PROGRESS = HEALTH_STAGE.start


@dataclass
class Outcome:
    """How the deployment went, gathered as the flow runs."""

    status: DeployStatus
    error: str | None = None
    result: BaseModel | None = None
    health: list[HealthCheckResult] | None = None
    rollback: RollbackResult | None = None
    rollback_state: dict[str, Any] | None = None


class NotJournaled(Exception):
    """A command's journal write failed or found it journaled before: it is not run."""


class Executor:
    """Runs deployments for one agent, one at a time."""

    def __init__(
        self,
        *,
        plugins: DeployPlugins,
        journal: Journal,
        data_dir: Path,
        wake: Any,
        constraints: ConstraintPolicy | None = None,
        artifacts: ArtifactProvider | None = None,
        processes: ProcessTracker | None = None,
        plugin_settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """:param constraints: what every script must satisfy and runs under (SPEC
        deploy-30); the defaults when ``None``.
        :param artifacts: the agent's artifact fetcher, handed to every context (deploy-11).
        :param processes: the agent's process tracker; ``None``: one that tracks by session
        and /proc, journaled in ``journal``.
        :param plugin_settings: the agent config's ``[plugins.NAME]`` tables, for
        :meth:`DeployContext.plugin_config`."""
        self.plugins = plugins
        self.journal = journal
        self.data_dir = data_dir
        self.wake = wake
        self.constraints = constraints if constraints is not None else default_policy()
        self.artifacts = artifacts
        self.processes = processes if processes is not None else ProcessTracker(None, journal)
        self.plugin_settings = dict(plugin_settings or {})
        log.info("constraints: %s", self.constraints.describe())

    def _context(self, command: DeployCommand, deploy_type: DeployType | None) -> DeployContext:
        # The outbox's bound from the command itself: the reporter would read it from the
        # journal, where a command just received may not be committed yet (its write joins
        # the started mark's transaction).
        budget = command.log_budget_bytes
        reporter = OutboxReporter(
            self.journal,
            deploy_id=command.deploy_id,
            command_type=command.command_type,
            wake=self.wake,
            max_unacked_bytes=None
            if budget is None
            else max(MAX_BATCH_BYTES, min(MAX_UNACKED_BYTES, budget // 4)),
        )

        return DeployContext(
            command=command,
            reporter=reporter,
            data_dir=self.data_dir,
            stage_of=deploy_type.stage if deploy_type is not None else None,
            constraints=self.constraints,
            artifacts=self.artifacts,
            processes=self.processes,
            plugin_settings=self.plugin_settings,
        )

    async def run(
        self, command: DeployCommand, *, accepted: concurrent.futures.Future[bool] | None = None
    ) -> DeployStatus:
        """Run a journaled command to its callback; returns the final status once the
        callback is on disk (and on its way).

        :param accepted: the command's journal write (:meth:`Journal.submit_accept`) when it
            may not be committed yet: the started mark and the first report join its
            transaction, and nothing of the plugin runs, nor is a callback written, before
            it is committed and said the command was new.
        :raises NotJournaled: it was not (nothing ran)."""
        # Not waited for here: it goes to the disk with the first report, before any of the
        # plugin's code runs (_deploy waits for both).
        marked = self.journal.submit_started(command.deploy_id)
        started = time.monotonic()
        if command.command_type == COMMAND_ROLLBACK:
            await asyncio.wrap_future(marked)
            if accepted is not None:
                await self.journaled(command, accepted)
            ctx = self._context(command, None)
            outcome = await self._manual_rollback(ctx, command)
        else:
            deploy_type = self.plugins.deploy_types.get(command.command_type)
            ctx = self._context(command, deploy_type)
            outcome = await self._deploy(ctx, command, deploy_type, accepted)
        if accepted is not None:
            await self.journaled(command, accepted)
        await asyncio.wrap_future(self._callback(ctx, outcome, time.monotonic() - started))
        return outcome.status

    @staticmethod
    async def journaled(command: DeployCommand, accepted: concurrent.futures.Future[bool]) -> None:
        """Return once ``accepted`` (the command's journal write) is committed as new.

        :raises NotJournaled: the write failed, or the command was journaled before."""
        try:
            # Done already (it committed with the started mark, which the caller waited
            # for): read it here.  wrap_future would hand even a done future over through
            # call_soon_threadsafe, two turns of the loop in which the command's ACK and
            # first report were sent before the script could start.
            new = accepted.result() if accepted.done() else await asyncio.wrap_future(accepted)
        except Exception as exc:
            raise NotJournaled(f"the journal could not store the command: {exc}") from exc
        if not new:
            raise NotJournaled(f"deployment {command.deploy_id} was journaled before")

    async def recover(
        self,
        command: DeployCommand,
        stage: str,
        rollback_state: dict[str, Any] | None,
        progress: int = 0,
    ) -> DeployStatus:
        """A deployment this agent was running when it stopped: never run it again; kill
        every process it started (its journaled runs), then roll it back if it has a
        rollback, and report it (DESIGN §3, SPEC deploy-31)."""
        started = time.monotonic()
        killed = await self._kill_leftovers(command.deploy_id)
        ctx = self._context(command, self.plugins.deploy_types.get(command.command_type))
        ctx.resume_at(progress)
        reason = f"agent restarted during stage {stage or 'start'}; the deployment was not resumed"
        ctx.log(reason, stream="agent")
        if killed:
            ctx.log(
                f"killed {len(killed)} process(es) the interrupted deployment had started: "
                + ", ".join(killed),
                stream="agent",
            )
        outcome = Outcome(DeployStatus.FAILED, reason, rollback_state=rollback_state)
        if command.command_type != COMMAND_ROLLBACK:
            await self._roll_back_after_failure(ctx, command, outcome)
        await asyncio.wrap_future(self._callback(ctx, outcome, time.monotonic() - started))
        return outcome.status

    async def _kill_leftovers(self, deploy_id: str) -> list[str]:
        """Kill what the journaled runs of ``deploy_id`` left, and forget them."""
        records = [RunRecord.from_json(r) for r in self.journal.runs(deploy_id)]
        killed = await asyncio.to_thread(self.processes.kill_recorded, records, KILL_GRACE)
        for record in records:
            self.journal.record_run(deploy_id, {**record.to_json(), "state": ENDED})
        if killed:
            log.warning("deployment %s: killed what it left running: %s", deploy_id, killed)
        return killed

    def refuse(self, command: DeployCommand, status: DeployStatus, reason: str) -> None:
        """Finish a command without running it (expired, unknown type …)."""
        ctx = self._context(command, None)
        self.journal.mark_started(command.deploy_id)
        self._callback(ctx, Outcome(status, reason), 0.0).result()

    # ------------------------------------------------------------------ the flow

    async def _deploy(
        self,
        ctx: DeployContext,
        command: DeployCommand,
        deploy_type: DeployType | None,
        accepted: concurrent.futures.Future[bool] | None = None,
    ) -> Outcome:
        if deploy_type is None:
            return Outcome(
                DeployStatus.FAILED, f"this agent has no plugin for {command.command_type}"
            )
        if time.time() > command.expires_at:
            return Outcome(DeployStatus.TIMEOUT, "the deadline passed before the agent could start")
        try:
            params = deploy_type.params.model_validate(command.params)
        except ValidationError as exc:
            return Outcome(DeployStatus.FAILED, f"invalid parameters: {exc}")
        ctx.report(DeployStatus.EXECUTING, progress=0, message="deployment started")
        # The started mark (a restart must not run it again) is on disk before any of the
        # plugin's code runs: one commit with the report above (and with the command's own
        # write, when the agent has just received it).
        await asyncio.wrap_future(self.journal.barrier())
        if accepted is not None:
            await self.journaled(command, accepted)
        outcome = Outcome(DeployStatus.SUCCESS)
        prepared = await self._prepare_rollback(ctx, command, params, outcome)
        if outcome.status is not DeployStatus.SUCCESS:
            return outcome
        try:
            # In this task (asyncio.timeout, not wait_for's task of its own): the plugin's
            # first step runs now, and its end resumes this at once, not a loop turn later.
            async with asyncio.timeout(params.timeout + EXECUTOR_GRACE):
                outcome.result = await deploy_type.executor(ctx, params)
        except DeployFailed as exc:
            outcome.status, outcome.error, outcome.result = exc.status, str(exc), exc.result
        except TimeoutError:
            outcome.status = DeployStatus.TIMEOUT
            outcome.error = (
                f"{command.command_type} did not finish within its timeout of "
                f"{params.timeout:g} s (plus {EXECUTOR_GRACE:g} s grace)"
            )
        except Exception as exc:
            log.exception("executor of %s failed", command.command_type)
            outcome.status, outcome.error = DeployStatus.FAILED, f"{type(exc).__name__}: {exc}"
        if outcome.status is DeployStatus.SUCCESS and command.health_checks:
            ctx.report(
                DeployStatus.HEALTH_CHECK,
                progress=HEALTH_PROGRESS,
                message=f"running {len(command.health_checks)} health check(s)",
            )
            outcome.health = await run_health_checks(ctx, self.plugins, command.health_checks)
            failed = [h for h in outcome.health if not h.success]
            if failed:
                outcome.status = DeployStatus.FAILED
                outcome.error = "health check failed: " + "; ".join(
                    f"{h.check_type}: {h.error}" for h in failed
                )
        if outcome.status is DeployStatus.SUCCESS:
            if prepared is not None:
                await self._discard(ctx, *prepared)
            return outcome
        await self._roll_back_after_failure(ctx, command, outcome)
        return outcome

    async def _prepare_rollback(
        self, ctx: DeployContext, command: DeployCommand, params: DeployParams, outcome: Outcome
    ) -> tuple[RollbackStrategy, RollbackRequest[Any, Any]] | None:
        """Run the strategy's ``prepare``; the strategy and the request its ``discard`` gets
        (with the prepared state), or ``None`` (no rollback, or ``outcome`` failed)."""
        if command.rollback is None:
            return None
        try:
            strategy, options = self.plugins.parse_rollback(command.rollback)
        except (LookupError, ValidationError) as exc:
            outcome.status, outcome.error = DeployStatus.FAILED, f"rollback not possible: {exc}"
            return None
        request = RollbackRequest(command.deploy_id, command.command_type, params, options)
        if strategy.prepare is None:
            return strategy, request
        try:
            outcome.rollback_state = await asyncio.wait_for(
                strategy.prepare(ctx, request), options.timeout + EXECUTOR_GRACE
            )
        except Exception as exc:
            outcome.status = DeployStatus.FAILED
            outcome.error = f"rollback strategy {strategy.name} could not prepare: {exc}"
            return None
        self.journal.set_rollback_state(ctx.deploy_id, outcome.rollback_state)
        return strategy, dataclasses.replace(request, state=outcome.rollback_state)

    async def _discard(
        self, ctx: DeployContext, strategy: RollbackStrategy, request: RollbackRequest[Any, Any]
    ) -> None:
        try:
            await asyncio.wait_for(
                strategy.discard(ctx, request), request.options.timeout + EXECUTOR_GRACE
            )
        except Exception as exc:  # retention is housekeeping: never fails a deployment
            ctx.log(f"rollback strategy {strategy.name} could not discard: {exc}", stream="agent")

    async def _roll_back_after_failure(
        self, ctx: DeployContext, command: DeployCommand, outcome: Outcome
    ) -> None:
        ctx.report(outcome.status, progress=ctx.progress, message=outcome.error or "")
        if command.rollback is None:
            # Never a blind re-run: say plainly that nothing was undone, and why.
            why = command.no_rollback_reason or "the command named no rollback strategy"
            outcome.error = f"{outcome.error}; not rolled back: {why}"
            ctx.log(f"not rolled back: {why}", stream="agent")
            return
        target = RollbackTarget(
            deploy_id=command.deploy_id,
            command_type=command.command_type,
            params=command.params,
            health_checks=command.health_checks,
            rollback=command.rollback,
            rollback_state=outcome.rollback_state,
        )
        outcome.rollback = await self._rollback(ctx, target, outcome.error or "failed")
        outcome.status = (
            DeployStatus.ROLLED_BACK if outcome.rollback.success else DeployStatus.ROLLBACK_FAILED
        )

    async def _manual_rollback(self, ctx: DeployContext, command: DeployCommand) -> Outcome:
        target = command.rollback_of
        if target is None:
            return Outcome(DeployStatus.ROLLBACK_FAILED, "deploy.rollback without a target")
        ctx.report(
            DeployStatus.EXECUTING,
            progress=0,
            message=f"rolling back deployment {target.deploy_id}",
        )
        entry = self.journal.get(target.deploy_id)
        if entry is None and target.only_if_ran:
            return Outcome(
                DeployStatus.ROLLED_BACK,
                rollback=RollbackResult(
                    success=True,
                    strategy=target.rollback.get("strategy"),
                    message=f"this agent never ran {target.deploy_id}: nothing to undo",
                ),
            )
        if entry is not None and entry.final_status in UNDONE_STATUSES:
            # The agent rolled it back itself while the server had given up on it.
            return Outcome(
                DeployStatus.ROLLED_BACK,
                rollback=RollbackResult(
                    success=entry.final_status == DeployStatus.ROLLED_BACK.value,
                    strategy=target.rollback.get("strategy"),
                    message=f"already {entry.final_status} by this agent when it failed",
                ),
            )
        if target.rollback_state is None and entry is not None:
            target = target.model_copy(update={"rollback_state": entry.rollback_state})
        result = await self._rollback(ctx, target, "manual rollback")
        status = DeployStatus.ROLLED_BACK if result.success else DeployStatus.ROLLBACK_FAILED
        return Outcome(status, result.error, rollback=result)

    async def _rollback(
        self, ctx: DeployContext, target: RollbackTarget, reason: str
    ) -> RollbackResult:
        """Run the target's strategy, then its health checks again."""
        started = time.monotonic()
        try:
            strategy, options = self.plugins.parse_rollback(target.rollback)
            request = RollbackRequest(
                target.deploy_id,
                target.command_type,
                self._params_of(target),
                options,
                target.rollback_state,
                reason,
            )
        except (LookupError, ValidationError) as exc:
            return RollbackResult(
                success=False,
                strategy=target.rollback.get("strategy"),
                error=f"cannot roll back: {exc}",
            )
        ctx.report(
            DeployStatus.ROLLING_BACK,
            progress=ctx.progress,
            message=f"rolling back with strategy {strategy.name}: {reason}",
        )
        if strategy.needs_state and target.rollback_state is None:
            return RollbackResult(
                success=False,
                strategy=strategy.name,
                duration=time.monotonic() - started,
                error=f"strategy {strategy.name} has no saved state for {target.deploy_id}",
            )
        try:
            report = await asyncio.wait_for(
                strategy.rollback(ctx, request), options.timeout + EXECUTOR_GRACE
            )
        except TimeoutError:
            return RollbackResult(
                success=False,
                strategy=strategy.name,
                duration=time.monotonic() - started,
                error=f"rollback did not finish within {options.timeout:g}s",
            )
        except Exception as exc:
            return RollbackResult(
                success=False,
                strategy=strategy.name,
                duration=time.monotonic() - started,
                error=str(exc) or type(exc).__name__,
            )
        report = report if isinstance(report, RollbackReport) else RollbackReport()
        details = dict(report.details)  # masked with the rest of the callback
        if report.nothing_to_undo:
            # Nothing ran before the deployment: checking health again would only show that.
            ctx.log(f"rollback: {report.message or 'nothing to undo'}", stream="agent")
            return RollbackResult(
                success=True,
                strategy=strategy.name,
                duration=time.monotonic() - started,
                message=report.message or "nothing to undo",
                details=details,
            )
        health: list[HealthCheckResult] = []
        if target.health_checks:
            ctx.report(
                DeployStatus.HEALTH_CHECK,
                progress=ctx.progress,
                message="health checks after rollback",
            )
            health = await run_health_checks(ctx, self.plugins, target.health_checks)
        failed = [h for h in health if not h.success]
        return RollbackResult(
            success=not failed,
            strategy=strategy.name,
            duration=time.monotonic() - started,
            error="health check failed after rollback: "
            + "; ".join(f"{h.check_type}: {h.error}" for h in failed)
            if failed
            else None,
            message=(report.message or "rolled back") + (", but unhealthy" if failed else ""),
            health=health,
            details=details,
        )

    def _params_of(self, target: RollbackTarget) -> DeployParams:
        """The undone deployment's parameters, validated by its deploy type's model.

        :raises LookupError: this agent has no plugin for the deployment's type.
        :raises pydantic.ValidationError: they do not fit the model (anymore).
        """
        deploy_type = self.plugins.deploy_types.get(target.command_type)
        if deploy_type is None:
            raise LookupError(
                f"this agent has no plugin for {target.command_type}, the type of deployment "
                f"{target.deploy_id}; load it to roll the deployment back"
            )
        return deploy_type.params.model_validate(target.params)

    def _callback(
        self, ctx: DeployContext, outcome: Outcome, duration: float
    ) -> concurrent.futures.Future[None]:
        """Journal the callback (the sender is woken once it is committed); the write's
        future."""
        result = outcome.result.model_dump(mode="json") if outcome.result is not None else None
        reporter = ctx._reporter
        if isinstance(reporter, OutboxReporter):
            reporter.flush()
        kind = ctx.command_type.split(".", 1)[-1]
        payload = DeployCallbackPayload(
            callback_id=ctx.deploy_id,
            command_type=ctx.command_type,
            deploy_type=kind,
            status=outcome.status,
            success=outcome.status is DeployStatus.SUCCESS
            or (
                ctx.command_type == COMMAND_ROLLBACK and outcome.status is DeployStatus.ROLLED_BACK
            ),
            result=ctx.mask_data(result),
            error=(outcome.error or None) and ctx.mask(outcome.error)[:16000],
            duration=round(duration, 6),
            health=[
                type(h).model_validate(ctx.mask_data(h.model_dump())) for h in outcome.health or []
            ],
            rollback=type(outcome.rollback).model_validate(
                ctx.mask_data(outcome.rollback.model_dump())
            )
            if outcome.rollback
            else None,
            rollback_state=ctx.mask_data(outcome.rollback_state),
        )
        written = self.journal.submit_finish(
            ctx.deploy_id,
            outcome.status.value,
            f"cb-{uuid.uuid4().hex}",
            EVENT_CALLBACK,
            payload.model_dump(mode="json"),
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None

        def wake(done: concurrent.futures.Future[None]) -> None:
            if done.exception() is not None:
                return
            if loop is None:
                self.wake()
            else:
                with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                    loop.call_soon_threadsafe(self.wake)

        written.add_done_callback(wake)
        log.info(
            "deployment %s finished: %s%s",
            ctx.deploy_id,
            outcome.status.value,
            f" ({payload.error})" if payload.error else "",
        )
        return written

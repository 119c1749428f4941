"""What the agent's executor hands a rollback strategy: one typed ``RollbackRequest`` with
the deployment's parameters validated by its deploy type's model (not the raw dict), the
strategy's options, the state ``prepare`` saved and the reason.  A real executor and journal
run the commands; the strategy writes down what it was given."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deploy_core.agent.executor import Executor
from deploy_core.agent.journal import Journal
from deploy_core.models import COMMAND_ROLLBACK, EVENT_CALLBACK, DeployCommand, RollbackTarget
from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    DeployParams,
    DeployType,
    RollbackParams,
    RollbackRequest,
    RollbackStrategy,
    hookimpl,
)
from deploy_core.plugins import load_plugins


class CounterParams(DeployParams):
    """A made-up deploy type: sets a counter, fails when asked."""

    value: int
    fail: bool = False


class Done(BaseModel):
    value: int


class ResetParams(RollbackParams):
    keep: int = 2


async def run_counter(ctx: DeployContext, params: CounterParams) -> Done:
    if params.fail:
        raise DeployFailed(f"counter refused {params.value}")
    return Done(value=params.value)


class Recorder:
    """The plugin: ``deploy.counter`` and the ``reset`` strategy, which records every
    request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, RollbackRequest[CounterParams, ResetParams]]] = []

    def _record(self, phase: str) -> Callable[..., Any]:
        async def record(ctx: DeployContext, request: RollbackRequest[Any, Any]) -> Any:
            self.seen.append((phase, request))
            return {"before": 41} if phase == "prepare" else None

        return record

    @hookimpl
    def deploy_register_deploy_types(self, register: Callable[[DeployType], None]) -> None:
        register(DeployType("deploy.counter", CounterParams, run_counter))

    @hookimpl
    def deploy_register_rollback_strategies(
        self, register: Callable[[RollbackStrategy], None]
    ) -> None:
        register(
            RollbackStrategy(
                "reset",
                ResetParams,
                rollback=self._record("rollback"),
                prepare=self._record("prepare"),
                discard=self._record("discard"),
            )
        )


async def _run(tmp_path: Path, plugin: object, command: DeployCommand) -> dict[str, Any]:
    journal = Journal(tmp_path / "journal.db")
    executor = Executor(
        plugins=load_plugins(extra=[("counter", plugin)], entry_points=False),
        journal=journal,
        data_dir=tmp_path / "data",
        wake=lambda: None,
    )
    journal.accept(command)
    await executor.run(command)
    for message in reversed(journal.pending()):
        if message.name == EVENT_CALLBACK and message.deploy_id == command.deploy_id:
            return dict(message.payload)
    raise AssertionError(f"no callback for {command.deploy_id}")


def _command(params: dict[str, Any], **fields: Any) -> DeployCommand:
    return DeployCommand(
        deploy_id=uuid.uuid4().hex,
        command_type="deploy.counter",
        params=params,
        rollback={"strategy": "reset", "keep": 5},
        expires_at=time.time() + 60,
        **fields,
    )


async def test_a_failed_deployment_hands_the_strategy_its_validated_params(
    tmp_path: Path,
) -> None:
    plugin = Recorder()
    command = _command({"value": 7, "fail": True})
    payload = await _run(tmp_path, plugin, command)
    assert payload["status"] == "rolled_back"
    assert [phase for phase, _ in plugin.seen] == ["prepare", "rollback"]
    prepared, undone = (request for _, request in plugin.seen)
    for request in (prepared, undone):
        assert request.deploy_id == command.deploy_id
        assert request.command_type == "deploy.counter"
        assert request.params == CounterParams(value=7, fail=True)  # a model, not a dict
        assert request.options == ResetParams(strategy="reset", keep=5)
    assert prepared.state is None and prepared.reason is None
    assert undone.state == {"before": 41}
    assert undone.reason == "counter refused 7"


async def test_a_success_hands_discard_the_prepared_state(tmp_path: Path) -> None:
    plugin = Recorder()
    payload = await _run(tmp_path, plugin, _command({"value": 8}))
    assert payload["status"] == "success"
    assert [(phase, r.state, r.reason) for phase, r in plugin.seen] == [
        ("prepare", None, None),
        ("discard", {"before": 41}, None),
    ]


async def test_a_manual_rollback_names_the_deployment_undone(tmp_path: Path) -> None:
    plugin = Recorder()
    target = RollbackTarget(
        deploy_id="d-earlier",
        command_type="deploy.counter",
        params={"value": 3},
        rollback={"strategy": "reset"},
        rollback_state={"before": 2},
    )
    command = DeployCommand(
        deploy_id="r-1",
        command_type=COMMAND_ROLLBACK,
        expires_at=time.time() + 60,
        rollback_of=target,
    )
    payload = await _run(tmp_path, plugin, command)
    assert payload["status"] == "rolled_back"
    [(phase, request)] = plugin.seen
    assert phase == "rollback"
    assert (request.deploy_id, request.params, request.state, request.reason) == (
        "d-earlier",
        CounterParams(value=3),
        {"before": 2},
        "manual rollback",
    )


async def test_a_rollback_of_a_type_this_agent_lacks_fails_before_the_strategy(
    tmp_path: Path,
) -> None:
    plugin = Recorder()
    target = RollbackTarget(
        deploy_id="d-gone",
        command_type="deploy.gone",
        params={"anything": 1},
        rollback={"strategy": "reset"},
    )
    command = DeployCommand(
        deploy_id="r-2",
        command_type=COMMAND_ROLLBACK,
        expires_at=time.time() + 60,
        rollback_of=target,
    )
    payload = await _run(tmp_path, plugin, command)
    assert payload["status"] == "rollback_failed"
    assert payload["rollback"]["error"] == (
        "cannot roll back: this agent has no plugin for deploy.gone, the type of deployment "
        "d-gone; load it to roll the deployment back"
    )
    assert plugin.seen == []

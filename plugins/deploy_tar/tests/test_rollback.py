"""The ``release`` rollback strategy, run by the core's executor as on an agent: back to the
previous release after a failure, started again, the failed release marked bad and never used
again; manual rollbacks; retention after a success."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from conftest import AgentBench, LocalArtifacts

from deploy_core import hookimpl
from deploy_core.agent.context import DeployContext
from deploy_core.registry import HealthCheckParams, HealthCheckType
from deploy_tar.releases import BAD_MARKER, Releases

# Appends "<version> <action>" to $EVENTS; a package with a file named "fail" fails.
INSTALL = (
    'echo "$(cat version) $DEPLOY_ACTION $PREVIOUS_RELEASE" >> "$EVENTS"\n'
    "if [ -f fail ]; then echo 'migration failed' >&2; exit 3; fi\n"
)

Package = Callable[..., str]


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return tmp_path / "events.log"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return tmp_path / "srv" / "app"


@pytest.fixture
def release(package: Package, app: Path, events: Path) -> Callable[..., dict[str, object]]:
    """``release("2", fail=True)``: the parameters deploying version 2 of the app."""

    def make(version: str, *, fail: bool = False, **extra: object) -> dict[str, object]:
        files: dict[str, str | bytes] = {"version": version, "install.sh": INSTALL}
        if fail:
            files["fail"] = ""
        return {
            "artifact": package(files),
            "target_dir": str(app),
            "env": {"EVENTS": str(events)},
            **extra,
        }

    return make


def lines(events: Path) -> list[str]:
    return [line.strip() for line in events.read_text().splitlines()]


async def test_failed_install_switches_back_and_starts_the_previous_release(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path, events: Path
) -> None:
    first = await agent.deploy(release("1"), deploy_id="r1")
    assert first["status"] == "success"

    second = await agent.deploy(release("2", fail=True), deploy_id="r2")

    assert second["status"] == "rolled_back", second["error"]
    assert second["error"] == "install script install.sh exited with code 3: migration failed"
    assert second["rollback"]["strategy"] == "release" and second["rollback"]["success"]
    assert second["rollback_state"]["previous"] == "r1"
    assert os.readlink(app / "current") == "releases/r1"
    assert (
        (app / "releases" / "r2" / BAD_MARKER)
        .read_text()
        .endswith(
            "rolled back by r2: install script install.sh exited with code 3: migration failed\n"
        )
    )
    assert lines(events) == [
        "1 install",
        f"2 install {app}/releases/r1",
        f"1 rollback {app}/releases/r2",  # the previous release started again
    ]


class FileCheckParams(HealthCheckParams):
    type: Literal["file"] = "file"
    path: str


async def file_exists(params: FileCheckParams, ctx: DeployContext) -> str | None:
    return None if os.path.exists(params.path) else f"{params.path} is missing"


class FileCheck:
    """A health check plugin for these tests: healthy while a file exists."""

    @staticmethod
    @hookimpl
    def deploy_register_health_checks(register: Callable[[HealthCheckType], None]) -> None:
        register(HealthCheckType(name="file", params=FileCheckParams, probe=file_exists))


async def test_health_failure_after_the_switch_goes_back_and_rechecks(
    tmp_path: Path,
    artifacts: LocalArtifacts,
    package: Package,
    app: Path,
    events: Path,
) -> None:
    agent = AgentBench(tmp_path / "checked-agent", artifacts, extra=[("file_check", FileCheck)])
    check = {"type": "file", "path": f"{app}/current/healthy", "retries": 0, "interval": 0}
    env = {"EVENTS": str(events)}
    healthy = {"version": "1", "install.sh": INSTALL, "healthy": ""}
    await agent.deploy(
        {"artifact": package(healthy), "target_dir": str(app), "env": env}, deploy_id="r1"
    )
    unhealthy = {"version": "2", "install.sh": INSTALL}

    second = await agent.deploy(
        {"artifact": package(unhealthy), "target_dir": str(app), "env": env},
        deploy_id="r2",
        health_checks=[check],
    )

    assert second["status"] == "rolled_back", second["error"]
    assert second["error"] == f"health check failed: file: {app}/current/healthy is missing"
    assert second["rollback"]["health"][0]["success"]  # checked again, on r1
    assert os.readlink(app / "current") == "releases/r1"
    assert Releases(app).is_bad("r2")
    assert lines(events)[-1] == f"1 rollback {app}/releases/r2"
    agent.journal.close()


async def test_first_deployment_failing_leaves_no_current(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path
) -> None:
    result = await agent.deploy(release("1", fail=True), deploy_id="r1")
    assert result["status"] == "rolled_back"
    assert not os.path.lexists(app / "current")
    assert Releases(app).is_bad("r1")


async def test_refused_package_has_nothing_to_undo(
    agent: AgentBench,
    release: Callable[..., dict[str, object]],
    package: Package,
    app: Path,
    events: Path,
) -> None:
    await agent.deploy(release("1"), deploy_id="r1")
    bad = {"artifact": package({"/etc/evil": "x"}), "target_dir": str(app)}

    result = await agent.deploy(bad, deploy_id="r2")

    assert result["status"] == "rolled_back"
    assert "member '/etc/evil'" in result["error"] and "(rule absolute)" in result["error"]
    assert sorted(os.listdir(app / "releases")) == ["r1"]
    assert lines(events) == ["1 install"]  # the live release was left alone


async def test_a_bad_previous_release_is_skipped_for_the_newest_good_one(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path, events: Path
) -> None:
    await agent.deploy(release("1"), deploy_id="r1")
    await agent.deploy(release("2"), deploy_id="r2")
    Releases(app).mark_bad("r2", "found broken by hand")

    result = await agent.deploy(release("3", fail=True), deploy_id="r3")

    assert result["status"] == "rolled_back", result["error"]
    assert os.readlink(app / "current") == "releases/r1"
    assert lines(events)[-1] == f"1 rollback {app}/releases/r3"
    with pytest.raises(Exception, match="marked bad"):
        Releases(app).switch("r2")


async def test_start_script_of_the_strategy_replaces_the_install_script(
    agent: AgentBench, package: Package, app: Path, events: Path
) -> None:
    files: dict[str, str | bytes] = {
        "install.sh": 'echo install >> "$EVENTS"\n',
        "bin/start": f'#!/bin/sh\necho "start $DEPLOY_ACTION $DEPLOY_ROLLBACK_OF" >> {events}\n',
    }
    env = {"EVENTS": str(events)}
    await agent.deploy({"artifact": package(files), "target_dir": str(app), "env": env})
    broken = {"artifact": package({"install.sh": "exit 1\n"}), "target_dir": str(app)}

    result = await agent.deploy(
        broken, deploy_id="r2", rollback={"strategy": "release", "start": "bin/start"}
    )

    assert result["status"] == "rolled_back", result["error"]
    assert lines(events) == ["install", "start rollback r2"]


async def test_failing_start_is_a_failed_rollback(
    agent: AgentBench, package: Package, app: Path
) -> None:
    once = 'if [ "$DEPLOY_ACTION" = rollback ]; then echo "port in use" >&2; exit 2; fi\n'
    await agent.deploy({"artifact": package({"install.sh": once}), "target_dir": str(app)})
    broken = {"artifact": package({"install.sh": "exit 1\n"}), "target_dir": str(app)}

    result = await agent.deploy(broken)

    assert result["status"] == "rollback_failed"
    assert result["rollback"]["error"].endswith(
        "but starting it failed: install.sh of release "
        f"{os.readlink(app / 'current').split('/')[1]} exited with code 2: port in use"
    )


async def test_manual_rollback_of_a_success_goes_back_to_the_release_before(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path, events: Path
) -> None:
    await agent.deploy(release("1"), deploy_id="r1")
    params = release("2")
    second = await agent.deploy(params, deploy_id="r2")
    assert second["status"] == "success"

    undone = await agent.roll_back(second, params)

    assert undone["status"] == "rolled_back", undone["error"]
    assert os.readlink(app / "current") == "releases/r1"
    assert Releases(app).is_bad("r2")
    assert "manual rollback" in (app / "releases" / "r2" / BAD_MARKER).read_text()
    assert lines(events)[-1] == f"1 rollback {app}/releases/r2"


async def test_manual_rollback_refuses_when_a_later_release_is_current(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path
) -> None:
    await agent.deploy(release("1"), deploy_id="r1")
    params = release("2")
    second = await agent.deploy(params, deploy_id="r2")
    await agent.deploy(release("3"), deploy_id="r3")

    undone = await agent.roll_back(second, params)

    assert undone["status"] == "rollback_failed"
    assert (
        "points at release r3, made after r2; roll back the deployment of r3 first"
        in (undone["rollback"]["error"])
    )
    assert os.readlink(app / "current") == "releases/r3"


async def test_success_prunes_beyond_keep_releases_but_never_current_or_previous(
    agent: AgentBench, release: Callable[..., dict[str, object]], app: Path
) -> None:
    for n in range(1, 5):
        result = await agent.deploy(release(str(n), keep_releases=1), deploy_id=f"r{n}")
        assert result["status"] == "success"
    (app / "releases" / ".staging-left-by-a-crash").mkdir()

    await agent.deploy(release("5", keep_releases=3), deploy_id="r5")

    assert Releases(app).names() == ["r3", "r4", "r5"]
    assert sorted(os.listdir(app / "releases")) == ["r3", "r4", "r5"]
    assert [e["name"] for e in Releases(app)._entries()] == ["r3", "r4", "r5"]


async def test_agent_restart_during_install_rolls_back_on_recovery(
    tmp_path: Path,
    agent: AgentBench,
    artifacts: LocalArtifacts,
    release: Callable[..., dict[str, object]],
    package: Package,
    app: Path,
    events: Path,
) -> None:
    await agent.deploy(release("1"), deploy_id="r1")
    slow = 'echo "2 install" >> "$EVENTS"; sleep 1\n'
    params = {"artifact": package({"install.sh": slow}), "target_dir": str(app)}
    params["env"] = {"EVENTS": str(events)}
    running = asyncio.create_task(agent.deploy(params, deploy_id="r2"))
    for _ in range(200):
        if events.read_text().count("\n") == 2:
            break
        await asyncio.sleep(0.02)
    running.cancel()  # the agent process dies here
    with contextlib.suppress(asyncio.CancelledError):
        await running
    entry = agent.journal.get("r2")
    assert entry is not None and entry.state == "started"

    restarted = AgentBench(tmp_path / "agent", artifacts)
    status = await restarted.executor.recover(
        entry.command, entry.stage, entry.rollback_state, entry.progress
    )

    assert status.value == "rolled_back"
    assert os.readlink(app / "current") == "releases/r1"
    assert Releases(app).is_bad("r2")
    assert lines(events)[-1] == f"1 rollback {app}/releases/r2"
    restarted.journal.close()

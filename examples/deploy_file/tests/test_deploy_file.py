"""deploy.file: the executor and the rollback strategy on real files, the registration, and
deployments through a real server and agent."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.plugin import (
    DeployContext,
    DeployFailed,
    DeployParams,
    RollbackRequest,
    RollbackState,
)
from deploy_core.plugins import load_plugins
from deploy_core.testing import DeployCenter, RecordingReporter, rollback_request
from pydantic import ValidationError

from deploy_file.plugin import (
    STAGES,
    FileParams,
    RestoreParams,
    keep_copy,
    prune_copies,
    restore_copy,
    write_file,
)

Factory = Callable[..., tuple[DeployContext, RecordingReporter]]


def request(
    ctx: DeployContext, options: RestoreParams | None = None, state: RollbackState | None = None
) -> RollbackRequest[FileParams, RestoreParams]:
    """What the agent hands ``file_restore`` for the deployment of ``ctx``."""
    return rollback_request(ctx, FileParams, options or RestoreParams(), state)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- the executor


async def test_writes_the_content_with_the_mode(deploy_context: Factory, tmp_path: Path) -> None:
    target = tmp_path / "app.conf"
    ctx, reporter = deploy_context(stages=STAGES)
    result = await write_file(ctx, FileParams(path=str(target), content="port = 80\n", mode="640"))
    assert target.read_text() == "port = 80\n"
    assert mode_of(target) == 0o640
    assert result.mode == "0640" and result.bytes == 10
    assert result.sha256 == hashlib.sha256(b"port = 80\n").hexdigest()
    assert result.previous_sha256 is None and result.changed
    assert reporter.statuses == ["executing", "installing", "installing"]
    assert [r[1] for r in reporter.reports] == [5, 10, 90]
    assert reporter.lines()[0].startswith(f"wrote {target}: 10 bytes")


async def test_replacing_a_file_reports_the_previous_hash(
    deploy_context: Factory, tmp_path: Path
) -> None:
    target = tmp_path / "app.conf"
    target.write_text("old\n")
    ctx, _ = deploy_context()
    result = await write_file(ctx, FileParams(path=str(target), content="old\n"))
    assert result.previous_sha256 == result.sha256 and not result.changed
    assert [p.name for p in tmp_path.iterdir()] == ["app.conf"], "no temporary file left"


async def test_a_missing_directory_fails_before_writing(
    deploy_context: Factory, tmp_path: Path
) -> None:
    ctx, reporter = deploy_context(stages=STAGES)
    with pytest.raises(DeployFailed, match="does not exist"):
        await write_file(ctx, FileParams(path=str(tmp_path / "nope" / "a.conf"), content="x"))
    assert reporter.statuses == ["executing"]


async def test_a_directory_is_not_overwritten(deploy_context: Factory, tmp_path: Path) -> None:
    ctx, _ = deploy_context()
    with pytest.raises(DeployFailed, match="not a regular file"):
        await write_file(ctx, FileParams(path=str(tmp_path), content="x"))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"path": "relative.conf", "content": "x"}, "path"),
        ({"path": "/etc/", "content": "x"}, "path"),
        ({"path": "/tmp/a", "content": "x", "mode": "0999"}, "mode"),
        ({"path": "/tmp/a", "content": "x", "mode": "rw-r--r--"}, "mode"),
        ({"path": "/tmp/a", "content": "x" * (512 * 1024 + 1)}, "content"),
        ({"path": "/tmp/a", "content": "x", "owner": "root"}, "owner"),
    ],
)
def test_bad_parameters_name_the_field(fields: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError) as err:
        FileParams.model_validate(fields)
    assert where in str(err.value)


# ----------------------------------------------------------------------------- the rollback


async def test_restore_puts_back_the_previous_content_and_mode(
    deploy_context: Factory, tmp_path: Path
) -> None:
    target = tmp_path / "app.conf"
    target.write_text("version 1\n")
    target.chmod(0o600)
    params = {"path": str(target), "content": "version 2\n", "mode": "0644"}
    ctx, _ = deploy_context(command_type="deploy.file", params=params)
    state = await keep_copy(ctx, request(ctx))
    assert state["existed"] is True and state["mode"] == "0600"
    await write_file(ctx, FileParams.model_validate(params))
    assert target.read_text() == "version 2\n"
    await restore_copy(ctx, request(ctx, state=state))
    assert target.read_text() == "version 1\n"
    assert mode_of(target) == 0o600


async def test_restore_removes_a_file_the_deployment_created(
    deploy_context: Factory, tmp_path: Path
) -> None:
    target = tmp_path / "new.conf"
    params = {"path": str(target), "content": "fresh\n"}
    ctx, _ = deploy_context(command_type="deploy.file", params=params)
    state = await keep_copy(ctx, request(ctx))
    assert state == {"path": str(target), "existed": False}
    await write_file(ctx, FileParams.model_validate(params))
    await restore_copy(ctx, request(ctx, state=state))
    assert not target.exists()


async def test_discard_keeps_only_the_newest_copies(
    deploy_context: Factory, tmp_path: Path
) -> None:
    target = tmp_path / "app.conf"
    target.write_text("v0")
    states = []
    for n in range(1, 5):
        ctx, _ = deploy_context(
            command_type="deploy.file",
            deploy_id=f"d{n}",
            params={"path": str(target), "content": f"v{n}"},
        )
        states.append(await keep_copy(ctx, request(ctx)))
        target.write_text(f"v{n}")
        await prune_copies(ctx, request(ctx, RestoreParams(keep=2), states[-1]))
    kept = sorted(p.name for p in Path(states[-1]["backup"]).parent.iterdir())
    assert [name.split("-", 1)[1] for name in kept] == ["d3", "d4"]
    with pytest.raises(RuntimeError, match="gone"):
        await restore_copy(ctx, request(ctx, state=states[0]))


class ScriptParams(DeployParams):
    """Another deploy type's parameters."""

    script: str


async def test_file_restore_refuses_other_deploy_types(deploy_context: Factory) -> None:
    ctx, _ = deploy_context(command_type="deploy.shell", params={"script": "true"})
    with pytest.raises(RuntimeError, match=r"only undoes deploy\.file, not deploy\.shell"):
        await keep_copy(ctx, rollback_request(ctx, ScriptParams, RestoreParams()))


# ----------------------------------------------------------------------------- the plugin


def test_registered_through_the_entry_point() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_file"})
    assert plugins.deploy_types.owners["deploy.file"] == "deploy_file"
    assert plugins.rollback_strategies.owners["file_restore"] == "deploy_file"
    assert plugins.deploy_types.entries["deploy.file"].default_rollback == "file_restore"


def test_deploys_and_rolls_back_through_a_real_server_and_agent(
    deploy_center: DeployCenter, tmp_path: Path
) -> None:
    deploy_center.start_agent("files")
    target = tmp_path / "app.conf"
    target.write_text("version 1\n")
    target.chmod(0o600)
    accepted = deploy_center.api.deploy(
        "file",
        {
            "client_id": "files",
            "path": str(target),
            "content": "version 2\n",
            "mode": "0644",
            "rollback": {"strategy": "file_restore"},
        },
    )
    record = deploy_center.wait(accepted["deploy_id"], timeout=30)
    assert record["status"] == "success", record["error"]
    assert record["result"]["previous_sha256"] == hashlib.sha256(b"version 1\n").hexdigest()
    assert target.read_text() == "version 2\n" and mode_of(target) == 0o644

    rollback = deploy_center.api.request("POST", f"/api/deploy/{record['deploy_id']}/rollback")
    undone = deploy_center.wait(rollback["deploy_id"], timeout=30)
    assert undone["status"] == "rolled_back", undone["error"]
    assert target.read_text() == "version 1\n" and mode_of(target) == 0o600


def test_a_failed_write_is_rolled_back_with_the_default_strategy(
    deploy_center: DeployCenter, tmp_path: Path
) -> None:
    deploy_center.start_agent("files")
    accepted = deploy_center.api.deploy(
        "file",
        {
            "client_id": "files",
            "path": str(tmp_path / "nope" / "a.conf"),
            "content": "x",
            "rollback": {},
        },
    )
    record = deploy_center.wait(accepted["deploy_id"], timeout=30)
    assert record["status"] == "rolled_back"
    assert "does not exist" in record["error"]
    assert record["rollback"]["strategy"] == "file_restore"


# ----------------------------------------------------------------------------- trust boundary


async def test_a_directory_swapped_for_a_link_before_the_restore_is_refused(
    deploy_context: Factory, open_base: Path
) -> None:
    """With ``run_as``, the agent (root) writes only where that user could: a script that
    swaps the file's directory for a link to a root-only one gets a refusal, not a write."""
    nobody = pwd.getpwnam("nobody")
    app = open_base / "app"
    app.mkdir()
    (app / "app.conf").write_text("v1\n")
    for path in (app, app / "app.conf"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    decoy = open_base / "root-only"
    decoy.mkdir(mode=0o700)
    (decoy / "app.conf").write_text("root's\n")
    params = FileParams(path=str(app / "app.conf"), content="v2\n")
    ctx, _ = deploy_context(command_type="deploy.file", params=params.model_dump())
    ctx.constraints = ConstraintPolicy(Constraints(run_as="nobody"))
    state = await keep_copy(ctx, request(ctx))
    await write_file(ctx, params)
    assert (app / "app.conf").read_text() == "v2\n"
    app.rename(open_base / "app.moved")  # the script, as nobody, swaps its directory
    app.symlink_to(decoy)

    with pytest.raises(DeployFailed) as caught:
        await restore_copy(ctx, request(ctx, state=state))

    assert str(caught.value).startswith(
        f"refused by constraint run_as: deploy.file path {app}/app.conf (resolves to "
        f"{decoy}/app.conf): nobody (uid {nobody.pw_uid}) cannot enter {decoy}"
    )
    assert (decoy / "app.conf").read_text() == "root's\n"
    assert sorted(os.listdir(decoy)) == ["app.conf"]


def missing_part(reason: str) -> None:
    """Skip, or fail under ``DEPLOY_CENTER_STRICT=1``, because a real part is missing."""
    if os.environ.get("DEPLOY_CENTER_STRICT") == "1":
        pytest.fail(f"required part missing (DEPLOY_CENTER_STRICT=1): {reason}")
    pytest.skip(reason)


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp dir is closed to others)."""
    if os.geteuid() != 0:
        missing_part("run_as needs the agent to be root")
    base = Path(tempfile.mkdtemp(prefix="deploy-file-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base)

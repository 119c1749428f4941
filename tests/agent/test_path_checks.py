"""``DeployContext.check_path``: every path a plugin works on as root is held to the agent's
``workdir_roots`` and, with ``run_as``, to what the run-as user could do there itself."""

from __future__ import annotations

import os
import pwd
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import missing_part

from deploy_core.agent.constraints import ConstraintPolicy, Constraints
from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.models import DeployCommand
from deploy_core.testing import RecordingReporter


def context(data_dir: Path, **settings: Any) -> DeployContext:
    command = DeployCommand(
        deploy_id=f"p-{time.monotonic_ns()}",
        command_type="deploy.test",
        params={},
        expires_at=time.time() + 120,
    )
    return DeployContext(
        command=command,
        reporter=RecordingReporter(),
        data_dir=data_dir,
        constraints=ConstraintPolicy(Constraints.model_validate(settings)),
    )


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user may enter (pytest's own tmp dir is closed to others)."""
    base = Path(tempfile.mkdtemp(prefix="path-checks-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for dirpath, dirnames, filenames in os.walk(base, topdown=False):
            for name in filenames:
                os.unlink(os.path.join(dirpath, name))
            for name in dirnames:
                os.rmdir(os.path.join(dirpath, name))
        base.rmdir()


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        missing_part("checking paths for run_as needs the agent to be root")
    return pwd.getpwnam("nobody")


def test_outside_the_roots_is_refused_naming_the_rule(tmp_path: Path) -> None:
    ctx = context(tmp_path / "data", workdir_roots=[str(tmp_path / "apps")])
    assert ctx.check_path(tmp_path / "apps" / "web", "tar target_dir") == tmp_path / "apps" / "web"
    with pytest.raises(DeployFailed) as caught:
        ctx.check_path("/etc/app", "tar target_dir")
    assert str(caught.value) == (
        "refused by constraint workdir_roots: tar target_dir /etc/app is outside the allowed "
        f"roots {tmp_path / 'apps'}"
    )


def test_a_symlink_out_of_the_roots_is_judged_by_where_it_leads(tmp_path: Path) -> None:
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "web").symlink_to("/etc")
    ctx = context(tmp_path / "data", workdir_roots=[str(tmp_path / "apps")])
    with pytest.raises(DeployFailed, match=r"snapshot path .*/apps/web \(resolves to /etc\)"):
        ctx.check_path(tmp_path / "apps" / "web", "snapshot path", access="replace")


def test_root_and_the_agents_data_are_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path / "data")
    with pytest.raises(DeployFailed, match="resolves to '/'"):
        ctx.check_path("/srv/..", "snapshot path")
    with pytest.raises(DeployFailed, match="inside the agent's data directory"):
        ctx.check_path(tmp_path / "data" / "x", "tar target_dir")


def test_run_as_may_only_have_the_agent_write_where_the_user_could(
    nobody: pwd.struct_passwd, open_base: Path
) -> None:
    ctx = context(open_base / "data", run_as="nobody")
    theirs = open_base / "theirs"
    theirs.mkdir()
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    root_only = open_base / "root-only"
    root_only.mkdir(mode=0o755)

    assert ctx.check_path(theirs / "app", "tar target_dir") == theirs / "app"
    with pytest.raises(DeployFailed) as caught:
        ctx.check_path(root_only / "app", "tar target_dir")
    assert str(caught.value).startswith(
        f"refused by constraint run_as: tar target_dir {root_only}/app: nobody (uid "
        f"{nobody.pw_uid}) cannot create entries in {root_only}"
    )
    # Reading a root-owned, world-readable directory is allowed; replacing it is not.
    assert ctx.check_path(root_only, "bind-mount source", access="read") == root_only
    with pytest.raises(DeployFailed, match="cannot write in"):
        ctx.check_path(root_only, "snapshot path", access="replace")
    # Their own directory in a root-owned parent: they cannot swap it out.
    mine = root_only / "mine"
    mine.mkdir()
    os.chown(mine, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(DeployFailed, match=f"cannot replace entries of {root_only}"):
        ctx.check_path(mine, "snapshot path", access="replace")
    closed = open_base / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    with pytest.raises(DeployFailed, match=f"cannot enter {closed}"):
        ctx.check_path(closed / "inner", "health-check working directory", access="read")


async def test_a_run_as_script_cannot_change_the_directory_its_file_is_in(
    nobody: pwd.struct_passwd, tmp_path: Path
) -> None:
    ctx = context(tmp_path / "data", run_as="nobody")
    script = (
        'dir=$(dirname "$0"); stat -c "%U %a" "$dir" "$0"\n'
        'ln -s /etc/shadow "$dir/planted" 2>/dev/null && echo planted\n'
        'ls "$dir" >/dev/null 2>&1 && echo listed\n'
        "echo done\n"
    )
    result = await ctx.run_script(script, timeout=30)
    assert result.exit_code == 0, result.stderr_tail
    lines = result.stdout_tail.split("\n")
    assert lines[:2] == ["root 711", "nobody 700"]
    assert "planted" not in lines and "listed" not in lines and "done" in lines


async def test_scripts_run_when_the_agents_data_dir_is_reached_through_a_link(
    tmp_path: Path,
) -> None:
    (tmp_path / "disk2" / "data").mkdir(parents=True)
    (tmp_path / "state").symlink_to(tmp_path / "disk2")  # a state directory moved elsewhere
    ctx = context(tmp_path / "state" / "data")
    result = await ctx.run_script("echo ran", timeout=30)
    assert result.exit_code == 0 and result.stdout_tail == "ran\n", result.stderr_tail

"""deploy.tar's executor on real files and real install scripts: the release it makes, the
environment its install script sees, the switch of ``current``, progress through the stages,
and every way it fails."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ContextFactory

import deploy_tar.deploy as deploy_module
from deploy_core.agent.context import DeployFailed
from deploy_core.models import DeployStatus
from deploy_tar.deploy import deploy_release
from deploy_tar.params import TarParams
from deploy_tar.releases import BAD_MARKER, ReleaseError, Releases
from deploy_tar.scripts import run_release_script

ENV_DUMP = (
    "#!/bin/sh\n"
    'echo "$DEPLOY_ACTION|$DEPLOY_ID|$RELEASE_DIR|$PREVIOUS_RELEASE|$TARGET_DIR|$GREETING|$(pwd)"'
    " > installed.txt\n"
    "echo installed $(cat version)\n"
)

Package = Callable[..., str]


def params(sha: str, target: Path, **extra: object) -> dict[str, object]:
    return {"artifact": sha, "target_dir": str(target), **extra}


async def deploy(
    tar_context: ContextFactory, fields: dict[str, object], deploy_id: str | None = None
) -> tuple[Path, list[tuple[DeployStatus, int, str, str]], object]:
    ctx, reporter = tar_context(fields, deploy_id=deploy_id)
    result = await deploy_release(ctx, TarParams.model_validate(fields))
    return Path(str(result.release_dir)), reporter.reports, result


async def test_first_release_is_extracted_installed_and_made_current(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "srv" / "app"  # created on the way
    sha = package({"version": "1\n", "install.sh": ENV_DUMP})
    fields = params(sha, target, env={"GREETING": "hi"})
    ctx, reporter = tar_context(fields, deploy_id="d1")

    result = await deploy_release(ctx, TarParams.model_validate(fields))

    release = target / "releases" / "d1"
    assert result.release_dir == str(release) and result.previous_release is None
    assert result.sha256 == sha and result.install_exit_code == 0
    assert result.install_output_tail == "installed 1\n"
    assert os.readlink(target / "current") == "releases/d1"
    assert (target / "current" / "version").read_text() == "1\n"
    seen = (release / "installed.txt").read_text().strip().split("|")
    assert seen == ["install", "d1", str(release), "", str(target), "hi", str(release)]
    assert Releases(target).entry("d1") == {
        "name": "d1",
        "sha256": sha,
        "install_script": "install.sh",
        "created_at": Releases(target).entry("d1")["created_at"],  # type: ignore[index]
    }
    assert "install:stdout" in {line.stream for line in reporter.logs}


async def test_second_release_sees_the_first_as_previous(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    await deploy(tar_context, params(package({"version": "1\n"}), target), "d1")
    sha = package({"version": "2\n", "install.sh": ENV_DUMP})

    release, _, result = await deploy(tar_context, params(sha, target), "d2")

    previous = str(target / "releases" / "d1")
    assert result.previous_release == previous  # type: ignore[attr-defined]
    assert (release / "installed.txt").read_text().split("|")[3] == previous
    assert os.readlink(target / "current") == "releases/d2"
    assert Releases(target).names() == ["d1", "d2"]


async def test_progress_goes_through_the_stages_in_their_ranges(
    tar_context: ContextFactory, package: Package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy_module, "REPORT_EVERY", 0.0)  # every percent, however fast
    sha = package({"data.bin": os.urandom(3 * 1024 * 1024), "install.sh": "true\n"})
    _, reports, _ = await deploy(tar_context, params(sha, tmp_path / "app"))

    statuses = [r[0].value for r in reports]
    assert statuses[0] == "uploading" and statuses[-1] == "installing"
    assert statuses.index("extracting") > max(i for i, s in enumerate(statuses) if s == "uploading")
    progress = [r[1] for r in reports]
    assert progress == sorted(progress) and progress[-1] == 90
    ranges = {"uploading": (0, 30), "extracting": (30, 60), "installing": (60, 90)}
    for status, value, _, _ in reports:
        low, high = ranges[status.value]
        assert low <= value <= high
    assert any(30 < r[1] < 60 for r in reports)  # extraction reports as it goes
    assert reports[-1][3] == f"current -> releases/{Path(reports[-1][3]).name}"


async def test_package_without_install_script_is_switched_to_as_is(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    _, reports, result = await deploy(tar_context, params(package({"a": "x"}), tmp_path / "app"))
    assert result.install_exit_code is None  # type: ignore[attr-defined]
    assert any(r[3] == "no install script" for r in reports)
    assert (tmp_path / "app" / "current" / "a").read_text() == "x"


async def test_named_install_script_runs_instead_of_install_sh(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    sha = package({"install.sh": "exit 9\n", "bin/setup": "#!/bin/sh\necho setup > done\n"})
    release, _, _ = await deploy(
        tar_context, params(sha, tmp_path / "app", install_script="./bin/setup")
    )
    assert (release / "done").read_text() == "setup\n"


async def test_failed_install_marks_the_release_bad_and_keeps_current(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    await deploy(tar_context, params(package({"v": "1"}), target), "good")
    sha = package({"install.sh": "echo starting\necho 'no database' >&2\nexit 4\n"})

    with pytest.raises(DeployFailed) as caught:
        await deploy(tar_context, params(sha, target), "broken")

    error = caught.value
    assert error.status is DeployStatus.FAILED
    assert str(error) == "install script install.sh exited with code 4: no database"
    result = error.result.model_dump()  # type: ignore[union-attr]
    assert result["install_exit_code"] == 4 and result["bytes_sent"] > 0
    assert result["install_output_tail"] == "starting\n--- stderr ---\nno database\n"
    assert os.readlink(target / "current") == "releases/good"
    assert "exited with code 4" in (target / "releases" / "broken" / BAD_MARKER).read_text()


async def test_install_past_the_timeout_ends_timeout(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    sha = package({"install.sh": "sleep 30\n"})
    with pytest.raises(DeployFailed) as caught:
        await deploy(tar_context, params(sha, tmp_path / "app", timeout=1))
    assert caught.value.status is DeployStatus.TIMEOUT
    assert "timed out after" in str(caught.value)
    assert not os.path.lexists(tmp_path / "app" / "current")


async def test_malicious_package_fails_naming_member_and_rule_and_writes_nothing(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    sha = package({"ok.txt": "fine", "../escape.txt": "pwned"})

    with pytest.raises(DeployFailed) as caught:
        await deploy(tar_context, params(sha, target))

    assert str(caught.value) == (
        "package refused: member '../escape.txt': path escapes the release directory ('..')"
        " (rule traversal)"
    )
    assert os.listdir(target / "releases") == []
    assert not (tmp_path / "escape.txt").exists() and not (target / "escape.txt").exists()


async def test_missing_named_install_script_fails_clearly(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    sha = package({"install.sh": "true\n"})
    with pytest.raises(DeployFailed, match=r"the package has no file 'setup\.sh'"):
        await deploy(tar_context, params(sha, tmp_path / "app", install_script="setup.sh"))


async def test_install_script_symlinked_out_of_the_release_is_refused(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    # A symlink the extraction accepts (it stays inside) cannot be used to run a host file
    # either: the script is read from inside the release only.
    sha = package({"real.sh": "echo hi\n"})
    release, _, _ = await deploy(tar_context, params(sha, tmp_path / "app"), "d1")
    (tmp_path / "host.sh").write_text("echo host\n")
    os.symlink(tmp_path / "host.sh", release / "evil.sh")
    ctx, _ = tar_context(params(sha, tmp_path / "app"))

    with pytest.raises(ReleaseError, match="resolves outside its release"):
        await run_release_script(
            ctx,
            release,
            "evil.sh",
            action="install",
            target_dir=tmp_path / "app",
            other_release=None,
            env={},
            timeout=5,
        )


async def test_unknown_artifact_fails_with_the_servers_reason(
    tar_context: ContextFactory, tmp_path: Path
) -> None:
    with pytest.raises(DeployFailed, match="unknown artifact"):
        await deploy(tar_context, params("ab" * 32, tmp_path / "app"))


async def test_target_inside_the_agents_data_dir_is_refused(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    sha = package({"a": "b"})
    with pytest.raises(DeployFailed, match="inside the agent's data directory"):
        await deploy(tar_context, params(sha, tmp_path / "agent" / "data" / "app"))
    with pytest.raises(DeployFailed, match="inside the agent's artifact cache"):
        await deploy(tar_context, params(sha, tmp_path / "agent" / "cache" / "app"))


async def test_current_that_is_a_real_directory_is_not_replaced(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    (target / "current").mkdir(parents=True)
    (target / "current" / "keep").write_text("mine")
    with pytest.raises(DeployFailed, match="current is not a symlink; move it away"):
        await deploy(tar_context, params(package({"a": "b"}), target))
    assert (target / "current" / "keep").read_text() == "mine"


async def test_without_rollback_old_releases_are_pruned_by_the_deployment(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    for n in range(4):
        fields = params(package({"v": str(n)}), target, keep_releases=2)
        await deploy(tar_context, fields, f"d{n}")
    assert Releases(target).names() == ["d2", "d3"]


async def test_progress_reports_are_throttled(
    tar_context: ContextFactory, package: Package, tmp_path: Path
) -> None:
    sha = package({"data.bin": os.urandom(8 * 1024 * 1024)})
    _, reports, _ = await deploy(tar_context, params(sha, tmp_path / "app"))
    extracting = [r for r in reports if r[0] is DeployStatus.EXTRACTING]
    assert 3 <= len(extracting) < 10  # start, end, and what 0.2 s allowed in between
    assert extracting[-1][3] == "1 files, 0 directories, 0 symlinks, 8.0 MiB"

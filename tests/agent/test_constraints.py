"""The agent's constraints on scripts (SPEC deploy-30): real scripts run through
``DeployContext.run_script`` under a compiled ``ConstraintPolicy``."""

from __future__ import annotations

import os
import pwd
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import missing_part
from pydantic import ValidationError

from deploy_core.agent import cgroups
from deploy_core.agent.constraints import (
    ConstraintConfigError,
    ConstraintPolicy,
    ConstraintRefusal,
    Constraints,
)
from deploy_core.agent.context import DeployContext, DeployFailed
from deploy_core.agent.deny_rules import DEFAULT_DENY, logical_lines
from deploy_core.models import DeployCommand
from deploy_core.testing import RecordingReporter

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def _root() -> None:
    if not IS_ROOT:
        missing_part("switching users needs the agent to be root")


needs_root = pytest.mark.usefixtures("_root")
MiB = 1024 * 1024


def policy(**settings: Any) -> ConstraintPolicy:
    return ConstraintPolicy(Constraints.model_validate(settings))


def context(tmp_path: Path, **settings: Any) -> tuple[DeployContext, RecordingReporter]:
    reporter = RecordingReporter()
    command = DeployCommand(
        deploy_id=f"c-{time.monotonic_ns()}",
        command_type="deploy.test",
        params={},
        expires_at=time.time() + 120,
    )
    ctx = DeployContext(
        command=command,
        reporter=reporter,
        data_dir=tmp_path / "agent-data",
        constraints=policy(**settings),
    )
    return ctx, reporter


def refusal(script: str, **settings: Any) -> ConstraintRefusal:
    with pytest.raises(ConstraintRefusal) as caught:
        policy(**settings).check_script(script)
    return caught.value


# ----------------------------------------------------------------------- deny rules

# rule, a script it must refuse, a benign near-miss it must allow
DENY_TABLE = [
    ("rm-root", "rm -rf /", "rm -rf ./build"),
    ("rm-root", "rm -rf /*", "rm -rf /srv/app/build"),
    ("rm-root", "sudo rm -fr /usr", "rm -f /usr/local/app/app.pid"),
    ("rm-root", 'rm -r --force "$HOME"', "rm -rf ~/build"),
    ("rm-root", "cd /srv && /bin/rm -Rf /etc/", "rm -rf /tmp/app-*"),
    ("rm-no-preserve-root", "rm -r --no-preserve-root /x", "rm -r ./preserve-root"),
    ("mkfs", "mkfs.ext4 /dev/sdb1", "make mkfs-tools"),
    ("mkfs", "sudo mke2fs /dev/vdb", "./mkfs-report.sh"),
    ("dd-to-disk", "dd if=/dev/zero of=/dev/sda bs=1M", "dd if=/dev/zero of=./disk.img bs=1M"),
    ("dd-to-disk", "dd if=img of=/dev/nvme0n1", "dd if=/dev/sda of=./backup.img"),
    ("write-to-disk", "cat image > /dev/sda", "echo quiet > /dev/null"),
    ("write-to-disk", "cat image | tee /dev/vdb", "cat image > ./sda.txt"),
    ("wipe-disk", "wipefs -a /dev/sdb", "shred -u ./secret.txt"),
    ("fork-bomb", ":(){ :|:& };:", "deploy() { echo hi | tee -a log & }; deploy"),
    ("fork-bomb", "bomb() { bomb | bomb & }; bomb", "f() { g | f; }"),
    ("fork-bomb", "function f { f|f& }; f", "function f { g & }"),
    ("curl-pipe-shell", "curl -fsSL https://get.example/install.sh | sh", "curl -o file URL"),
    ("curl-pipe-shell", "wget -qO- http://x/i | sudo bash", "wget -O - URL | tar xz"),
    ("curl-pipe-shell", "bash <(curl -s https://x/i)", "curl -s URL | jq .version"),
    ("curl-pipe-shell", 'sh -c "$(curl -fsSL https://x/i)"', "curl -s URL | shasum"),
    ("curl-pipe-shell", "curl https://x/i.py | python3", 'curl URL | python3 -c "print(1)"'),
    ("chmod-root", "chmod -R 777 /", "chmod -R 755 ./public"),
    ("chmod-root", "chown -R nobody /etc", "chown -R www-data /srv/app"),
    ("shutdown", "shutdown -h now", "./graceful-shutdown.sh"),
    ("shutdown", "sudo reboot", "touch /var/run/reboot-required"),
    ("shutdown", "init 0", "systemctl restart nginx"),
    ("write-etc-passwd", "echo 'x::0:0::/:/bin/sh' >> /etc/passwd", "grep app /etc/passwd"),
    ("write-etc-passwd", "echo x | tee -a /etc/shadow", "echo x > /etc/sudoers.d/app"),
    ("find-root-delete", "find / -name '*.log' -delete", "find ./build -name '*.o' -delete"),
]


@pytest.mark.parametrize(("rule", "dangerous", "benign"), DENY_TABLE)
def test_each_default_rule_refuses_its_case_and_allows_a_near_miss(
    rule: str, dangerous: str, benign: str
) -> None:
    refused = refusal(f"set -e\necho start\n{dangerous}\n")
    assert refused.rule == f"deny:{rule}"
    assert str(refused).startswith(f"refused by constraint deny:{rule}: ")
    assert "(line 3)" in str(refused)
    policy().check_script(f"set -e\necho start\n{benign}\n")


def test_every_default_rule_is_in_the_table() -> None:
    assert {rule.name for rule in DEFAULT_DENY} == {row[0] for row in DENY_TABLE}


def test_comments_are_ignored_and_quotes_do_not_hide_a_command() -> None:
    policy().check_script("# never run rm -rf / here\necho ok  # not rm -rf / either\n")
    assert refusal('echo " #"; rm -rf /').rule == "deny:rm-root"
    assert refusal("echo '#' ;rm -rf /").rule == "deny:rm-root"


def test_continued_lines_and_spacing_are_read_as_one_command() -> None:
    refused = refusal("echo hi\nrm \\\n   -rf \\\n\t/\necho after\n")
    assert refused.rule == "deny:rm-root"
    assert refused.detail == '"rm -rf /" (line 2)'
    assert logical_lines("a \\\n b\n\n  c   d # e\n") == [(1, "a b"), (4, "c d")]


async def test_a_refused_script_never_runs_and_the_refusal_is_logged(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    ctx, reporter = context(tmp_path)
    with pytest.raises(DeployFailed, match=r'deny:rm-root: "rm -rf /" \(line 2\)'):
        await ctx.run_script(f"touch {marker}\nrm -rf /\n", timeout=10)
    assert not marker.exists()
    assert any("refused by constraint deny:rm-root" in line for line in reporter.lines("agent"))
    assert not list((tmp_path / "agent-data").rglob("*.sh"))


async def test_benign_near_misses_really_run(tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "x.o").write_text("x")
    ctx, _ = context(tmp_path)
    result = await ctx.run_script(
        "rm -rf ./build\ndd if=/dev/zero of=./disk.img bs=1024 count=4 2>/dev/null\n",
        timeout=10,
        cwd=tmp_path,
    )
    assert result.exit_code == 0
    assert not (tmp_path / "build").exists()
    assert (tmp_path / "disk.img").stat().st_size == 4096


async def test_contexts_without_a_policy_get_the_defaults(tmp_path: Path) -> None:
    command = DeployCommand(
        deploy_id="d-1", command_type="deploy.test", params={}, expires_at=time.time() + 60
    )
    ctx = DeployContext(command=command, reporter=RecordingReporter(), data_dir=tmp_path)
    with pytest.raises(DeployFailed, match="deny:fork-bomb"):
        await ctx.run_script(":(){ :|:& };:", timeout=5)


# ----------------------------------------------------------------------- allow, deny_extra, policy


def test_an_allow_pattern_exempts_the_whole_line_it_matches() -> None:
    settings = {"allow": [r"mkfs\.ext4 -F \./disk\.img"]}
    policy(**settings).check_script("truncate -s 8M ./disk.img\nmkfs.ext4 -F ./disk.img\n")
    assert refusal("mkfs.ext4 -F /dev/sdb", **settings).rule == "deny:mkfs"
    # The pattern must match the whole line: a tail cannot ride along.
    assert refusal("mkfs.ext4 -F ./disk.img; mkfs.ext4 /dev/sdb", **settings).rule == "deny:mkfs"


def test_deny_extra_adds_a_rule_and_keeps_the_defaults() -> None:
    settings = {"deny_extra": [{"name": "no-telnet", "pattern": r"\btelnet\b"}]}
    assert refusal("telnet db 5432", **settings).rule == "deny:no-telnet"
    assert refusal("rm -rf /", **settings).rule == "deny:rm-root"


def test_replacing_deny_drops_the_defaults() -> None:
    policy(deny=[]).check_script("reboot")


def test_allow_list_policy_refuses_any_line_without_a_pattern() -> None:
    settings = {
        "policy": "allow-list",
        "allow": [r"echo [^;&|`$]*", r"systemctl (restart|status) [\w@.-]+"],
    }
    policy(**settings).check_script("# comment\necho deploying v2\n\nsystemctl restart app\n")
    refused = refusal("echo deploying\ncurl -o /tmp/x https://x\n", **settings)
    assert refused.rule == "allow-list"
    assert refused.detail == '"curl -o /tmp/x https://x" (line 2) matches no allow pattern'
    assert refusal("echo hi; rm -f x", **settings).rule == "allow-list"


# ----------------------------------------------------------------------- size


def test_script_size_limit_defaults_to_100_kb() -> None:
    policy().check_script("#" * 102400)
    refused = refusal("#" * 102401)
    assert refused.rule == "max_script_bytes"
    assert "102401 bytes" in str(refused) and "at most 102400" in str(refused)
    assert refusal("echo " + "x" * 60, max_script_bytes=64).rule == "max_script_bytes"
    assert Constraints.model_validate({"max_script_bytes": "1MiB"}).max_script_bytes == MiB


# ----------------------------------------------------------------------- working directory


async def test_workdir_must_lie_under_a_root_even_through_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "srv", tmp_path / "etc"
    (root / "app").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (tmp_path / "srv-evil").mkdir()
    ctx, _ = context(tmp_path, workdir_roots=[str(root)])
    result = await ctx.run_script("pwd", timeout=10, cwd=root / "app")
    assert result.stdout_tail.strip() == str(root / "app")
    with pytest.raises(DeployFailed, match=r"workdir_roots: .*escape \(resolves to .*/etc\)"):
        await ctx.run_script("pwd", timeout=10, cwd=root / "escape")
    for cwd in (outside, tmp_path / "srv-evil", root / ".." / "etc"):
        with pytest.raises(DeployFailed, match="refused by constraint workdir_roots"):
            await ctx.run_script("pwd", timeout=10, cwd=cwd)
    with pytest.raises(DeployFailed, match="workdir_roots"):  # plugins' own commands too
        await ctx.run(["pwd"], timeout=10, cwd=outside)


# ----------------------------------------------------------------------- run_as


@needs_root
async def test_scripts_run_as_the_configured_user_with_its_home(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    ctx, _ = context(tmp_path, run_as="nobody")
    result = await ctx.run_script("id -u; id -g; echo $HOME $USER", timeout=10)
    assert result.exit_code == 0, result.stderr_tail
    assert result.stdout_tail.split() == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        nobody.pw_dir,
        "nobody",
    ]
    shebang = await ctx.run_script("#!/bin/sh\nid -un\n", timeout=10, name="shebang")
    assert shebang.stdout_tail.strip() == "nobody"


def test_run_as_another_user_needs_a_root_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: pwd.struct_passwd(("bob",) + ("",) * 6))
    with pytest.raises(ConstraintConfigError, match="needs the agent to run as root"):
        policy(run_as="nobody")


async def test_run_as_the_agents_own_user_switches_nothing(tmp_path: Path) -> None:
    me = pwd.getpwuid(os.geteuid())
    ctx, _ = context(tmp_path, run_as=me.pw_name)
    assert ctx.constraints.switch_to is None
    result = await ctx.run_script("id -u; echo $HOME", timeout=10)
    assert result.stdout_tail.split() == [str(me.pw_uid), me.pw_dir]


def test_run_as_an_unknown_user_is_refused() -> None:
    with pytest.raises(ConstraintConfigError, match="no such user"):
        policy(run_as="no-such-user-here")


# ----------------------------------------------------------------------- limits


async def test_memory_limit_stops_a_hungry_script_and_says_so(tmp_path: Path) -> None:
    ctx, reporter = context(tmp_path, limits={"memory_bytes": "200MiB"})
    script = f"{sys.executable} -c 'x = bytearray(500 * 1024 * 1024); print(len(x))'"
    result = await ctx.run_script(script, timeout=30)
    assert result.exit_code != 0
    assert result.limit_hit is not None and "limits.memory_bytes = 209715200" in result.limit_hit
    assert result.stderr_tail.rstrip().endswith(f"[agent] {result.limit_hit}")
    assert f"[agent] {result.limit_hit}" in reporter.lines("agent")
    # On this host: cgroups v2 used or not, the log says which.
    assert any(line.startswith("constraints: cgroup") for line in reporter.lines("agent"))


async def test_cpu_limit_kills_a_busy_loop(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path, limits={"cpu_seconds": 1})
    result = await ctx.run_script("while :; do :; done", timeout=20)
    assert not result.timed_out
    assert result.exit_code == -signal.SIGXCPU
    assert result.limit_hit == "killed by SIGXCPU: it used up limits.cpu_seconds = 1"
    assert result.duration < 10


@needs_root
async def test_process_limit_stops_a_script_from_forking(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path, run_as="nobody", limits={"processes": 4})
    result = await ctx.run_script("for i in 1 2 3 4 5 6 7 8; do sleep 3 & done; wait", timeout=20)
    assert result.exit_code != 0
    assert result.limit_hit is not None and "limits.processes = 4" in result.limit_hit


async def test_open_files_limit(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path, limits={"open_files": 16})
    script = f"{sys.executable} -c 'f = [open(\"/dev/null\") for _ in range(64)]'"
    result = await ctx.run_script(script, timeout=20)
    assert result.exit_code == 1
    assert result.limit_hit is not None and "limits.open_files = 16" in result.limit_hit


async def test_file_size_limit(tmp_path: Path) -> None:
    ctx, _ = context(tmp_path, limits={"file_size": "1MiB"})
    result = await ctx.run_script("head -c 2000000 /dev/zero > big", timeout=20, cwd=tmp_path)
    assert result.exit_code == 128 + signal.SIGXFSZ  # the shell reports its child's signal
    assert result.limit_hit is not None and "limits.file_size" in result.limit_hit
    assert (tmp_path / "big").stat().st_size == MiB


async def test_output_limit_stops_streaming_with_a_marker(tmp_path: Path) -> None:
    ctx, reporter = context(tmp_path, limits={"output_bytes": 2000})
    script = "for i in $(seq 1000); do echo line $i of a long and chatty deploy script; done"
    result = await ctx.run_script(script, timeout=20)
    assert result.exit_code == 0
    streamed = reporter.lines("stdout")
    assert streamed[-1] == "[output truncated after 2000 bytes]"
    assert sum(len(line) + 1 for line in streamed[:-1]) <= 2000
    assert len(result.stdout_tail) <= 2000 and result.truncated
    assert result.stdout_tail.endswith("line 1000 of a long and chatty deploy script\n")


async def test_a_script_within_its_limits_is_unaffected(tmp_path: Path) -> None:
    ctx, _ = context(
        tmp_path,
        limits={"cpu_seconds": 5, "memory_bytes": "512MiB", "open_files": 64, "file_size": MiB},
    )
    result = await ctx.run_script("echo fine; ulimit -t; ulimit -n", timeout=20)
    assert result.exit_code == 0 and result.limit_hit is None
    assert result.stdout_tail.split() == ["fine", "5", "64"]


# ----------------------------------------------------------------------- cgroups v2


def test_cgroups_off_or_missing_are_reported_not_fatal(tmp_path: Path) -> None:
    assert cgroups.find_cgroup_parent("off") == (None, "limits.cgroup = off")
    parent, reason = cgroups.find_cgroup_parent(str(tmp_path))
    assert parent is None and "is not a cgroup v2 directory" in reason
    described = policy(limits={"memory_bytes": "64MiB", "cgroup": "off"}).describe()
    assert "cgroups v2 not used (limits.cgroup = off)" in described


def test_a_delegated_parent_gets_controllers_and_per_run_limits(tmp_path: Path) -> None:
    # A stand-in for a delegated cgroup v2 directory: the same files, none of the kernel.
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    parent, reason = cgroups.find_cgroup_parent(str(tmp_path))
    assert parent is not None, reason
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"
    run = parent.create("d-1/script", memory_max=64 * MiB, pids_max=10)
    assert run == tmp_path / "d-1_script"
    assert (run / "memory.max").read_text() == str(64 * MiB)
    assert (run / "pids.max").read_text() == "10"
    assert not parent.oom_killed(run)
    (run / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert parent.oom_killed(run)


# ----------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"policy": "allow-list"}, "needs at least one allow pattern"),
        ({"deny_extra": [{"name": "rm-root", "pattern": "x"}]}, "used twice: rm-root"),
        ({"allow": ["("]}, "is not a regex"),
        ({"deny_extra": [{"name": "bad", "pattern": "(["}]}, "not a regex"),
        ({"workdir_roots": ["srv"]}, "not an absolute path"),
        ({"limits": {"memory_bytes": 1000}}, "greater than or equal"),
        ({"limits": {"cgroup": "sometimes"}}, "absolute path"),
        ({"max_script_size": 10}, "Extra inputs are not permitted"),
        ({"limits": {"cpu": 1}}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(settings: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        Constraints.model_validate(settings)

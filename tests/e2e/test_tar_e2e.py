"""tar.gz deployments end to end (issue 4): a real server and agent process, packages uploaded
over HTTP and fetched over QUIC, a real HTTP service started by the package's install script
and health-checked; a failed install rolled back to the release before; a redeploy served from
the agent's cache; malicious packages refused through the whole deployment path.

Needs the ``deploy-tar`` and ``deploy-health-checks`` plugins installed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import signal
import stat
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import missing_part

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter, free_port

AGENT = "tar-e2e"
MB = 1 << 20
CHECK = {"retries": 20, "interval": 0.25, "attempt_timeout": 2, "timeout": 20}

# Stops the service the previous release started, then (unless the package has a file named
# "fail") serves the release directory on $PORT, detached so it outlives the script.
INSTALL = """#!/bin/sh
if [ -f "$TARGET_DIR/app.pid" ]; then
  old=$(cat "$TARGET_DIR/app.pid")
  kill "$old" 2>/dev/null
  i=0
  while kill -0 "$old" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
fi
echo "release $(cat version): $DEPLOY_ACTION (previous: ${PREVIOUS_RELEASE:-none})"
if [ -f fail ]; then echo "database migration failed" >&2; exit 1; fi
setsid nohup "$PYTHON" -m http.server "$PORT" --bind 127.0.0.1 --directory "$RELEASE_DIR" \\
  >/dev/null 2>&1 </dev/null &
echo $! > "$TARGET_DIR/app.pid"
echo $! >> "$TARGET_DIR/all.pids"
"""


@dataclass
class App:
    """The deployed application: where it lives, its port, its first (50 MB) package."""

    target: Path
    outside: Path
    port: int
    tmp: Path
    big_sha: str = ""
    big_size: int = 0

    def params(self, sha: str, **fields: Any) -> dict[str, Any]:
        return {
            "client_id": AGENT,
            "artifact": sha,
            "target_dir": str(self.target),
            "env": {"PORT": str(self.port), "PYTHON": sys.executable},
            "timeout": 60,
            **fields,
        }

    def check(self) -> dict[str, Any]:
        return {"type": "http", "port": self.port, "path": "/health", **CHECK}

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
            return str(answer.read().decode())

    def current(self) -> str:
        return os.readlink(self.target / "current")


def build(path: Path, files: dict[str, bytes | Path], modes: dict[str, int] | None = None) -> Path:
    """A tar.gz of ``files`` (content, or a file to copy in)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = int(time.time())
            info.mode = (modes or {}).get(name, 0o755 if name.endswith(".sh") else 0o644)
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as source:
                    tar.addfile(info, source)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def release_files(version: str, *, fail: bool = False) -> dict[str, bytes | Path]:
    files: dict[str, bytes | Path] = {
        "install.sh": INSTALL.encode(),
        "version": version.encode(),
        "health": b"ok\n",
    }
    if fail:
        files["fail"] = b""
    return files


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("tar"))
    try:
        c.start_server()
        c.start_agent(AGENT)
        types = next(x for x in c.api.clients() if x["client_id"] == AGENT)["capabilities"]
        if "deploy.tar" not in types["deploy_types"] or "http" not in types["health_checks"]:
            missing_part("deploy-tar and deploy-health-checks must be installed")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def app(center: DeployCenter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The first release deployed: a 50 MB package (random data: it does not compress) whose
    install script starts the service. Every service started is stopped afterwards."""
    root = tmp_path_factory.mktemp("site")
    state = App(target=root / "srv" / "app", outside=root / "outside", port=free_port(), tmp=root)
    state.outside.mkdir()
    (state.outside / "canary.txt").write_text("outside the target\n")
    blob = root / "blob.bin"
    with blob.open("wb") as out:
        for _ in range(50):
            out.write(os.urandom(MB))
    package = build(root / "app-1.tar.gz", {**release_files("1"), "blob.bin": blob})
    state.big_size = package.stat().st_size
    assert state.big_size > 50 * MB
    state.big_sha = center.api.upload_artifact(package)["sha256"]
    try:
        yield state
    finally:
        pids = state.target / "all.pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def deploy(center: DeployCenter, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    record: dict[str, Any] = center.wait(center.api.deploy("tar", body)["deploy_id"], timeout)
    return record


# --------------------------------------------------------------------------- deploy, roll back


@pytest.fixture(scope="module")
def first(center: DeployCenter, app: App) -> dict[str, Any]:
    """The 50 MB package deployed once, with an HTTP health check and the release rollback."""
    return deploy(center, app.params(app.big_sha, health_checks=[app.check()], rollback={}))


def test_50mb_package_deploys_and_its_service_answers(
    center: DeployCenter, app: App, first: dict[str, Any]
) -> None:
    record = first
    assert record["status"] == "success", record["error"]
    result = record["result"]
    assert result["sha256"] == app.big_sha and result["previous_release"] is None
    assert result["bytes_sent"] == app.big_size and result["bytes_resumed"] == 0
    assert result["install_exit_code"] == 0
    assert "release 1: install (previous: none)" in result["install_output_tail"]
    assert record["health"][0]["success"]
    assert app.current() == f"releases/{record['deploy_id']}"
    assert (app.target / "current" / "blob.bin").stat().st_size == 50 * MB
    assert app.get("/version") == "1"
    rows = center.api.history(record["deploy_id"])
    stages = [row["status"] for row in rows]
    order = ["uploading", "extracting", "installing", "health_check", "success"]
    assert [s for s in stages if s in order] == sorted(
        (s for s in stages if s in order), key=order.index
    )
    assert set(order) <= set(stages)
    uploading = [row for row in rows if row["status"] == "uploading"]
    assert uploading[0]["progress"] == 0 and uploading[-1]["progress"] == 30
    assert "0 B of 50.0 MiB" in [row["message"] for row in uploading]  # progress from bytes


def test_failed_install_rolls_back_and_the_previous_service_answers_again(
    center: DeployCenter, app: App, first: dict[str, Any]
) -> None:
    live = app.current()
    assert app.get("/version") == "1"
    package = build(app.tmp / "app-2.tar.gz", release_files("2", fail=True))
    sha = center.api.upload_artifact(package)["sha256"]

    record = deploy(center, app.params(sha, health_checks=[app.check()], rollback={}))

    assert record["status"] == "rolled_back", record["error"]
    assert (
        record["error"] == "install script install.sh exited with code 1: database migration failed"
    )
    assert record["result"]["install_exit_code"] == 1
    rollback = record["rollback"]
    assert rollback["strategy"] == "release" and rollback["success"]
    assert rollback["health"][0]["success"]  # checked again after the rollback
    assert app.current() == live  # current points at the first release again
    failed = app.target / "releases" / record["deploy_id"]
    assert "database migration failed" in (failed / ".deploy-tar-bad").read_text()
    assert app.get("/version") == "1"  # the first release's service, started again
    lines = [line["line"] for line in center.api.logs(record["deploy_id"])["lines"]]
    assert "release 2: install (previous: " + str(app.target / live) + ")" in lines
    assert f"release 1: rollback (previous: {failed})" in lines


def test_redeploy_of_the_same_artifact_transfers_nothing(
    center: DeployCenter, app: App, first: dict[str, Any]
) -> None:
    record = deploy(center, app.params(app.big_sha, health_checks=[app.check()], rollback={}))

    assert record["status"] == "success", record["error"]
    assert record["result"]["bytes_sent"] == 0 and record["result"]["bytes_resumed"] == 0
    assert app.current() == f"releases/{record['deploy_id']}"
    assert app.get("/version") == "1"
    messages = [row["message"] for row in center.api.history(record["deploy_id"])]
    assert "package ready: from the agent's cache, nothing transferred" in messages


def test_a_package_never_uploaded_is_refused_at_once(center: DeployCenter, app: App) -> None:
    with pytest.raises(ApiError) as err:
        center.api.deploy("tar", app.params("0" * 64))
    assert err.value.status == 404
    assert "upload the package first" in str(err.value)


# --------------------------------------------------------------------------- malicious packages

Entry = tuple[tarfile.TarInfo, bytes | None]


def member(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o777
    return info, None


def node(name: str, kind: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def pack(*entries: Entry) -> Callable[[Path, App], Path]:
    def make(path: Path, app: App) -> Path:
        with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for info, data in entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return path

    return make


def absolute_into_outside(path: Path, app: App) -> Path:
    return pack(member(f"{app.outside}/absolute.txt", b"pwned"))(path, app)


def empty_members(count: int) -> Callable[[Path, App], Path]:
    """``count`` empty files m0, m1, …, written header by header (a million in ~2 s)."""

    def make(path: Path, app: App) -> Path:
        blank = bytearray(512)
        blank[100:108] = b"%07o\0" % 0o644
        blank[108:124] = b"0000000\0" * 2
        blank[124:136] = b"%011o\0" % 0
        blank[136:148] = b"%011o\0" % 1_700_000_000
        blank[148:156] = b" " * 8
        blank[156:157] = b"0"
        blank[257:265] = b"ustar\x0000"
        checksum = sum(blank)
        with gzip.open(path, "wb", compresslevel=1) as out:
            for start in range(0, count, 1000):
                out.write(
                    b"".join(
                        name
                        + blank[len(name) : 148]
                        + b"%06o\0 " % (checksum + sum(name))
                        + blank[156:]
                        for name in (b"m%d" % i for i in range(start, min(start + 1000, count)))
                    )
                )
            out.write(bytes(1024))
        return path

    return make


def bomb(path: Path, app: App) -> Path:
    """200 MiB of zeros in a few hundred KB: one header, then one compressed MiB repeated."""
    header = tarfile.TarInfo("zeros.bin")
    header.size, header.mode = 200 * MB, 0o644
    compressed = gzip.compress(bytes(MB), compresslevel=9)
    with path.open("wb") as out:
        out.write(gzip.compress(header.tobuf(tarfile.USTAR_FORMAT)))
        for _ in range(200):
            out.write(compressed)
        out.write(gzip.compress(bytes(1024)))
    return path


MALICIOUS = [
    pytest.param(pack(member("../escape.txt", b"x")), "traversal", "../escape.txt", id="dotdot"),
    pytest.param(
        pack(member("a/../../../outside/escape.txt", b"x")),
        "traversal",
        "a/../../../outside/escape.txt",
        id="dotdot-inner",
    ),
    pytest.param(absolute_into_outside, "absolute", None, id="absolute"),
    pytest.param(
        pack(link("passwd", "/etc/passwd")), "symlink-absolute", "passwd", id="symlink-absolute"
    ),
    pytest.param(
        pack(directory("a"), link("a/up", "../../../../outside")),
        "symlink-escape",
        "a/up",
        id="symlink-escape",
    ),
    pytest.param(
        pack(link("a", "."), link("b", "a/.."), member("b/outside/escape.txt", b"x")),
        "symlink-escape",
        "b",
        id="symlink-chain",
    ),
    pytest.param(
        pack(directory("x"), link("x/l1", ".."), link("l2", "x/l1"), link("l3", "l2/..")),
        "symlink-escape",
        "l3",
        id="symlink-chain-3",
    ),
    pytest.param(
        pack(link("l", "s/../canary.txt"), link("s", ".")),
        "symlink-escape",
        "l",
        id="symlink-retargeted-later",
    ),
    pytest.param(
        pack(directory("sub"), link("d", "sub"), member("d/evil", b"x")),
        "through-symlink",
        "d/evil",
        id="write-through-symlink",
    ),
    pytest.param(pack(link("a", "b"), link("b", "a")), "symlink-loop", "a", id="symlink-loop"),
    pytest.param(
        pack(link("pw", "/etc/passwd", tarfile.LNKTYPE)), "hardlink", "pw", id="hardlink-out"
    ),
    pytest.param(
        pack(member("a", b"x"), link("b", "a", tarfile.LNKTYPE)),
        "hardlink",
        "b",
        id="hardlink-inside",
    ),
    pytest.param(pack(node("null", tarfile.CHRTYPE)), "device", "null", id="char-device"),
    pytest.param(pack(node("sda", tarfile.BLKTYPE)), "device", "sda", id="block-device"),
    pytest.param(pack(node("pipe", tarfile.FIFOTYPE)), "fifo", "pipe", id="fifo"),
    pytest.param(pack(member("bin/su", b"#!/bin/sh\n", 0o4755)), "setuid", "bin/su", id="setuid"),
    pytest.param(pack(directory("shared", 0o2775)), "setgid", "shared", id="setgid"),
    pytest.param(pack(directory("tmp", 0o1777)), "sticky", "tmp", id="sticky"),
    pytest.param(bomb, "ratio", "zeros.bin", id="decompression-bomb"),
    pytest.param(empty_members(1_000_000), "max-members", "m100000", id="million-members"),
    pytest.param(pack(member("a", b"1"), member("a", b"2")), "duplicate", "a", id="duplicate-file"),
    pytest.param(
        pack(member("run.sh", b"ok"), link("run.sh", "/bin/sh")),
        "duplicate",
        "run.sh",
        id="duplicate-file-then-symlink",
    ),
    pytest.param(pack(member("d/" * 100 + "f")), "depth", "d/" * 100 + "f", id="too-deep"),
]


def snapshot(*roots: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``roots``: kind and mode; size, mtime and link target of non-dirs."""
    seen: dict[str, tuple[object, ...]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    seen[path] = (st.st_mode,)
                else:
                    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                    seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return seen


@pytest.mark.parametrize(("make", "rule", "name"), MALICIOUS)
def test_malicious_package_fails_naming_member_and_rule_and_writes_nothing(
    center: DeployCenter,
    app: App,
    tmp_path: Path,
    make: Callable[[Path, App], Path],
    rule: str,
    name: str | None,
) -> None:
    if name is None:  # the absolute name depends on where the site is
        name = f"{app.outside}/absolute.txt"
    package = make(tmp_path / "evil.tar.gz", app)
    sha = center.api.upload_artifact(package)["sha256"]
    before = snapshot(app.target, app.outside)

    record = deploy(center, app.params(sha))

    # The release rollback is the default: with no release made, it has nothing to undo.
    assert record["status"] == "rolled_back"
    assert record["error"].startswith(f"package refused: member {name!r}: "), record["error"]
    assert record["error"].endswith(f"(rule {rule})")
    assert record["rollback"]["success"]
    assert record["rollback"]["message"].startswith("nothing to undo: release ")
    after = snapshot(app.target, app.outside)
    # The target's layout (an empty releases/) is made before the package is read, so the
    # first deployment to the site leaves it; no release and no staging are left.
    layout = str(app.target / "releases")
    if layout not in before and layout in after:
        assert not any(path.startswith(layout + os.sep) for path in after)
        del after[layout]
    assert after == before
    assert not (app.target / "releases" / record["deploy_id"]).exists()
    for escaped in (app.tmp / "escape.txt", app.target / "escape.txt", app.outside / "escape.txt"):
        assert not escaped.exists()

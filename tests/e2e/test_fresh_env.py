"""What a fresh machine gets, end to end: a virtual environment made from the distribution's
own ``/usr/bin/python3`` (``$DEPLOY_CENTER_PYTHON`` names another) holding only ``deploy-core``
and ``deploy-tar``, installed from this checkout as wheels (not editable), then ``deployctl up``
from it, and a tar.gz package uploaded and deployed with its ``deployctl``.

pip fetches the dependencies from the configured index (or its cache); without one the test
skips with the reason (fails under ``DEPLOY_CENTER_STRICT=1``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import missing_part

from deploy_core.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = Path(os.environ.get("DEPLOY_CENTER_PYTHON") or "/usr/bin/python3")
# pip's words for "the index cannot be reached", as opposed to a package that does not build.
_OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")
_SKIP_COPY = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "tests")


@dataclass
class FreshVenv:
    """A virtual environment with only deploy-core and deploy-tar installed."""

    dir: Path
    env: dict[str, str]

    @property
    def deployctl(self) -> Path:
        return self.dir / "bin" / "deployctl"


def _clean_env() -> dict[str, str]:
    """This process's environment without what points Python at the checkout or our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))
    )
    return env


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited with {done.returncode}:\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    """The venv, made once for the module."""
    if not PYTHON.exists():
        missing_part(f"no distribution Python at {PYTHON} (set DEPLOY_CENTER_PYTHON)")
    base = tmp_path_factory.mktemp("fresh")
    env = _clean_env()
    venv = base / "venv"
    made = subprocess.run(
        [str(PYTHON), "-m", "venv", str(venv)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        if "ensurepip" in made.stdout + made.stderr:
            missing_part(f"{PYTHON} cannot make a virtual environment: apt install python3-venv")
        pytest.fail(f"{PYTHON} -m venv failed:\n{made.stdout}\n{made.stderr}")
    # Copies of the two projects, so that building them leaves nothing in the checkout.
    src = base / "src"
    core = src / "deploy-core"
    core.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, core / name)
    shutil.copytree(ROOT / "deploy_core", core / "deploy_core", ignore=_SKIP_COPY)
    tar_plugin = src / "deploy-tar"
    shutil.copytree(ROOT / "plugins" / "deploy_tar", tar_plugin, ignore=_SKIP_COPY)
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-input",
            str(core),
            str(tar_plugin),
        ],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if pip.returncode != 0:
        output = pip.stdout + pip.stderr
        if any(word in output for word in _OFFLINE):
            missing_part(f"pip cannot reach a package index for the dependencies:\n{output}")
        pytest.fail(f"pip install deploy-core deploy-tar failed:\n{output}")
    return FreshVenv(venv, env)


def _package(path: Path) -> None:
    """A small tar.gz: a version file, a page, and an install script that leaves a mark."""
    files = {
        "VERSION": b"1.4.2\n",
        "public/index.html": b"<h1>fresh</h1>\n",
        "install.sh": b'#!/bin/sh\nset -e\necho "installed $(cat VERSION)" > installed.txt\n',
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def center(fresh_venv: FreshVenv, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``deployctl up`` from the fresh venv: its state directory and API URL."""
    state = tmp_path / "state"
    api_port, quic_port = free_port(), free_port()
    log = tmp_path / "up.log"
    env = {**fresh_venv.env, "DEPLOY_CENTER_STATE": str(state)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(fresh_venv.deployctl),
                "up",
                "--state-dir",
                str(state),
                "--api-port",
                str(api_port),
                "--quic-port",
                str(quic_port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        end = time.monotonic() + 120
        while "connected as client 'local'" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"deployctl up did not come up:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield state, f"http://127.0.0.1:{api_port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # Nothing of the server, the agent or their children is left in the process group.
    end = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), f"processes of deployctl up (group {proc.pid}) remain"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_fresh_venv_holds_only_deploy_core_and_deploy_tar(
    fresh_venv: FreshVenv, tmp_path: Path
) -> None:
    python = fresh_venv.dir / "bin" / "python"
    listed = json.loads(
        _run([python, "-m", "pip", "list", "--format=json"], tmp_path, fresh_venv.env, 120)
    )
    ours = sorted(p["name"] for p in listed if p["name"].startswith("deploy"))
    assert ours == ["deploy-core", "deploy-tar"]
    where = _run(
        [
            python,
            "-c",
            "import deploy_core, deploy_tar; print(deploy_core.__file__); "
            "print(deploy_tar.__file__)",
        ],
        tmp_path,
        fresh_venv.env,
        60,
    )
    for line in where.split():
        assert line.startswith(str(fresh_venv.dir)), f"{line} is not installed in the venv"
    version = _run([python, "-c", "import sys; print(sys.version)"], tmp_path, fresh_venv.env, 60)
    distribution = _run(
        [PYTHON, "-c", "import sys; print(sys.version)"], tmp_path, fresh_venv.env, 60
    )
    assert version == distribution


def test_a_tar_package_deploys_end_to_end_from_the_fresh_venv(
    fresh_venv: FreshVenv, center: tuple[Path, str], tmp_path: Path
) -> None:
    state, url = center
    package = tmp_path / "app.tar.gz"
    _package(package)
    target = tmp_path / "srv" / "app"
    output = _run(
        [
            fresh_venv.deployctl,
            "deploy",
            "tar",
            "--client",
            "local",
            "--package",
            package,
            "--target-dir",
            target,
            "--wait",
            "--wait-timeout",
            "300",
            "--state-dir",
            state,
            "--url",
            url,
        ],
        tmp_path,
        {**fresh_venv.env, "DEPLOY_CENTER_STATE": str(state)},
        600,
    )
    assert ": success" in output, output
    current = target / "current"
    assert current.is_symlink()
    release = current.resolve()
    assert release.parent == (target / "releases").resolve()
    assert (current / "VERSION").read_text() == "1.4.2\n"
    assert (current / "public" / "index.html").read_text() == "<h1>fresh</h1>\n"
    assert (current / "installed.txt").read_text() == "installed 1.4.2\n"

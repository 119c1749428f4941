"""deploy.tar through a real server and a real agent process: the package uploaded over HTTP,
fetched over QUIC, installed; the rollback; ``deployctl deploy tar``; the registration."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import build_package
from package_server import Route, serve

from deploy_core.client import ApiError
from deploy_core.plugins import load_plugins
from deploy_core.testing import DeployCenter
from deploy_tar.releases import Releases

AGENT = "tar-1"
INSTALL = 'echo "$(cat version) $DEPLOY_ACTION" >> "$TARGET_DIR/events.log"\n[ ! -f fail ]\n'


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("tar"))
    try:
        c.start_server()
        c.start_agent(AGENT)
        yield c
    finally:
        c.close()


def upload(center: DeployCenter, tmp_path: Path, version: str, *, fail: bool = False) -> str:
    files: dict[str, str | bytes] = {"version": version, "install.sh": INSTALL}
    if fail:
        files["fail"] = ""
    package = build_package(tmp_path / f"app-{version}.tar.gz", files)
    sha: str = center.api.upload_artifact(package)["sha256"]
    return sha


def deploy(center: DeployCenter, sha: str, target: Path, **fields: object) -> dict[str, object]:
    body = {"client_id": AGENT, "artifact": sha, "target_dir": str(target), **fields}
    record: dict[str, object] = center.wait(center.api.deploy("tar", body)["deploy_id"], 60)
    return record


def test_registered_through_the_entry_point() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_tar"})
    assert plugins.deploy_types.names() == ["deploy.tar"]
    assert plugins.deploy_types.entries["deploy.tar"].default_rollback == "release"
    assert plugins.rollback_strategies.names() == ["release"]
    assert plugins.cli_commands.names() == ["deploy tar"]
    assert plugins.deploy_types.owners["deploy.tar"] == "deploy_tar"


def test_deploys_rolls_back_and_redeploys_from_the_cache(
    center: DeployCenter, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    first_sha = upload(center, tmp_path, "1")
    first = deploy(center, first_sha, target, rollback={})
    assert first["status"] == "success", first["error"]
    result = first["result"]
    assert isinstance(result, dict)
    size = os.path.getsize(tmp_path / "app-1.tar.gz")
    assert (result["sha256"], result["bytes_sent"], result["bytes_resumed"]) == (first_sha, size, 0)
    assert result["release_dir"] == f"{target}/releases/{first['deploy_id']}"

    failing = deploy(center, upload(center, tmp_path, "2", fail=True), target, rollback={})
    assert failing["status"] == "rolled_back", failing["error"]
    assert failing["error"] == "install script install.sh exited with code 1"
    assert Releases(target).current() == first["deploy_id"]

    again = deploy(center, first_sha, target, rollback={})
    assert again["status"] == "success"
    assert again["result"]["bytes_sent"] == 0  # type: ignore[index]
    assert (target / "events.log").read_text().split("\n") == [
        "1 install",
        "2 install",
        "1 rollback",
        "1 install",
        "",
    ]


def test_manual_rollback_goes_back_to_the_release_before(
    center: DeployCenter, tmp_path: Path
) -> None:
    target = tmp_path / "app"
    first = deploy(center, upload(center, tmp_path, "1"), target, rollback={})
    second = deploy(center, upload(center, tmp_path, "2"), target, rollback={})
    assert Releases(target).current() == second["deploy_id"]

    undo = center.wait(center.api.rollback(str(second["deploy_id"]))["deploy_id"], 60)

    assert undo["status"] == "rolled_back", undo["error"]
    assert Releases(target).current() == first["deploy_id"]
    assert Releases(target).is_bad(str(second["deploy_id"]))


def test_unknown_artifact_is_refused_at_once_with_what_to_do(
    center: DeployCenter, tmp_path: Path
) -> None:
    with pytest.raises(ApiError) as err:
        deploy(center, "cd" * 32, tmp_path / "app")
    assert err.value.status == 404
    assert "cd" * 32 in str(err.value) and "upload the package first" in str(err.value)


def test_deployctl_uploads_with_progress_and_deploys(center: DeployCenter, tmp_path: Path) -> None:
    package = build_package(
        tmp_path / "app.tar.gz",
        {
            "version": "7",
            "install.sh": "echo installed $(cat version)\n",
            "blob": os.urandom(2 << 20),
        },
    )
    env = {
        **center.env,
        "DEPLOY_CENTER_URL": f"http://127.0.0.1:{center.api_port}",
        "DEPLOY_CENTER_TOKEN": (center.server_dir / "admin.token").read_text().strip(),
    }
    command = [sys.executable, "-m", "deploy_core.cli", "deploy", "tar", "--client", AGENT]
    target = tmp_path / "app"

    done = subprocess.run(
        [*command, "--package", str(package), "--target-dir", str(target), "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr + done.stdout
    assert "100% 2.0 MiB of 2.0 MiB" in done.stderr and "uploaded" in done.stderr
    assert ": success\n" in done.stdout
    assert "install output (tail):" in done.stdout and "installed 7" in done.stdout
    assert (target / "current" / "version").read_text() == "7"

    both = subprocess.run(
        [*command, "--package", str(package), "--artifact", "a" * 64, "--target-dir", "/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2
    assert (
        "give exactly one of --package FILE, --artifact SHA256 and --package-url URL" in both.stderr
    )


SECRET_QUERY = "X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature=0123456789abcdef"


@pytest.mark.parametrize(
    ("source", "extra", "why"),
    [
        ({"url": "file:///etc/passwd"}, {}, "scheme file: is not allowed"),
        ({"url": "ftp://127.0.0.1/app.tar.gz"}, {}, "scheme ftp: is not allowed"),
        ({"url": "https://user:pw@cdn.example.com/a.tgz"}, {}, "user name or password"),
        ({"url": f"https://cdn.example.com/a.tgz?{SECRET_QUERY}"}, {}, "query string"),
        ({"url": "http://cdn.example.com/a.tgz"}, {}, "plain http:// is only allowed"),
        ({"url": "http://10.1.2.3/a.tgz"}, {}, "plain http:// is only allowed"),
        (
            {"url": "https://cdn.example.com/a.tgz", "query_secret": "Q"},
            {},
            "query_secret names Q, which is not in secret_env",
        ),
        (
            {"url": "https://cdn.example.com/a.tgz"},
            {"artifact": "ab" * 32},
            "exactly one of artifact",
        ),
    ],
)
def test_url_sources_the_rules_refuse_get_422(
    center: DeployCenter, tmp_path: Path, source: dict[str, Any], extra: dict[str, Any], why: str
) -> None:
    body = {
        "client_id": AGENT,
        "target_dir": str(tmp_path / "app"),
        "source": {"sha256": "ab" * 32, **source},
        **extra,
    }
    with pytest.raises(ApiError) as err:
        center.api.deploy("tar", body)
    assert err.value.status == 422, err.value.body
    assert why in str(err.value)
    assert "AKIAEXAMPLE" not in json.dumps(err.value.body)


def test_deployctl_deploys_from_a_presigned_url_that_is_never_stored(
    center: DeployCenter, tmp_path: Path
) -> None:
    """The agent fetches from the URL (cut once mid-body, resumed) with its query string,
    which reaches it sealed in secret_env: the record, the logs and the server's and
    agent's own logs never hold it."""
    package = build_package(
        tmp_path / "app.tar.gz",
        {
            "version": "9",
            "install.sh": "echo installed $(cat version)\n",
            "blob": os.urandom(1 << 20),
        },
    )
    data = package.read_bytes()
    env = {
        **center.env,
        "DEPLOY_CENTER_URL": f"http://127.0.0.1:{center.api_port}",
        "DEPLOY_CENTER_TOKEN": (center.server_dir / "admin.token").read_text().strip(),
    }
    target = tmp_path / "app"
    with serve() as cdn:
        cdn.routes["/bucket/app.tar.gz"] = Route(body=data, drop_after=len(data) // 3)
        url = cdn.url(f"/bucket/app.tar.gz?{SECRET_QUERY}")
        done = subprocess.run(
            [
                *(sys.executable, "-m", "deploy_core.cli", "deploy", "tar", "--client", AGENT),
                *("--package-url", url, "--sha256", hashlib.sha256(data).hexdigest()),
                *("--size", str(len(data)), "--target-dir", str(target), "--wait"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        assert ": success\n" in done.stdout and "installed 9" in done.stdout
        assert [s.path for s in cdn.seen] == [f"/bucket/app.tar.gz?{SECRET_QUERY}"] * 2
        assert cdn.ranges()[1] == f"bytes={len(data) // 3}-"
    assert (target / "current" / "version").read_text() == "9"
    deploy_id = center.api.list(AGENT, limit=1)["items"][0]["deploy_id"]
    record = center.api.get(deploy_id)
    assert record["result"]["url"] == cdn.url("/bucket/app.tar.gz")
    logs = center.api.logs(deploy_id)
    history = center.api.history(deploy_id)
    stored = json.dumps([record, logs, history])
    assert "package ready" in stored  # the fetch stage reported, with its progress
    for text in (
        stored,
        done.stdout,
        done.stderr,
        center.log("server"),
        center.log(f"agent-{AGENT}"),
    ):
        assert "AKIAEXAMPLE" not in text and "0123456789abcdef" not in text

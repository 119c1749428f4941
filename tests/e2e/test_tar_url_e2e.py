"""deploy.tar from URL sources end to end (issue 13 §4): a real server and agent processes,
packages the agents fetch themselves from ``python -m http.server`` on loopback and from an
HTTPS server whose private CA only one agent's ``[plugins.deploy_tar] ca_file`` trusts; the
allow-lists of the server's and of the agent's own config, each enforced on its side.

Needs the ``deploy-tar`` plugin installed.
"""

from __future__ import annotations

import hashlib
import io
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import missing_part

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter, free_port
from deploy_core.transport.certs import ensure_server_certs

TRUSTING = "url-ca"  # its config names the CDN's CA file
PLAIN = "url-plain"  # no [plugins.deploy_tar]: loopback http and public-CA https only
INSTALL = 'echo "$(cat version)" > "$TARGET_DIR/installed"\n'


def package(version: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, text in (("version", version), ("install.sh", INSTALL)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Cdn:
    root: Path
    http_port: int
    https_port: int

    def publish(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return hashlib.sha256(data).hexdigest()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def cdn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cdn, Path]]:
    """``python -m http.server`` on 127.0.0.1, and an HTTPS server (certificate from a
    private CA) over the same directory; yields it and the CA file."""
    root = tmp_path_factory.mktemp("cdn")
    files = root / "files"
    files.mkdir()
    certs = ensure_server_certs(root / "tls", hostnames=("localhost", "127.0.0.1"))
    port = free_port()
    http_server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=files,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    https = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(files)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    https.socket = context.wrap_socket(https.socket, server_side=True)
    thread = threading.Thread(target=https.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        end = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)
        yield Cdn(files, port, https.server_address[1]), certs.ca_cert
    finally:
        https.shutdown()
        https.server_close()
        thread.join(10)
        http_server.terminate()
        http_server.wait(10)


@pytest.fixture(scope="module")
def center(
    tmp_path_factory: pytest.TempPathFactory, cdn: tuple[Cdn, Path]
) -> Iterator[DeployCenter]:
    root = tmp_path_factory.mktemp("tar-url")
    server_config = root / "server.toml"
    server_config.write_text('[plugins.deploy_tar]\nallow_http_hosts = ["mirror.internal"]\n')
    c = DeployCenter(root)
    c.server_args = ["--config", str(server_config)]
    try:
        c.start_server()
        c.start_agent(TRUSTING, config=f'[plugins.deploy_tar]\nca_file = "{cdn[1]}"\n')
        c.start_agent(PLAIN)
        types = next(x for x in c.api.clients() if x["client_id"] == PLAIN)["capabilities"]
        if "deploy.tar" not in types["deploy_types"]:
            missing_part("deploy-tar must be installed")
        yield c
    finally:
        c.close()


def deploy(center: DeployCenter, client: str, target: Path, source: dict[str, Any]) -> Any:
    body = {"client_id": client, "target_dir": str(target), "source": source}
    return center.wait(center.api.deploy("tar", body)["deploy_id"], 90)


def test_a_package_from_python_http_server_on_loopback(
    center: DeployCenter, cdn: tuple[Cdn, Path], tmp_path: Path
) -> None:
    server, _ca = cdn
    sha = server.publish("app-1.tar.gz", package("1"))
    url = f"http://127.0.0.1:{server.http_port}/app-1.tar.gz"
    for client in (PLAIN, TRUSTING):
        record = deploy(center, client, tmp_path / client, {"url": url, "sha256": sha})
        assert record["status"] == "success", record["error"]
        assert (tmp_path / client / "installed").read_text() == "1\n"
        assert record["result"]["url"] == url and record["result"]["sha256"] == sha
        messages = [h.get("message", "") for h in center.api.history(record["deploy_id"])]
        assert any(m.startswith("downloading http://127.0.0.1") for m in messages), messages


def test_https_from_a_private_ca_needs_the_agents_ca_file(
    center: DeployCenter, cdn: tuple[Cdn, Path], tmp_path: Path
) -> None:
    server, _ca = cdn
    sha = server.publish("app-2.tar.gz", package("2"))
    source = {"url": f"https://localhost:{server.https_port}/app-2.tar.gz", "sha256": sha}

    trusted = deploy(center, TRUSTING, tmp_path / "a", source)
    assert trusted["status"] == "success", trusted["error"]
    assert (tmp_path / "a" / "installed").read_text() == "2\n"

    refused = deploy(center, PLAIN, tmp_path / "b", source)
    assert refused["status"] in ("failed", "rolled_back"), refused
    assert "TLS verification" in refused["error"] and "ca_file" in refused["error"]
    assert not (tmp_path / "b" / "installed").exists()
    assert list((tmp_path / "b" / "releases").iterdir()) == []


def test_each_side_enforces_its_own_allow_list(center: DeployCenter, tmp_path: Path) -> None:
    """The server's config allows plain http to mirror.internal, so the request passes; the
    agent's own config does not, so the agent refuses before connecting anywhere."""
    with pytest.raises(ApiError) as err:
        deploy(center, PLAIN, tmp_path, {"url": "http://other.internal/a.tgz", "sha256": "a" * 64})
    assert err.value.status == 422 and "allow_http_hosts" in str(err.value)

    record = deploy(
        center, PLAIN, tmp_path / "app", {"url": "http://mirror.internal/a.tgz", "sha256": "a" * 64}
    )
    assert record["status"] in ("failed", "rolled_back"), record
    assert "plain http:// is only allowed" in record["error"]
    assert "allow_http_hosts" in record["error"]

"""The API over HTTPS without a proxy (issue 16 §5), end to end: a real ``deployctl server
--api-tls`` on loopback (forced: TLS is off on loopback by default), real ``deployctl``
processes, a real agent, and the web page in real headless Chromium over https with its live
feed on wss://.

The API listens on 127.0.0.2, so that a client only gets through when the server's own
certificate was issued for the API host (its defaults name 127.0.0.1, not 127.0.0.2).
Nothing here sends a packet off loopback.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_web_page
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_web_page import Browser, admin_token, open_browser, sign_in
from websockets.sync.client import connect

from deploy_core.client import DeployClient
from deploy_core.testing import DeployCenter, free_port
from deploy_core.transport import ensure_server_certs

API_HOST = "127.0.0.2"


class TlsCenter(DeployCenter):
    """A :class:`DeployCenter` whose API serves HTTPS on :data:`API_HOST`; its client
    verifies the server with the CA of the state directory, as ``deployctl`` does."""

    def __init__(self, root: Path, *extra: str, client_ca: Path | None = None) -> None:
        super().__init__(root)
        self.server_args = ["--api-host", API_HOST, "--api-tls", *extra]
        self.client_ca = client_ca or self.server_dir / "ca.pem"

    @property
    def url(self) -> str:
        return f"https://{API_HOST}:{self.api_port}"

    @property
    def api(self) -> Any:
        if self._api is None:
            token_file = self.server_dir / "admin.token"
            end = time.monotonic() + 30
            while not token_file.exists() and time.monotonic() < end:
                time.sleep(0.05)
            self._api = DeployClient(
                self.url,
                token_file.read_text().strip(),
                timeout=60,
                ca=self.client_ca,
            )
        return self._api


def deployctl(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``deployctl`` as a user would, without the test's DEPLOY_CENTER_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
    return subprocess.run(
        [sys.executable, "-m", "deploy_core.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCenter]:
    c = TlsCenter(tmp_path_factory.mktemp("tls"))
    try:
        c.start_server()
        c.start_agent("web-1")
        yield c
    finally:
        c.close()


def test_server_json_and_certificate_name_the_https_api(center: TlsCenter) -> None:
    info = json.loads((center.server_dir / "server.json").read_text())
    assert info["api_url"] == center.url
    assert info["api_ca"] == str(center.server_dir / "ca.pem")
    cert = x509.load_pem_x509_certificate((center.server_dir / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    import ipaddress

    assert ipaddress.ip_address(API_HOST) in san.get_values_for_type(x509.IPAddress)
    # The handshake itself: TLS 1.2 or newer, the server's certificate.
    context = ssl.create_default_context(cafile=str(center.server_dir / "ca.pem"))
    import socket

    with (
        socket.create_connection((API_HOST, center.api_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=API_HOST) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_deployctl_with_the_state_directory_deploys_over_https(center: TlsCenter) -> None:
    done = deployctl(
        "deploy",
        "shell",
        "--client",
        "web-1",
        "--script",
        "echo over-tls",
        "--wait",
        "--state-dir",
        str(center.server_dir),
    )
    assert done.returncode == 0, done.stderr
    assert "success" in done.stdout
    listed = deployctl("clients", "--json", "--state-dir", str(center.server_dir))
    assert listed.returncode == 0, listed.stderr
    assert [c["client_id"] for c in json.loads(listed.stdout)] == ["web-1"]


def test_deployctl_with_ca_option_or_environment(center: TlsCenter, tmp_path: Path) -> None:
    token = admin_token(center)
    ca = str(center.server_dir / "ca.pem")
    elsewhere = str(tmp_path / "no-state")  # no server.json: the CA must come from --ca
    by_option = deployctl(
        "list", "--client", "web-1", "--url", center.url, "--token", token,
        "--state-dir", elsewhere, "--ca", ca,
    )  # fmt: skip
    assert by_option.returncode == 0, by_option.stderr
    by_env = deployctl(
        "list", "--client", "web-1", "--state-dir", elsewhere,
        env={"DEPLOY_CENTER_URL": center.url, "DEPLOY_CENTER_TOKEN": token,
             "DEPLOY_CENTER_CA": ca},
    )  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == by_option.stdout


def test_without_the_ca_a_certificate_error_not_a_traceback(
    center: TlsCenter, tmp_path: Path
) -> None:
    token = admin_token(center)
    refused = deployctl(
        "list", "--client", "web-1", "--url", center.url, "--token", token,
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert f"no secure connection to {center.url}" in refused.stderr
    assert "certificate is not trusted" in refused.stderr
    assert "--ca" in refused.stderr
    # Another CA (a server of its own) is no better: the CA is pinned, not added to.
    other = ensure_server_certs(tmp_path / "other")
    wrong = deployctl(
        "list", "--client", "web-1", "--url", center.url, "--token", token,
        "--state-dir", str(tmp_path), "--ca", str(other.ca_cert),
    )  # fmt: skip
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "certificate is not trusted" in wrong.stderr
    # A file that is no CA certificate: said before any connection.
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    bad = deployctl(
        "list", "--client", "web-1", "--url", center.url, "--token", token,
        "--state-dir", str(tmp_path), "--ca", str(junk),
    )  # fmt: skip
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"--ca {junk}: cannot verify the server with it" in bad.stderr


def test_plain_http_to_the_https_api_says_what_is_wrong(center: TlsCenter) -> None:
    answered = deployctl(
        "list", "--client", "web-1", "--url", f"http://{API_HOST}:{center.api_port}",
        "--token", admin_token(center), "--state-dir", str(center.root / "none"),
    )  # fmt: skip
    assert answered.returncode == 1 and "Traceback" not in answered.stderr
    assert "https://" in answered.stderr


def test_live_socket_over_wss(center: TlsCenter) -> None:
    context = ssl.create_default_context(cafile=str(center.server_dir / "ca.pem"))
    url = center.url.replace("https://", "wss://") + "/api/live"
    with connect(url, ssl=context, open_timeout=15) as ws:
        ws.send(json.dumps({"type": "auth", "token": admin_token(center)}))
        assert json.loads(ws.recv(timeout=15))["type"] == "hello"
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(url, ssl=ssl.create_default_context(), open_timeout=15)


def spki_hash(cert_file: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes for a certificate."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def tls_browser(center: TlsCenter, monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(center.server_dir / 'server.pem')}"
    monkeypatch.setattr(test_web_page, "CHROMIUM_FLAGS", [*test_web_page.CHROMIUM_FLAGS, trust])
    with open_browser() as b:
        yield b


def test_web_page_over_https_with_its_live_feed_on_wss(
    center: TlsCenter, tls_browser: Browser, tmp_path: Path
) -> None:
    tls_browser.call("Network.enable")
    sign_in(tls_browser, center, admin_token(center))
    assert tls_browser.js("location.protocol") == "https:"
    row = "document.querySelector('#clients-body tr[data-client=\"web-1\"]')"
    tls_browser.wait_for(f"{row} && {row}.dataset.connected === 'true'", what="web-1 connected")
    sockets = [
        e["params"]["url"]
        for e in tls_browser.events
        if e.get("method") == "Network.webSocketCreated"
    ]
    assert sockets and all(u == center.url.replace("https://", "wss://") + "/api/live"
                           for u in sockets), sockets  # fmt: skip
    # A deployment made elsewhere shows up live, through the wss:// feed.
    deploy_id = center.deploy("shell", "web-1", script="echo pushed-over-wss")
    tls_browser.wait_for(
        f"(r => r && r.innerText.includes('success'))(document.querySelector("
        f"'tr[data-deploy-row=\"{deploy_id}\"]'))",
        timeout=30,
        what="the deployment listed as success",
    )
    shot = tmp_path / "web-page-https.png"
    tls_browser.screenshot(shot)
    print(f"screenshot: {shot}")
    assert tls_browser.problems() == []


# --------------------------------------------------------------------------- supplied cert


def self_signed(
    directory: Path,
    name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """A self-signed certificate for ``API_HOST`` and its key, as ``name.pem``/``name.key``."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(API_HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def test_a_supplied_certificate_and_key_serve_the_api(tmp_path: Path) -> None:
    # An "ACME" CA of its own issues the pair (the project's certs helper makes one).
    acme = ensure_server_certs(tmp_path / "acme", hostnames=(API_HOST,))
    c = TlsCenter(
        tmp_path / "c", "--api-cert", str(acme.cert), "--api-key", str(acme.key),
        client_ca=acme.ca_cert,
    )  # fmt: skip
    try:
        c.start_server()
        info = json.loads((c.server_dir / "server.json").read_text())
        assert info["api_url"] == c.url and info["api_ca"] is None
        served = ssl.get_server_certificate((API_HOST, c.api_port), timeout=10)
        assert x509.load_pem_x509_certificate(served.encode()) == x509.load_pem_x509_certificate(
            acme.cert.read_bytes()
        )
        ok = deployctl(
            "clients", "--json", "--state-dir", str(c.server_dir), "--ca", str(acme.ca_cert)
        )
        assert ok.returncode == 0, ok.stderr
        # The server's own CA (what agents pin) does not vouch for a supplied certificate.
        own = deployctl(
            "clients", "--state-dir", str(c.server_dir), "--ca", str(c.server_dir / "ca.pem")
        )
        assert own.returncode == 1 and "certificate is not trusted" in own.stderr
    finally:
        c.close()


def start_refused(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    done = deployctl(
        "server", "--state-dir", str(state), "--api-port", str(free_port()),
        "--quic-port", "0", *args, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert not state.exists(), "refused before anything was created"
    return done


def test_a_mismatched_pair_refuses_to_start(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    done = start_refused(tmp_path, "--api-cert", str(cert), "--api-key", str(other_key))
    assert f"--api-key {other_key} does not belong to the certificate" in done.stderr


def test_an_expired_or_future_certificate_refuses_to_start(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = self_signed(
        tmp_path, "old", not_before=now - datetime.timedelta(days=90),
        not_after=now - datetime.timedelta(days=1),
    )  # fmt: skip
    done = start_refused(tmp_path, "--api-cert", str(cert), "--api-key", str(key))
    assert "expired on" in done.stderr
    cert, key = self_signed(tmp_path, "new", not_before=now + datetime.timedelta(days=2))
    done = start_refused(tmp_path, "--api-cert", str(cert), "--api-key", str(key))
    assert "is valid only from" in done.stderr


def test_bad_certificate_options_refuse_to_start(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "one")
    missing = start_refused(
        tmp_path, "--api-cert", str(tmp_path / "nope.pem"), "--api-key", str(key)
    )
    assert "does not exist" in missing.stderr
    alone = start_refused(tmp_path, "--api-cert", str(cert))
    assert "--api-cert and --api-key go together" in alone.stderr
    swapped = start_refused(tmp_path, "--api-cert", str(key), "--api-key", str(cert))
    assert "not a PEM certificate" in swapped.stderr
    encrypted = tmp_path / "encrypted.key"
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    locked = start_refused(tmp_path, "--api-cert", str(cert), "--api-key", str(encrypted))
    assert "encrypted with a password" in locked.stderr
    both = start_refused(tmp_path, "--api-tls", "--api-insecure-http")
    assert "contradicts --api-tls" in both.stderr
    contradiction = start_refused(
        tmp_path, "--no-api-tls", "--api-cert", str(cert), "--api-key", str(key)
    )
    assert "--no-api-tls contradicts" in contradiction.stderr


def test_plain_http_on_a_network_address_is_refused_without_the_opt_in(tmp_path: Path) -> None:
    # Refused before binding: nothing listens on 0.0.0.0, nothing is sent anywhere.
    done = start_refused(tmp_path, "--api-host", "0.0.0.0", "--no-api-tls")
    assert "refusing to serve the API over plain HTTP on 0.0.0.0" in done.stderr
    assert "--api-insecure-http" in done.stderr


def test_up_serves_https_when_asked(tmp_path: Path) -> None:
    import signal
    import socket

    state = tmp_path / "up"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_CENTER_")}
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy_core.cli", "up", "--state-dir", str(state),
         "--api-port", str(free_port()), "--quic-port", str(free_port(socket.SOCK_DGRAM)),
         "--api-tls"],
        stdout=log, stderr=subprocess.STDOUT, env=clean, start_new_session=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        listed: list[dict[str, Any]] = []
        while time.monotonic() < end and not any(c["connected"] for c in listed):
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            if (state / "server.json").exists():
                done = deployctl("clients", "--json", "--state-dir", str(state))
                if done.returncode == 0:
                    listed = json.loads(done.stdout)
            time.sleep(0.3)
        assert [c["client_id"] for c in listed if c["connected"]] == ["local"], listed
        info = json.loads((state / "server.json").read_text())
        assert info["api_url"].startswith("https://127.0.0.1:")
        assert "API over TLS:" in (tmp_path / "up.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_a_slowloris_client_over_tls_still_gets_408(tmp_path: Path) -> None:
    import contextlib
    import socket

    c = TlsCenter(tmp_path / "slow", "--http-header-timeout", "1")
    try:
        c.start_server()
        context = ssl.create_default_context(cafile=str(c.server_dir / "ca.pem"))
        with (
            socket.create_connection((API_HOST, c.api_port), timeout=60) as raw,
            context.wrap_socket(raw, server_hostname=API_HOST) as tls,
        ):
            tls.sendall(b"GET /api/info HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
            answer = b""
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while chunk := tls.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        c.close()


def test_a_renewed_supplied_certificate_is_served_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import shutil

    from deploy_core.server.app import DeployServer, ServerConfig

    acme_dir = tmp_path / "acme"
    first = ensure_server_certs(acme_dir, hostnames=(API_HOST,))
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"

    def install(source: Path, target: Path) -> None:  # as an ACME client does: a rename
        shutil.copyfile(source, target.with_suffix(".new"))
        os.chmod(target.with_suffix(".new"), 0o600)
        os.replace(target.with_suffix(".new"), target)

    install(first.cert, cert)
    install(first.key, key)
    original = first.cert.read_bytes()

    def served() -> bytes:
        pem = ssl.get_server_certificate((API_HOST, server.api_port), timeout=10)
        return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.PEM)

    async def until_served(wanted: bytes) -> None:
        end = time.monotonic() + 30
        while (now := await asyncio.to_thread(served)) != wanted:
            assert time.monotonic() < end, "the renewed certificate was never served"
            await asyncio.sleep(0.1)
        assert now == wanted

    server = DeployServer(
        ServerConfig(
            state_dir=tmp_path / "server", api_host=API_HOST, api_port=0, quic_port=0,
            api_cert=cert, api_key=key, api_cert_check_interval=0.1,
        )
    )  # fmt: skip

    async def scenario() -> None:
        await server.start()
        try:
            assert await asyncio.to_thread(served) == original
            renewed = ensure_server_certs(acme_dir, hostnames=(API_HOST, "renewed.example"))
            assert renewed.cert.read_bytes() != original
            # Caught mid-renewal: the new certificate beside the old key. Refused, the old
            # pair is still served.
            with caplog.at_level("WARNING"):
                install(renewed.cert, cert)
                end = time.monotonic() + 30
                while "keeps serving its previous certificate" not in caplog.text:
                    assert time.monotonic() < end, "the half-renewed pair was not noticed"
                    await asyncio.sleep(0.1)
            assert await asyncio.to_thread(served) == original
            install(renewed.key, key)
            await until_served(renewed.cert.read_bytes())
            # A client that trusts the CA still gets through, by name checks and all.
            with DeployClient(
                f"https://{API_HOST}:{server.api_port}", server.state.admin_token,
                ca=first.ca_cert,
            ) as api:  # fmt: skip
                info = await asyncio.to_thread(api.request, "GET", "/api/info")
                assert info
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_https_on_ipv6_loopback_with_the_state_directory(tmp_path: Path) -> None:
    import asyncio

    from deploy_core.server.app import DeployServer, ServerConfig

    server = DeployServer(
        ServerConfig(
            state_dir=tmp_path / "s", api_host="::1", api_port=0, quic_port=0, api_tls=True
        )
    )

    async def scenario() -> None:
        await server.start()
        try:
            assert server.api_url == f"https://[::1]:{server.api_port}"
            done = await asyncio.to_thread(
                deployctl, "clients", "--json", "--state-dir", str(tmp_path / "s")
            )
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout) == []
        finally:
            await server.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("host", "tls", "url"),
    [
        ("0.0.0.0", True, "https://127.0.0.1:8470"),
        ("::", True, "https://[::1]:8470"),
        ("0.0.0.0", False, "http://127.0.0.1:8470"),
        ("10.1.2.3", True, "https://10.1.2.3:8470"),
        ("2001:db8::5", True, "https://[2001:db8::5]:8470"),
    ],
)
def test_the_api_url_is_one_a_client_here_can_use(host: str, tls: bool, url: str) -> None:
    """No server is started (nothing listens): the URL server.json and the banner give."""
    from deploy_core.server.app import DeployServer, ServerConfig
    from deploy_core.server.http.tls import ApiTls

    server = DeployServer(ServerConfig(state_dir=Path("/nonexistent"), api_host=host))
    server.api_tls = ApiTls(Path("c"), Path("k"), None) if tls else None
    assert server.api_url == url

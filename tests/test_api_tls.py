"""The API's TLS rules without a server: when the server serves HTTPS, which names its
certificate must cover, and where ``deployctl`` refuses to send a token (issue 16 §5).

The refusals must come before any connection: the tests make every socket connect and name
lookup fail loudly, and use TEST-NET addresses (RFC 5737) that nothing would answer anyway.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.client import ConfigError, DeployClient, resolve_ca
from deploy_core.loopback import is_loopback_host, is_wildcard_host
from deploy_core.server.http.tls import ApiTlsChoice, ApiTlsError, covers
from deploy_core.transport import ensure_server_certs

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt to connect or resolve a name is recorded and fails."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args))
        raise AssertionError(f"the network was touched: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
        ("2001:db8::1", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False),
        ("0x7f000001", False),  # not resolved, so not known to be loopback
        ("", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_wildcard_hosts() -> None:
    assert all(is_wildcard_host(h) for h in ("0.0.0.0", "::", "[::]", ""))
    assert not any(is_wildcard_host(h) for h in ("127.0.0.1", "10.0.0.1", "deploy.example"))


# --------------------------------------------------------------------------- server side


@pytest.mark.parametrize(
    ("host", "enabled"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.1.2.3", True),
        ("deploy.example", True),
    ],
)
def test_tls_is_on_by_default_off_loopback(host: str, enabled: bool) -> None:
    assert ApiTlsChoice.choose(host).enabled is enabled


def test_tls_forced_on_loopback_and_plain_http_only_with_the_opt_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert ApiTlsChoice.choose("127.0.0.1", tls=True).enabled
    assert not ApiTlsChoice.choose("127.0.0.1", tls=False).enabled
    for host in ("0.0.0.0", "192.0.2.1", "deploy.example"):
        with pytest.raises(ApiTlsError, match="refusing to serve the API over plain HTTP"):
            ApiTlsChoice.choose(host, tls=False)
    plain = ApiTlsChoice.choose("0.0.0.0", insecure_http=True)
    assert not plain.enabled
    with caplog.at_level(logging.WARNING):
        plain.log_start("0.0.0.0", DEFAULT_NAMES, DEFAULT_NAMES)
    assert "serves plain HTTP on 0.0.0.0" in caplog.text
    with pytest.raises(ApiTlsError, match="contradicts --api-tls"):
        ApiTlsChoice.choose("0.0.0.0", tls=True, insecure_http=True)


def test_the_generated_certificate_covers_the_api_host(tmp_path: Path) -> None:
    choice = ApiTlsChoice.choose("10.1.2.3")
    names = choice.hostnames(DEFAULT_NAMES, "10.1.2.3")
    assert names == (*DEFAULT_NAMES, "10.1.2.3")
    assert choice.hostnames(DEFAULT_NAMES, "0.0.0.0") == DEFAULT_NAMES
    assert choice.hostnames(DEFAULT_NAMES, "127.0.0.1") == DEFAULT_NAMES  # already there
    assert ApiTlsChoice.choose("127.0.0.1").hostnames(DEFAULT_NAMES, "127.0.0.1") == (DEFAULT_NAMES)
    named = ApiTlsChoice.choose("deploy.example").hostnames(DEFAULT_NAMES, "deploy.example")
    certs = ensure_server_certs(tmp_path, hostnames=named)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    assert covers(cert, "deploy.example") and covers(cert, "127.0.0.1")
    assert not covers(cert, "other.example")


def test_every_address_with_no_name_of_its_own_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    choice = ApiTlsChoice.choose("0.0.0.0")
    with caplog.at_level(logging.WARNING):
        choice.log_start("0.0.0.0", DEFAULT_NAMES, DEFAULT_NAMES)
    assert "give each one with --cert-name" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        choice.log_start("0.0.0.0", (*DEFAULT_NAMES, "deploy.example"), DEFAULT_NAMES)
    assert caplog.text == ""


def test_wildcard_names_cover_one_label(tmp_path: Path) -> None:
    from cryptography import x509

    certs = ensure_server_certs(tmp_path, hostnames=("*.example.com",))
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    assert covers(cert, "deploy.example.com")
    assert covers(cert, "DEPLOY.example.com.")
    assert not covers(cert, "a.b.example.com")
    assert not covers(cert, "example.com")


# --------------------------------------------------------------------------- deployctl


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.2.1:8470",
        "http://[2001:db8::1]:8470",
        "http://deploy.example:8470",
        "http://localhost.example.com:8470",
        "http://127.0.0.1.nip.io:8470",
        "HTTP://192.0.2.1",
        "http://127.0.0.1@192.0.2.1:8470",  # user info, not the host
        "http://127.0.0.1:8470\\@192.0.2.1",
        "http://192.0.2.1#@127.0.0.1",
        "http://192.0.2.1?@127.0.0.1",
        "http://127.0.0.1%2f@192.0.2.1",
        "http://[::ffff:c000:201]:8470",  # 192.0.2.1, IPv4-mapped
        "http://2130706433:8470",  # 127.0.0.1 to getaddrinfo, but not said so: refused
    ],
)
def test_deployctl_refuses_a_token_over_http_off_loopback_before_connecting(
    url: str, tmp_path: Path, no_network: list[str]
) -> None:
    result = CliRunner().invoke(
        main,
        ["list", "--client", "web-1", "--url", url, "--token", "t0k3n", "--state-dir",
         str(tmp_path)],
        env={"DEPLOY_CENTER_INSECURE_HTTP": None, "DEPLOY_CENTER_CA": None},
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "refusing to send the API token over plain http://" in result.output
    assert "--insecure-http" in result.output
    assert "t0k3n" not in result.output
    assert no_network == []


def test_insecure_http_is_the_explicit_way_through(
    tmp_path: Path, no_network: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with DeployClient("http://192.0.2.1:8470", "t", insecure_http=True):
        pass  # made, nothing sent
    monkeypatch.setenv("DEPLOY_CENTER_INSECURE_HTTP", "1")
    with DeployClient.from_env("http://192.0.2.1:8470", "t", tmp_path):
        pass
    monkeypatch.setenv("DEPLOY_CENTER_INSECURE_HTTP", "0")
    with pytest.raises(ConfigError, match="refusing"):
        DeployClient.from_env("http://192.0.2.1:8470", "t", tmp_path)
    assert no_network == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8470", "http://[::1]:8470", "http://localhost:8470"]
)
def test_http_on_loopback_needs_no_opt_in(url: str, no_network: list[str]) -> None:
    with DeployClient(url, "t"):
        pass
    assert no_network == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://192.0.2.1/",
        "192.0.2.1:8470",
        "http://",
        "https://host:99999",
        "file:///x",
        " http://192.0.2.1",
        "http://127.0.0.1\t@192.0.2.1",
    ],
)
def test_urls_that_are_not_http_are_refused(url: str, no_network: list[str]) -> None:
    with pytest.raises(ConfigError, match="URL"):
        DeployClient(url, "t")
    assert no_network == []


def test_a_ca_file_that_is_no_certificate_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("nothing\n")
    with pytest.raises(ConfigError, match="cannot verify the server with it"):
        DeployClient("https://192.0.2.1:8470", "t", ca=junk)
    with pytest.raises(ConfigError, match="cannot verify the server with it"):
        DeployClient("https://192.0.2.1:8470", "t", ca=tmp_path / "missing.pem")


def test_the_state_directory_ca_is_used_only_for_its_own_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEPLOY_CENTER_CA", raising=False)
    info = {"api_url": "https://127.0.0.1:8470", "api_ca": str(tmp_path / "ca.pem")}
    (tmp_path / "server.json").write_text(json.dumps(info))
    assert resolve_ca("https://127.0.0.1:8470", None, tmp_path) == tmp_path / "ca.pem"
    # Another server: the default trust store, not a CA it has nothing to do with.
    assert resolve_ca("https://deploy.example:8470", None, tmp_path) is None
    # A supplied certificate (api_ca null): the default trust store.
    (tmp_path / "server.json").write_text(json.dumps({**info, "api_ca": None}))
    assert resolve_ca("https://127.0.0.1:8470", None, tmp_path) is None
    (tmp_path / "server.json").write_text("{not json")
    assert resolve_ca("https://127.0.0.1:8470", None, tmp_path) is None
    monkeypatch.setenv("DEPLOY_CENTER_CA", str(tmp_path / "env.pem"))
    assert resolve_ca("https://127.0.0.1:8470", None, tmp_path) == tmp_path / "env.pem"
    explicit = tmp_path / "given.pem"
    assert resolve_ca("https://127.0.0.1:8470", explicit, tmp_path) == explicit


def test_the_user_guide_shows_the_refusal_deployctl_prints(
    tmp_path: Path, no_network: list[str]
) -> None:
    result = CliRunner().invoke(
        main,
        ["list", "--url", "http://deploy.example.com:8470", "--token", "t", "--state-dir",
         str(tmp_path)],
        env={"DEPLOY_CENTER_INSECURE_HTTP": None},
    )  # fmt: skip
    guide = (Path(__file__).parent.parent / "docs" / "user-guide.md").read_text()
    printed = result.output.strip().splitlines()[-1]
    assert printed.startswith("Error: refusing to send the API token")
    assert f"\n{printed}\n" in guide, printed


def test_an_environment_proxy_never_carries_a_loopback_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY would make httpx send a plain http:// request, token and all, to the proxy
    (wherever it is): not for the API on loopback.  Both ends are real sockets on 127.0.0.1;
    the "proxy" only records who came."""
    import http.server
    import threading

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"auth": self.headers.get("Authorization")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    api = http.server.HTTPServer(("127.0.0.1", 0), Api)
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.5)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy_url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        with DeployClient(f"http://127.0.0.1:{api.server_address[1]}", "s3cret", timeout=10) as c:
            assert c.request("GET", "/api/info") == {"auth": "Bearer s3cret"}
        with pytest.raises(TimeoutError):
            proxy.accept()[0].close()  # nobody came
    finally:
        api.shutdown()
        api.server_close()
        proxy.close()


def test_a_key_others_can_read_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = ensure_server_certs(tmp_path, hostnames=("deploy.example",))
    certs.key.chmod(0o644)
    choice = ApiTlsChoice.choose("deploy.example", cert=certs.cert, key=certs.key)
    assert choice.enabled
    with caplog.at_level(logging.WARNING):
        choice.log_start("deploy.example", DEFAULT_NAMES, DEFAULT_NAMES)
        choice.log_start("other.example", DEFAULT_NAMES, DEFAULT_NAMES)
    assert caplog.text.count("can be read by other users") == 2  # once per start
    assert "does not name --api-host other.example" in caplog.text
    assert "does not name --api-host deploy.example" not in caplog.text


def test_a_plain_http_client_trusts_no_ca_at_all() -> None:
    import ssl

    from deploy_core.client import connection_settings

    verify = connection_settings("http://127.0.0.1:8470", None)["verify"]
    assert isinstance(verify, ssl.SSLContext)
    assert verify.verify_mode == ssl.CERT_REQUIRED and verify.check_hostname
    assert verify.get_ca_certs() == []
    assert connection_settings("https://127.0.0.1:8470", None)["verify"] is True

"""URL sources: a package the agent fetches itself over HTTP(S) from a real loopback server
(tests/package_server.py), resumed with Range, verified, limited, its query string never
shown; and deploy.tar deployments from one, through the agent's own executor."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentBench, LocalArtifacts, build_package
from package_server import PackageServer, Route, make_ca_and_cert, serve
from pydantic import ValidationError

from deploy_tar.params import TarParams
from deploy_tar.releases import Releases
from deploy_tar.url_fetch import STALE_AFTER, prune_stale
from deploy_tar.url_source import (
    UrlFetchError,
    UrlPolicy,
    UrlRefused,
    check_url,
    download,
    policy_from_config,
    redact,
)

SECRET_QUERY = "X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
FAST = UrlPolicy(backoff=0.01, read_timeout=5)


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server() -> Iterator[PackageServer]:
    with serve() as s:
        yield s


def fetch(
    server: PackageServer, tmp_path: Path, body: bytes, policy: UrlPolicy = FAST, **kw: Any
) -> Any:
    lines: list[str] = []
    got = download(
        server.url("/pkg.tar.gz"),
        kw.pop("sha256", sha(body)),
        tmp_path,
        policy,
        log=lines.append,
        **kw,
    )
    got.lines = lines
    return got


# ---------------------------------------------------------------------- the transfer


def test_a_plain_fetch_is_verified_and_complete(server: PackageServer, tmp_path: Path) -> None:
    body = blob(3 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body)
    progress: list[tuple[int, int]] = []
    got = fetch(server, tmp_path, body, progress=lambda d, t: progress.append((d, t)))
    assert got.path.read_bytes() == body
    assert (got.size, got.bytes_transferred, got.interruptions) == (len(body), len(body), 0)
    assert progress[-1] == (len(body), len(body))
    assert not (tmp_path / f"{got.sha256}.partial").exists()
    assert server.ranges() == [None]


def test_a_dropped_connection_resumes_with_range_and_if_range(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(2 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=700_000, cuts=2)
    got = fetch(server, tmp_path, body)
    assert got.path.read_bytes() == body
    assert got.interruptions == 2 and got.restarts == 0
    assert server.ranges() == [None, "bytes=700000-", "bytes=1400000-"]
    assert [s.headers.get("If-Range") for s in server.seen[1:]] == ['"v1"', '"v1"']
    # Nothing was sent twice: the resumed requests asked for what was missing.
    assert server.bytes_sent == len(body)
    assert got.bytes_transferred == len(body)


def test_a_stalled_read_times_out_and_resumes(server: PackageServer, tmp_path: Path) -> None:
    body = blob(1 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=300_000, stall=3.0, cuts=0)
    policy = UrlPolicy(backoff=0.01, read_timeout=0.5)
    got = fetch(server, tmp_path, body, policy)
    assert got.path.read_bytes() == body
    assert got.interruptions == 1
    # Resumed from what reached the disk (a read cut by the timeout may lose its buffer).
    resumed_at = int(str(server.ranges()[1]).removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 300_000
    assert any("no data within the read timeout" in line for line in got.lines)


def test_a_server_ignoring_range_is_read_again_from_the_start(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(1 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=400_000, ignore_range=True)
    got = fetch(server, tmp_path, body)
    assert got.path.read_bytes() == body
    assert (got.interruptions, got.restarts) == (1, 1)
    assert server.ranges() == [None, "bytes=400000-"]
    assert server.bytes_sent == 400_000 + len(body)
    assert any("ignored the Range request" in line for line in got.lines)


def test_a_changed_file_behind_the_url_is_fetched_whole(
    server: PackageServer, tmp_path: Path
) -> None:
    """If-Range with the old ETag: the server sends the whole new file (200), not a range of
    it glued onto the old bytes."""
    old, new = blob(1 << 20, 1), blob(1 << 20, 2)
    route = Route(body=old, drop_after=300_000)
    server.routes["/pkg.tar.gz"] = route
    with pytest.raises(UrlFetchError):  # the old file, cut, then gone for good
        download(
            server.url("/pkg.tar.gz"),
            sha(new),
            tmp_path,
            FAST,
            cancelled=lambda: len(server.seen) >= 2,  # given up while resuming
        )
    assert (tmp_path / f"{sha(new)}.partial").stat().st_size == 300_000  # kept to resume
    route.body, route.etag = new, '"v2"'
    got = fetch(server, tmp_path, new)
    assert got.path.read_bytes() == new
    assert got.bytes_resumed == 300_000 and got.restarts == 1
    assert server.seen[-1].headers["If-Range"] == '"v1"'


def test_an_interrupted_fetch_is_resumed_by_the_next_one(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(1 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=500_000)
    with pytest.raises(UrlFetchError, match="gave up"):
        download(
            server.url("/pkg.tar.gz"),
            sha(body),
            tmp_path,
            FAST,
            cancelled=lambda: len(server.seen) >= 2,  # given up while resuming
        )
    got = fetch(server, tmp_path, body)
    assert got.bytes_resumed == 500_000
    assert got.bytes_transferred == len(body) - 500_000
    assert server.ranges()[-1] == "bytes=500000-"


def test_retries_are_bounded(server: PackageServer, tmp_path: Path) -> None:
    server.routes["/pkg.tar.gz"] = Route(body=b"x", status=503)
    with pytest.raises(UrlFetchError, match="5 attempts in a row brought no data"):
        fetch(server, tmp_path, b"x")
    assert len(server.seen) == 5


def test_a_client_error_is_not_retried(server: PackageServer, tmp_path: Path) -> None:
    with pytest.raises(UrlFetchError, match="answered HTTP 404"):
        fetch(server, tmp_path, b"x")
    assert len(server.seen) == 1


def test_a_range_starting_elsewhere_means_starting_over(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(600_000)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=200_000, wrong_start=100)
    got = fetch(server, tmp_path, body)
    assert got.path.read_bytes() == body
    assert got.restarts == 1
    assert server.ranges() == [None, "bytes=200000-", None]


def test_a_416_means_starting_over(server: PackageServer, tmp_path: Path) -> None:
    body = blob(600_000)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=200_000, refuse_ranges=True)
    got = fetch(server, tmp_path, body)
    assert got.path.read_bytes() == body
    assert got.restarts == 1
    assert server.ranges() == [None, "bytes=200000-", None]


def test_a_chunked_body_is_read_and_limited(server: PackageServer, tmp_path: Path) -> None:
    body = blob(3 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, chunked=True)
    assert fetch(server, tmp_path, body).path.read_bytes() == body
    with pytest.raises(UrlFetchError, match="more than 1048576 bytes"):
        fetch(server, tmp_path, body, UrlPolicy(max_bytes=1 << 20, backoff=0.01))


# ---------------------------------------------------------------------- verification


def test_a_wrong_sha256_fails_after_one_more_try_and_keeps_nothing(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(200_000)
    server.routes["/pkg.tar.gz"] = Route(body=body)
    wrong = sha(b"something else")
    with pytest.raises(UrlFetchError, match="failed SHA-256 verification twice") as caught:
        fetch(server, tmp_path, body, sha256=wrong)
    assert sha(body) in str(caught.value)
    assert len(server.seen) == 2
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- size limits


def test_over_the_limit_without_content_length_stops_reading(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(8 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, length="missing")
    policy = UrlPolicy(max_bytes=1 << 20, backoff=0.01)
    with pytest.raises(UrlFetchError, match=r"more than 1048576 bytes, the agent's limit"):
        fetch(server, tmp_path, body, policy)
    assert list(tmp_path.iterdir()) == []  # nothing kept, nothing extracted


def test_a_content_length_over_the_limit_is_refused_before_the_body(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(2 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body)
    with pytest.raises(UrlFetchError, match="announces 2097152 bytes; the agent's limit"):
        fetch(server, tmp_path, body, UrlPolicy(max_bytes=1 << 20, backoff=0.01))


def test_the_requests_size_is_the_limit_whatever_the_server_says(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(2 << 20)
    # Content-Length claims the expected size, the body is longer: only that much is read.
    server.routes["/pkg.tar.gz"] = Route(body=body, length=1000)
    with pytest.raises(UrlFetchError, match="verification twice"):
        fetch(server, tmp_path, body[:1000] + b"!", size=1000)
    # No Content-Length: reading stops right after the size.
    server.routes["/pkg.tar.gz"] = Route(body=body, length="missing")
    with pytest.raises(UrlFetchError, match="sent more than the 1000 bytes the request said"):
        fetch(server, tmp_path, body, size=1000)
    # A true Content-Length that disagrees with the size.
    server.routes["/pkg.tar.gz"] = Route(body=body)
    with pytest.raises(UrlFetchError, match="request said size 1000"):
        fetch(server, tmp_path, body, size=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_size_above_the_agents_limit_is_refused_before_connecting(
    server: PackageServer, tmp_path: Path
) -> None:
    with pytest.raises(UrlFetchError, match="over the agent's limit"):
        fetch(server, tmp_path, b"x", UrlPolicy(max_bytes=10), size=11)
    assert server.seen == []


# ---------------------------------------------------------------------- TLS


def test_https_with_a_private_ca_needs_the_ca_file(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_cert(tmp_path)
    body = blob(500_000)
    with serve(tls=(cert, key)) as server:
        server.routes["/pkg.tar.gz"] = Route(body=body)
        (tmp_path / "out").mkdir()
        with pytest.raises(UrlFetchError, match=r"TLS verification .* failed") as caught:
            fetch(server, tmp_path / "out", body)
        assert "ca_file" in str(caught.value)
        assert server.seen == []  # refused in the handshake, and not retried
        got = fetch(server, tmp_path / "out", body, UrlPolicy(ca_file=str(ca)))
        assert got.path.read_bytes() == body


def test_a_ca_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    _ca, cert, key = make_ca_and_cert(tmp_path)
    with serve(tls=(cert, key)) as tls_server:
        tls_server.routes["/pkg.tar.gz"] = Route(body=b"x")
        (tmp_path / "out").mkdir()
        with pytest.raises(UrlFetchError, match="cannot load ca_file"):
            fetch(tls_server, tmp_path / "out", b"x", UrlPolicy(ca_file=str(tmp_path / "nope")))


# ---------------------------------------------------------------------- URL rules


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "scheme file: is not allowed"),
        ("ftp://127.0.0.1/pkg.tar.gz", "scheme ftp: is not allowed"),
        ("gopher://127.0.0.1/", "scheme gopher: is not allowed"),
        ("//127.0.0.1/pkg", r"scheme \(none\)"),
        ("https://user:pw@cdn.example.com/pkg", "user name or password"),
        ("https://user@cdn.example.com/pkg", "user name or password"),
        ("https:///pkg", "names no host"),
        ("https://cdn.example.com/a b", "spaces or control characters"),
        ("https://cdn.example.com/a\r\nX-Evil: 1", "spaces or control characters"),
        ("http://cdn.example.com/pkg", "plain http:// is only allowed"),
        ("http://10.0.0.5/pkg", "plain http:// is only allowed"),
        ("https://cdn.example.com:99999/pkg", "not a valid URL"),
        ("https://bücher.example/pkg", "non-ASCII"),
        ("https://cdn.example.com/paket-ü.tgz", "non-ASCII"),
    ],
)
def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(UrlRefused, match=why):
        check_url(url, UrlPolicy())


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn.example.com/pkg.tar.gz",
        "http://127.0.0.1:8080/pkg",
        "http://127.9.9.9/pkg",
        "http://localhost/pkg",
        "http://[::1]:81/pkg",
        "http://mirror.lan/pkg",
        "http://other.lan:8080/pkg",
    ],
)
def test_allowed_urls(url: str) -> None:
    policy = policy_from_config({"allow_http_hosts": ["Mirror.LAN", "other.lan:8080"]}, "cfg")
    check_url(url, policy)


def test_allow_http_hosts_with_a_port_allows_only_that_port() -> None:
    policy = policy_from_config({"allow_http_hosts": ["other.lan:8080"]}, "cfg")
    with pytest.raises(UrlRefused):
        check_url("http://other.lan/pkg", policy)


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"allow_http_hosts": "mirror.lan"}, "must be a list"),
        ({"allow_http_hosts": [""]}, "must be a list"),
        ({"ca_file": "relative.pem"}, "absolute path"),
        ({"max_bytes": 0}, "positive number of bytes"),
        ({"max_bytes": True}, "positive number of bytes"),
        ({"read_timeout": -1}, "positive number of seconds"),
        ({"allow_hosts": []}, "unknown setting"),
    ],
)
def test_bad_config_says_what_is_wrong(config: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        policy_from_config(config, "[plugins.deploy_tar]")


def test_redirects_are_followed_only_where_the_rules_allow(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(100_000)
    server.routes["/pkg.tar.gz"] = Route(redirect="/real.tar.gz")
    server.routes["/real.tar.gz"] = Route(body=body)
    assert fetch(server, tmp_path, body).path.read_bytes() == body

    for target, why in [
        ("http://cdn.example.com/pkg", "plain http:// is only allowed"),
        ("ftp://127.0.0.1/pkg", "scheme ftp: is not allowed"),
        ("file:///etc/shadow", "scheme file: is not allowed"),
        ("http://user:pw@127.0.0.1/pkg", "user name or password"),
    ]:
        server.routes["/pkg.tar.gz"] = Route(redirect=target)
        server.seen.clear()
        with pytest.raises(UrlFetchError, match=f"redirect from .* refused: .*{why}"):
            fetch(server, tmp_path, body)
        assert len(server.seen) == 1

    server.routes["/pkg.tar.gz"] = Route(redirect="/pkg.tar.gz")  # a loop
    server.seen.clear()
    with pytest.raises(UrlFetchError, match="more than 5 redirects"):
        fetch(server, tmp_path, body)
    assert len(server.seen) == 6


# ---------------------------------------------------------------------- redaction


def test_redact_drops_query_fragment_and_user_info() -> None:
    url = f"https://u:p@bucket.s3.amazonaws.com:443/app.tar.gz?{SECRET_QUERY}#frag"
    assert redact(url) == "https://bucket.s3.amazonaws.com:443/app.tar.gz?…"
    assert redact("http://[::1]/x") == "http://[::1]/x"


def test_errors_and_log_lines_never_hold_the_query_string(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(300_000)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=100_000)
    lines: list[str] = []
    url = server.url(f"/pkg.tar.gz?{SECRET_QUERY}")
    got = download(url, sha(body), tmp_path, FAST, log=lines.append)
    assert got.interruptions == 1
    assert server.seen[0].path == f"/pkg.tar.gz?{SECRET_QUERY}"  # the server got it
    errors = []
    for bad in (f"/missing?{SECRET_QUERY}", f"/pkg.tar.gz?{SECRET_QUERY}"):
        try:
            download(server.url(bad), "0" * 64, tmp_path, FAST, log=lines.append)
        except UrlFetchError as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and lines
    for text in [*lines, *errors]:
        assert "AKIAEXAMPLE" not in text and "deadbeef" not in text, text
    assert "?…" in errors[0]


# ---------------------------------------------------------------------- params


def test_params_take_exactly_one_package() -> None:
    source = {"url": "https://cdn.example.com/a.tar.gz", "sha256": "A" * 64}
    params = TarParams.model_validate({"source": source, "target_dir": "/srv/app"})
    assert params.sha256 == "a" * 64 and params.artifact is None
    for body in ({}, {"artifact": "a" * 64, "source": source}):
        with pytest.raises(ValidationError, match="exactly one of artifact"):
            TarParams.model_validate({**body, "target_dir": "/srv/app"})


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ({"url": "https://cdn.example.com/a?sig=1", "sha256": "a" * 64}, "query string"),
        ({"url": "https://cdn.example.com/a#x", "sha256": "a" * 64}, "fragment"),
        ({"url": "file:///a", "sha256": "a" * 64}, "scheme file:"),
        ({"url": "https://cdn.example.com/a", "sha256": "xyz"}, "pattern"),
        ({"url": "https://cdn.example.com/a", "sha256": "a" * 64, "size": 0}, "greater"),
        ({"url": "https://cdn.example.com/a", "sha256": "a" * 64, "extra": 1}, "Extra inputs"),
        ({"url": "https://cdn.example.com/a", "sha256": "a" * 64, "size": 65 << 30}, "less"),
        ({"url": "https://c.example/" + "a" * 8200, "sha256": "a" * 64}, "at most 8192"),
        ({"url": "https://c.example/a", "sha256": "a" * 64, "query_secret": "1X"}, "pattern"),
        ({"url": 5, "sha256": "a" * 64}, "string"),
    ],
)
def test_bad_sources_are_refused_with_the_field_named(source: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why) as caught:
        TarParams.model_validate({"source": source, "target_dir": "/srv/app"})
    # What the API answers (the input is left out there): no query string.
    assert "sig=1" not in repr(caught.value.errors(include_input=False, include_url=False))


# ---------------------------------------------------------------------- deployments


INSTALL = 'echo "installed $(cat version)" > "$TARGET_DIR/installed"\n'


@pytest.fixture
def url_agent(tmp_path: Path) -> Iterator[AgentBench]:
    bench = AgentBench(tmp_path / "agent", LocalArtifacts(tmp_path / "agent" / "cache"))
    yield bench
    bench.journal.close()


def _texts(payload: Any) -> str:
    return repr(payload)


async def test_a_deployment_from_a_url_installs_and_leaves_no_download(
    server: PackageServer, tmp_path: Path, url_agent: AgentBench
) -> None:
    package = build_package(tmp_path / "app.tar.gz", {"version": "7", "install.sh": INSTALL})
    data = package.read_bytes()
    server.routes["/app.tar.gz"] = Route(body=data, drop_after=len(data) // 2)
    target = tmp_path / "srv"
    params = {
        "source": {
            "url": server.url("/app.tar.gz"),
            "sha256": sha(data),
            "size": len(data),
            "query_secret": "PKG_QUERY",
        },
        "target_dir": str(target),
    }
    payload = await url_agent.deploy(params, secret_env={"PKG_QUERY": SECRET_QUERY})
    assert payload["status"] == "success", payload
    assert (target / "installed").read_text() == "installed 7\n"
    result = payload["result"]
    assert result["sha256"] == sha(data) and result["url"] == server.url("/app.tar.gz")
    assert result["bytes_sent"] == len(data)
    assert server.seen[0].path == f"/app.tar.gz?{SECRET_QUERY}"
    assert server.ranges()[1] == f"bytes={len(data) // 2}-"
    downloads = tmp_path / "agent" / "data" / "deploy_tar" / "downloads"
    assert list(downloads.iterdir()) == []
    assert os.stat(downloads).st_mode & 0o777 == 0o700
    messages = [m.payload for m in url_agent.journal.pending()]
    assert "AKIAEXAMPLE" not in _texts(messages)
    assert any("resum" in repr(m) or "interrupted" in repr(m) for m in messages)


async def test_a_wrong_sha256_fails_the_deployment_before_anything_is_extracted(
    server: PackageServer, tmp_path: Path, url_agent: AgentBench
) -> None:
    good = build_package(tmp_path / "v1.tar.gz", {"version": "1", "install.sh": INSTALL})
    bad = build_package(tmp_path / "v2.tar.gz", {"version": "2", "install.sh": INSTALL})
    server.routes["/v1.tar.gz"] = Route(body=good.read_bytes())
    server.routes["/v2.tar.gz"] = Route(body=bad.read_bytes())
    target = tmp_path / "srv"
    first = await url_agent.deploy(
        {
            "source": {"url": server.url("/v1.tar.gz"), "sha256": sha(good.read_bytes())},
            "target_dir": str(target),
        }
    )
    assert first["status"] == "success", first
    second = await url_agent.deploy(
        {
            "source": {"url": server.url("/v2.tar.gz"), "sha256": sha(b"not it")},
            "target_dir": str(target),
        }
    )
    assert second["status"] == "rolled_back", second
    assert "failed SHA-256 verification twice" in second["error"]
    assert not (target / "releases" / second["callback_id"]).exists()
    assert Releases(target).current() == first["callback_id"]
    assert (target / "installed").read_text() == "installed 1\n"
    assert "nothing to undo" in repr(second)


async def test_the_agents_own_config_decides_plain_http_hosts(
    server: PackageServer, tmp_path: Path
) -> None:
    """The agent checks every URL against its own [plugins.deploy_tar], whatever the server
    allowed: a CA file it cannot read, or max_bytes, come from there too."""
    package = build_package(tmp_path / "app.tar.gz", {"version": "3"})
    server.routes["/app.tar.gz"] = Route(body=package.read_bytes())
    bench = AgentBench(
        tmp_path / "agent",
        LocalArtifacts(tmp_path / "cache"),
        plugin_settings={"deploy_tar": {"max_bytes": 100}},
    )
    try:
        payload = await bench.deploy(
            {
                "source": {"url": server.url("/app.tar.gz"), "sha256": sha(package.read_bytes())},
                "target_dir": str(tmp_path / "srv"),
            },
        )
        assert payload["status"] == "rolled_back"
        assert "the agent's limit is 100 bytes" in payload["error"]
        bench.executor.plugin_settings = {"deploy_tar": {"allow_http_hosts": 5}}
        payload = await bench.deploy(
            {
                "source": {"url": server.url("/app.tar.gz"), "sha256": "0" * 64},
                "target_dir": str(tmp_path / "srv"),
            },
        )
        assert payload["status"] == "rolled_back"
        assert "[plugins.deploy_tar] of the agent's config" in payload["error"]
    finally:
        bench.journal.close()


async def test_a_missing_query_secret_fails_clearly(
    server: PackageServer, tmp_path: Path, url_agent: AgentBench
) -> None:
    payload = await url_agent.deploy(
        {
            "source": {
                "url": server.url("/app.tar.gz"),
                "sha256": "0" * 64,
                "query_secret": "NOT_GIVEN",
            },
            "target_dir": str(tmp_path / "srv"),
        },
    )
    assert payload["status"] == "rolled_back"
    assert "query_secret names NOT_GIVEN" in payload["error"]
    assert server.seen == []


def test_links_planted_in_the_download_directory_are_replaced_not_followed(
    server: PackageServer, tmp_path: Path
) -> None:
    body = blob(100_000)
    server.routes["/pkg.tar.gz"] = Route(body=body)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for name in (f"{sha(body)}.partial", f"{sha(body)}.partial.json"):
        (downloads / name).symlink_to(victim)
    got = fetch(server, downloads, body)
    assert got.path.read_bytes() == body
    assert victim.read_bytes() == b"precious"
    assert not got.path.is_symlink()


async def test_the_deployments_timeout_ends_a_stalled_download_at_once(
    server: PackageServer, tmp_path: Path
) -> None:
    """The server stalls mid-body far longer than the agent's read timeout would wait: the
    deployment's timeout (2 s) shuts the connection down instead of waiting the read out."""
    body = blob(1 << 20)
    server.routes["/pkg.tar.gz"] = Route(body=body, drop_after=100_000, stall=120.0, cuts=0)
    bench = AgentBench(
        tmp_path / "agent",
        LocalArtifacts(tmp_path / "cache"),
        plugin_settings={"deploy_tar": {"read_timeout": 600}},
    )
    try:
        payload = await asyncio.wait_for(
            bench.deploy(
                {
                    "source": {"url": server.url("/pkg.tar.gz"), "sha256": sha(body)},
                    "target_dir": str(tmp_path / "srv"),
                    "timeout": 2,
                }
            ),
            60,  # far below the read timeout: only the abort ends the read in time
        )
    finally:
        bench.journal.close()
    assert payload["status"] == "rolled_back", payload  # a timeout, then the rollback
    assert (
        "downloading the package did not finish within the deployment's timeout of 2 s"
        in (payload["error"])
    )
    partial = tmp_path / "agent" / "data" / "deploy_tar" / "downloads" / f"{sha(body)}.partial"
    assert 0 < partial.stat().st_size <= 100_000  # kept for the next deployment to resume


def test_stale_partial_downloads_of_other_packages_are_pruned(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    for name, age in [
        ("a" * 64 + ".partial", STALE_AFTER + 10),
        ("a" * 64 + ".partial.json", STALE_AFTER + 10),
        ("b" * 64 + ".partial", 60),  # recent: another deployment may resume it
        ("c" * 64 + ".partial", STALE_AFTER + 10),  # the package being fetched now
    ]:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (now - age, now - age))
    (tmp_path / "link.partial").symlink_to(tmp_path / ("b" * 64 + ".partial"))
    removed = prune_stale(tmp_path, "c" * 64, now)
    assert sorted(removed) == ["a" * 64 + ".partial", "a" * 64 + ".partial.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b" * 64 + ".partial",
        "c" * 64 + ".partial",
        "link.partial",
    ]

"""A small synchronous client of the HTTP API, used by ``deployctl``, tests and benchmarks.

It finds the server from explicit arguments, then ``DEPLOY_CENTER_URL`` /
``DEPLOY_CENTER_TOKEN``, then a server state directory (``server.json`` and ``admin.token``).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# httpx is imported where a request is made: `deployctl agent` imports the CLI, which imports
# this module's errors, and an agent has no use for an HTTP client (issue 12).
if TYPE_CHECKING:
    import httpx

DEFAULT_STATE_DIR = Path(os.environ.get("DEPLOY_CENTER_STATE", "~/.deploy-center")).expanduser()


# A rollout in one of these statuses changes no more (docs/rollouts.md, "Statuses").
ROLLOUT_FINAL = frozenset({"succeeded", "failed", "aborted", "rolled_back"})


class ApiError(Exception):
    """The API answered with an error; ``str()`` is its message."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("error") if isinstance(body, dict) else str(body)
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, list):
            message = f"{message}: " + "; ".join(
                f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}".strip(": ")
                for d in detail
            )
        super().__init__(f"HTTP {status}: {message}" if status else message)


class ServerUnreachable(ApiError):
    """No answer from the server (``status`` 0): it is not running, the address is wrong, or
    the network failed; ``str()`` says which, and what to check."""

    def __init__(self, url: str, cause: httpx.TransportError) -> None:
        import httpx

        tls = _tls_trouble(url, cause)
        if tls is not None:  # something answered, but no safe connection could be made
            super().__init__(0, {"error": f"no secure connection to {url}: {tls}"})
            return
        if isinstance(cause, httpx.TimeoutException):
            why = f"no answer in time ({type(cause).__name__})"
        else:
            why = str(cause) or type(cause).__name__
            if url.startswith("http://") and isinstance(cause, httpx.RemoteProtocolError):
                why += " (a server that serves HTTPS answers only https:// URLs)"
        super().__init__(
            0,
            {
                "error": f"cannot reach the server at {url}: {why}. Check that the server is "
                f"running (deployctl server, or deployctl up) and that {url} is its API "
                f"address (--url, DEPLOY_CENTER_URL, or server.json in the --state-dir used)"
            },
        )


class ConfigError(Exception):
    """The client could not tell where the server is or what token to use."""


def _tls_trouble(url: str, cause: BaseException) -> str | None:
    """What a TLS failure (or plain HTTP meeting TLS) behind ``cause`` means, in words."""
    import ssl

    seen: BaseException | None = cause
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate is not trusted ({seen.verify_message or seen}). A server "
                "with its own certificate is verified with its CA: pass --ca FILE (or set "
                "DEPLOY_CENTER_CA) with the ca.pem of its state directory; deployctl picks it "
                "up by itself when --state-dir is the server's and the URL is the one in its "
                "server.json"
            )
        if isinstance(seen, ssl.SSLError):
            return (
                f"the TLS handshake failed ({seen.reason or seen}); if the server serves plain "
                "HTTP, its URL starts with http://"
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_ca(url: str, ca: Path | None = None, state_dir: Path | None = None) -> Path | None:
    """The CA certificate an ``https://`` API is verified with: ``ca`` (``--ca``), else
    ``DEPLOY_CENTER_CA``, else, when ``url`` is the API the state directory's
    ``server.json`` names, the CA that server wrote there (its own ``ca.pem``, none for a
    certificate the operator supplied).  ``None``: the default trust store."""
    if ca is None and os.environ.get("DEPLOY_CENTER_CA"):
        ca = Path(os.environ["DEPLOY_CENTER_CA"])
    if ca is not None:
        return ca
    info = (state_dir or DEFAULT_STATE_DIR) / "server.json"
    try:
        server = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(server, dict) or str(server.get("api_url", "")).rstrip("/") != url:
        return None
    named = server.get("api_ca")
    return Path(named) if isinstance(named, str) and named else None


def connection_settings(
    url: str, ca: Path | None, *, insecure_http: bool = False
) -> dict[str, Any]:
    """``httpx.Client`` arguments for the API at ``url``, after checking where the token may
    go: ``verify`` (what TLS is verified with) and ``trust_env`` (off for plain HTTP on
    loopback, so that an ``HTTP_PROXY`` of the environment does not carry the token in clear
    over the network).

    :raises ConfigError: not an http(s) URL; ``http://`` to a host that is not loopback
        without ``insecure_http`` (the token would cross the network in clear); a CA file
        that cannot be used.  Nothing is sent before these checks.
    """
    import ssl

    import httpx

    from deploy_core.loopback import is_loopback_host

    try:  # httpx's own parser: the host checked is the host it connects to
        parsed = httpx.URL(url)
        host, scheme = parsed.host, parsed.scheme
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise httpx.InvalidURL(f"port {parsed.port} is out of range")
    except httpx.InvalidURL as exc:
        raise ConfigError(f"{url!r} is not a URL of the API: {exc}") from None
    if scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"{url!r} is not an http:// or https:// URL of the API, e.g. https://deploy.example"
            ".com:8470"
        )
    if scheme == "http":
        if not insecure_http and not is_loopback_host(host):
            raise ConfigError(
                f"refusing to send the API token over plain http:// to {host}, which is not "
                "a loopback address: anyone on the way could read it. Use the https:// URL "
                "(the server serves HTTPS off loopback by default), or, if this network is "
                "trusted, say so with --insecure-http (DEPLOY_CENTER_INSECURE_HTTP=1)"
            )
        # No TLS to verify: a context that verifies and trusts no CA (it could never carry
        # the token to anyone unverified) costs nothing, where loading the default trust
        # store costs ~0.3 s of every command on a slow host.
        return {
            "verify": ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
            "trust_env": insecure_http and not is_loopback_host(host),
        }
    if ca is None:  # httpx's default trust store, e.g. for an ACME certificate
        return {"verify": True, "trust_env": True}
    try:
        return {"verify": ssl.create_default_context(cafile=str(ca)), "trust_env": True}
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--ca {ca}: cannot verify the server with it: "
            f"{getattr(exc, 'strerror', None) or exc} (expected a PEM CA certificate, such as "
            "the server's ca.pem)"
        ) from None


def resolve(
    url: str | None = None, token: str | None = None, state_dir: Path | None = None
) -> tuple[str, str]:
    """Find the API URL and token."""
    url = url or os.environ.get("DEPLOY_CENTER_URL")
    token = token or os.environ.get("DEPLOY_CENTER_TOKEN")
    state = state_dir or DEFAULT_STATE_DIR
    if url is None:
        info = state / "server.json"
        if info.exists():
            url = json.loads(info.read_text())["api_url"]
    if token is None:
        token_file = state / "admin.token"
        if token_file.exists():
            token = token_file.read_text().strip()
    if not url or not token:
        raise ConfigError(
            f"cannot find the server: set DEPLOY_CENTER_URL and DEPLOY_CENTER_TOKEN, pass "
            f"--url/--token, or point --state-dir at the server's state directory "
            f"(looked in {state})"
        )
    return url.rstrip("/"), token


def _segment(value: str) -> str:
    """``value`` as one URL path segment (no ``/`` or ``..`` gets through)."""
    from urllib.parse import quote

    return quote(value, safe="") if value not in (".", "..") else "%2E" * len(value)


class DeployClient:
    """Calls the API; every method returns the decoded JSON or raises :class:`ApiError`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 30.0,
        ca: Path | None = None,
        insecure_http: bool = False,
    ) -> None:
        """:param ca: the CA an ``https://`` API is verified with (pinned: the only one
            trusted); ``None``: the default trust store.  Verification is never off.
        :param insecure_http: allow the token over ``http://`` to a host that is not
            loopback (refused otherwise, with :class:`ConfigError`, before any connection).
        """
        import httpx

        settings = connection_settings(url, ca, insecure_http=insecure_http)
        self.url = url
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            **settings,
        )

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        token: str | None = None,
        state_dir: Path | None = None,
        *,
        ca: Path | None = None,
        insecure_http: bool = False,
    ) -> DeployClient:
        """A client for the server :func:`resolve` finds, verified with the CA
        :func:`resolve_ca` finds; ``DEPLOY_CENTER_INSECURE_HTTP=1`` is ``insecure_http``."""
        url, token = resolve(url, token, state_dir)
        return cls(
            url,
            token,
            ca=resolve_ca(url, ca, state_dir),
            insecure_http=insecure_http or _truthy(os.environ.get("DEPLOY_CENTER_INSECURE_HTTP")),
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> DeployClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, exc) from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    def deploy(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/deploy/{kind}``."""
        result: dict[str, Any] = self.request("POST", f"/api/deploy/{_segment(kind)}", json=body)
        return result

    def rollback(self, deploy_id: str, *, cascade: bool = False) -> dict[str, Any]:
        """``POST /api/deploy/{deploy_id}/rollback``: a new ``deploy.rollback`` deployment;
        with ``cascade``, newer deployments of the same target are rolled back first."""
        result: dict[str, Any] = self.request(
            "POST",
            f"/api/deploy/{_segment(deploy_id)}/rollback",
            json={"cascade": True} if cascade else None,
        )
        return result

    def get(self, deploy_id: str, *, wait: float = 0, since: float | None = None) -> dict[str, Any]:
        """The record; with ``wait``, long-poll for a change (or for the end)."""
        params: dict[str, Any] = {}
        if wait:
            params["wait"] = wait
            if since is not None:
                params["since"] = since
        result: dict[str, Any] = self.request(
            "GET", f"/api/deploy/{_segment(deploy_id)}", params=params, timeout=wait + 30
        )
        return result

    def history(self, deploy_id: str) -> builtins.list[dict[str, Any]]:
        """The status history, oldest first."""
        result: builtins.list[dict[str, Any]] = self.request(
            "GET", f"/api/deploy/{_segment(deploy_id)}/status"
        )["history"]
        return result

    def logs(self, deploy_id: str, *, after: int = 0) -> dict[str, Any]:
        """Log lines after line id ``after``."""
        result: dict[str, Any] = self.request(
            "GET", f"/api/deploy/{_segment(deploy_id)}/logs", params={"after": after}
        )
        return result

    def follow_logs(
        self, deploy_id: str, *, after: int = 0, max_wait: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield log lines as they arrive until the deployment ends (the last item is the
        ``{"end": …}`` marker; ``{"end": false, "next_after": …}`` when the server stopped
        after ``max_wait`` seconds, its default an hour)."""
        import httpx

        params: dict[str, Any] = {"after": after, "follow": 1}
        if max_wait is not None:
            params["max_wait"] = max_wait
        try:
            with self.http.stream(
                "GET", f"/api/deploy/{_segment(deploy_id)}/logs", params=params, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, response.json())
                for raw in response.iter_lines():
                    if raw.strip():
                        item: dict[str, Any] = json.loads(raw)
                        yield item
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.url, exc) from None

    def list(self, client_id: str, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A client's deployments, newest first."""
        result: dict[str, Any] = self.request(
            "GET",
            f"/api/deploy/{_segment(client_id)}/list",
            params={"limit": limit, "offset": offset},
        )
        return result

    def clients_page(
        self,
        *,
        state: str | None = None,
        search: str | None = None,
        labels: Sequence[str] = (),
        limit: int | None = None,
        cursor: str | None = None,
        summary: bool = False,
    ) -> dict[str, Any]:
        """One page of ``GET /api/clients``: ``clients``, ``total``, ``next_cursor`` (and
        ``summary`` when asked), filtered by state, a search text and ``key=value`` labels."""
        params: dict[str, Any] = {"label": list(labels)}
        for name, value in (("state", state), ("q", search), ("limit", limit), ("cursor", cursor)):
            if value is not None:
                params[name] = value
        if summary:
            params["summary"] = "1"
        result: dict[str, Any] = self.request("GET", "/api/clients", params=params)
        return result

    def clients(self, **filters: Any) -> builtins.list[dict[str, Any]]:
        """Every enrolled client (matching ``filters``, as :meth:`clients_page` takes them),
        read a page at a time."""
        found: builtins.list[dict[str, Any]] = []
        cursor = None
        for _ in range(100_000):  # a server that kept answering with a cursor
            page = self.clients_page(**filters, limit=1000, cursor=cursor)
            found += page["clients"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found

    def plugins(self) -> builtins.list[dict[str, Any]]:
        """The server's plugins."""
        result: builtins.list[dict[str, Any]] = self.request("GET", "/api/plugins")["plugins"]
        return result

    def add_webhook(
        self, url: str, events: Sequence[str], secret: str, *, description: str = ""
    ) -> dict[str, Any]:
        """``POST /api/webhooks``: the new webhook (its secret is never shown again)."""
        body = {"url": url, "events": list(events), "secret": secret, "description": description}
        result: dict[str, Any] = self.request("POST", "/api/webhooks", json=body)
        return result

    def webhooks(self) -> builtins.list[dict[str, Any]]:
        """Every webhook, oldest first."""
        result: builtins.list[dict[str, Any]] = self.request("GET", "/api/webhooks")["webhooks"]
        return result

    def remove_webhook(self, webhook_id: str) -> dict[str, Any]:
        """``DELETE /api/webhooks/{id}``: the webhook and its delivery log."""
        result: dict[str, Any] = self.request("DELETE", f"/api/webhooks/{_segment(webhook_id)}")
        return result

    def ping_webhook(self, webhook_id: str) -> dict[str, Any]:
        """``POST /api/webhooks/{id}/ping``: ``{"delivery_id": …}`` of the ping queued."""
        path = f"/api/webhooks/{_segment(webhook_id)}/ping"
        result: dict[str, Any] = self.request("POST", path)
        return result

    def webhook_deliveries(
        self, webhook_id: str, *, status: str | None = None, limit: int = 50
    ) -> builtins.list[dict[str, Any]]:
        """A webhook's deliveries, newest first."""
        params: dict[str, Any] = {"limit": limit} | ({"status": status} if status else {})
        path = f"/api/webhooks/{_segment(webhook_id)}/deliveries"
        result: builtins.list[dict[str, Any]] = self.request("GET", path, params=params)[
            "deliveries"
        ]
        return result

    def upload_artifact(
        self,
        path: str | os.PathLike[str],
        *,
        progress: Callable[[int, int], None] | None = None,
        chunk_size: int = 1 << 20,
    ) -> dict[str, Any]:
        """``POST /api/artifacts``: stream a package to the server's store.

        The file is read twice, a chunk at a time, never whole: once to hash it (the server
        checks the hash it is told), once to send it.

        :param progress: ``progress(bytes_sent, total_bytes)`` after each chunk.
        :returns: ``sha256``, ``size``, ``created_at``, ``existing`` (true when the store
            already had these bytes).
        """
        file = Path(path)
        size = file.stat().st_size
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            while block := handle.read(chunk_size):
                digest.update(block)

        def body() -> Iterator[bytes]:
            sent = 0
            with file.open("rb") as handle:
                while block := handle.read(chunk_size):
                    yield block
                    sent += len(block)
                    if progress is not None:
                        progress(sent, size)

        result: dict[str, Any] = self.request(
            "POST",
            "/api/artifacts",
            content=body(),
            headers={
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
                "X-Content-SHA256": digest.hexdigest(),
            },
        )
        return result

    def artifact(self, sha256: str) -> dict[str, Any]:
        """``GET /api/artifacts/{sha256}``: a stored artifact's metadata."""
        result: dict[str, Any] = self.request("GET", f"/api/artifacts/{_segment(sha256)}")
        return result

    def watch(self, deploy_id: str, *, timeout: float) -> Iterator[dict[str, Any]]:
        """Yield the record each time it changes, until it finishes or ``timeout`` passes."""
        end = time.monotonic() + timeout
        record = self.get(deploy_id)
        yield record
        while not record["finished"]:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"deployment {deploy_id} did not finish within {timeout:g}s")
            newer = self.get(deploy_id, wait=min(20.0, left), since=record["updated_ts"])
            if newer["updated_ts"] != record["updated_ts"]:
                yield newer
            record = newer

    def create_rollout(self, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/rollouts``: one deploy request to many clients (``type``, ``request``,
        ``targets``, ``strategy``; see docs/rollouts.md); ``{"rollout_id": …}``."""
        result: dict[str, Any] = self.request("POST", "/api/rollouts", json=request)
        return result

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /api/rollouts/{id}``: status, counts, batches and per-target deployments."""
        result: dict[str, Any] = self.request("GET", f"/api/rollouts/{_segment(rollout_id)}")
        return result

    def rollouts(
        self,
        *,
        status: str | None = None,
        active: bool = False,
        client_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """``GET /api/rollouts``: a page of rollouts, newest first (``items``, ``total``);
        ``active`` for the unfinished ones only, ``client_id`` for those to that client."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if active:
            params["active"] = 1
        if client_id:
            params["client_id"] = client_id
        result: dict[str, Any] = self.request("GET", "/api/rollouts", params=params)
        return result

    def _rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/api/rollouts/{_segment(rollout_id)}/{action}"
        )
        return result

    def pause_rollout(self, rollout_id: str) -> dict[str, Any]:
        """``POST /api/rollouts/{id}/pause``: start no new target until resumed."""
        return self._rollout_action(rollout_id, "pause")

    def resume_rollout(self, rollout_id: str) -> dict[str, Any]:
        """``POST /api/rollouts/{id}/resume``: go on after a pause."""
        return self._rollout_action(rollout_id, "resume")

    def promote_rollout(self, rollout_id: str) -> dict[str, Any]:
        """``POST /api/rollouts/{id}/promote``: go on past a canary that paused."""
        return self._rollout_action(rollout_id, "promote")

    def abort_rollout(self, rollout_id: str) -> dict[str, Any]:
        """``POST /api/rollouts/{id}/abort``: start no new target; the rollout ends aborted."""
        return self._rollout_action(rollout_id, "abort")

    def watch_rollout(
        self,
        rollout_id: str,
        *,
        timeout: float,
        interval: float = 1.0,
        max_interval: float = 5.0,
        on_unreachable: Callable[[ApiError], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the rollout each time it changes, until it finishes or ``timeout`` passes
        (then :class:`TimeoutError`).  It is read every ``interval`` seconds while it
        changes, less often (doubling, up to ``max_interval``) while it does not: a rollout
        paused for approval is a large record that may stay the same for hours.

        :param on_unreachable: when given, a server that stops answering after the first
            read (restarting, say: the rollout goes on when it is back) is told to it and
            asked again every ``interval`` until ``timeout``, instead of raising.
        """
        end = time.monotonic() + timeout
        record = self.rollout(rollout_id)
        yield record
        pause = interval
        while record["status"] not in ROLLOUT_FINAL:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"rollout {rollout_id} did not finish within {timeout:g}s")
            time.sleep(min(pause, left))
            try:
                newer = self.rollout(rollout_id)
            except ApiError as exc:
                if on_unreachable is None or exc.status not in (0, 502, 503, 504):
                    raise
                on_unreachable(exc)
                continue
            if newer != record:
                pause = interval
                yield newer
            else:
                pause = min(pause * 2, max(interval, max_interval))
            record = newer

    def wait(self, deploy_id: str, *, timeout: float = 600) -> dict[str, Any]:
        """Block until the deployment finishes; the final record.  Long-polls for the end
        (``?wait`` without ``since``): one request answered when it finishes, not one per
        change of status as :meth:`watch` makes.
        :raises TimeoutError: not finished within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        record = self.get(deploy_id, wait=max(0.001, min(20.0, timeout)))
        while not record["finished"]:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"deployment {deploy_id} did not finish within {timeout:g}s")
            record = self.get(deploy_id, wait=min(20.0, left))
        return record

"""Packages fetched by the agent straight from an HTTP(S) URL (a CDN, an S3 presigned URL,
an nginx next to the hosts) instead of the server's store.

Only the standard library (``http.client``, ``ssl``), imported when a URL is fetched: an
agent stays light. The rules, on the server (at ``POST /api/deploy/tar``) and again on the
agent (for every redirect too):

* ``https://`` anywhere; ``http://`` only to a loopback host (``localhost``, ``127.0.0.0/8``,
  ``::1``) or to a host the configuration lists in ``allow_http_hosts``; no other scheme;
  no user name or password in the URL; at most :data:`MAX_REDIRECTS` redirects.
* TLS is verified against the system's CAs, plus ``ca_file`` when configured.
* At most ``size`` bytes when the request gives one, else ``max_bytes`` of the agent's
  configuration (2 GiB by default): reading stops there whatever ``Content-Length`` says.
* A dropped connection, a timeout or a 5xx resumes with ``Range: bytes=N-`` (and
  ``If-Range`` with the ETag or Last-Modified the server gave); a server answering ``200``
  instead of ``206`` is read from the start again. Attempts without a new byte are bounded,
  with back-off; every read has a timeout.
* The SHA-256 is checked before anything is extracted: a mismatch discards the bytes and
  fetches once more from zero; a second mismatch fails (as with the server's store).
* The query string (where a presigned URL carries its credentials) is never logged, stored
  or put into an error: :func:`redact` replaces it with ``?…``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import random
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

if TYPE_CHECKING:
    import http.client
    import ssl

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_REDIRECTS",
    "Abort",
    "Downloaded",
    "UrlFetchError",
    "UrlPolicy",
    "UrlRefused",
    "check_url",
    "download",
    "policy_from_config",
    "redact",
]

DEFAULT_MAX_BYTES = 2 * 1024**3  # as the server's store (deployctl server --max-artifact-size)
MAX_REDIRECTS = 5
CHUNK = 256 * 1024
READ_TIMEOUT = 30.0  # seconds any one connect or read may take
MAX_FRUITLESS = 5  # attempts in a row that bring no new byte before giving up
MAX_ATTEMPTS = 100  # attempts in all (a server dropping every few bytes ends too)
BACKOFF = 0.5  # first pause between attempts, doubled each time, at most MAX_PAUSE
MAX_PAUSE = 8.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class UrlRefused(ValueError):
    """The URL breaks a rule (scheme, host, user info …); the text names it (redacted)."""


class UrlFetchError(Exception):
    """The package could not be fetched from its URL; the text says why (redacted).

    :param retry: whether another attempt may help (a dropped connection, a 5xx).
    :param keep: whether the bytes received so far are worth keeping for a later deployment
        of the same package to resume (the network failed, or the deployment gave up).
    """

    def __init__(self, message: str, *, retry: bool = False, keep: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        self.keep = keep


def redact(url: str) -> str:
    """``url`` without its query string, fragment and user info, fit for logs and records:
    ``https://b.s3.amazonaws.com/app.tgz?X-Amz-Signature=…`` → ``https://b.s3…/app.tgz?…``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<an unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class UrlPolicy:
    """Where and how much a URL source may fetch.

    :param allow_http_hosts: hosts (``name`` or ``name:port``, lower case) that may be
        reached over plain ``http://`` besides loopback.
    :param ca_file: PEM file of extra CAs trusted for ``https://`` (a private CDN's).
    :param max_bytes: the largest package fetched when the request gives no ``size``.
    """

    allow_http_hosts: frozenset[str] = frozenset()
    ca_file: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    read_timeout: float = READ_TIMEOUT
    backoff: float = BACKOFF

    def http_allowed(self, host: str, port: int | None) -> bool:
        host = host.lower().rstrip(".")
        named = {host, f"{host}:{port or 80}"}
        return _is_loopback(host) or bool(named & self.allow_http_hosts)


def _hosts(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ValueError(f"{where}: allow_http_hosts must be a list of host names")
    return frozenset(h.strip().lower().rstrip(".") for h in value)


def policy_from_config(config: Mapping[str, Any], where: str) -> UrlPolicy:
    """The :class:`UrlPolicy` of a ``[plugins.deploy_tar]`` table (server or agent config);
    unknown keys and wrong types raise ``ValueError`` naming ``where``."""
    known = {"allow_http_hosts", "ca_file", "max_bytes", "read_timeout"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(
            f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; deploy_tar reads "
            f"{', '.join(sorted(known))}"
        )
    ca_file = config.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not os.path.isabs(ca_file)):
        raise ValueError(f"{where}: ca_file must be an absolute path")
    max_bytes = config.get("max_bytes", DEFAULT_MAX_BYTES)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"{where}: max_bytes must be a positive number of bytes")
    timeout = config.get("read_timeout", READ_TIMEOUT)
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"{where}: read_timeout must be a positive number of seconds")
    return UrlPolicy(
        allow_http_hosts=_hosts(config.get("allow_http_hosts", []), where),
        ca_file=ca_file,
        max_bytes=max_bytes,
        read_timeout=float(timeout),
    )


def check_url(url: str, policy: UrlPolicy | None = None) -> SplitResult:
    """``url`` split, when it is one a package may come from; else :class:`UrlRefused`.

    Without ``policy`` only the shape is checked (scheme, host, no user info, no control
    characters); with one, ``http://`` must also go to a host it allows."""
    if any(ord(c) < 0x21 or c == "\x7f" for c in url):
        raise UrlRefused("the URL holds spaces or control characters; percent-encode them")
    if not url.isascii():
        raise UrlRefused(
            "the URL holds non-ASCII characters; percent-encode them (and write an "
            "international host name in punycode, xn--…)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"{redact(url)} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise UrlRefused(
            f"URL scheme {scheme + ':' if scheme else '(none)'} is not allowed: only https://, "
            "or http:// to loopback or a host in allow_http_hosts"
        )
    if "@" in parts.netloc:
        raise UrlRefused(
            f"{redact(url)}: user name or password in the URL is not allowed (it would be "
            "stored with the deployment); use a presigned URL instead"
        )
    if not parts.hostname:
        raise UrlRefused(f"{redact(url)} names no host")
    if policy is not None and scheme == "http" and not policy.http_allowed(parts.hostname, port):
        raise UrlRefused(
            f"{redact(url)}: plain http:// is only allowed to loopback or to a host listed "
            "in allow_http_hosts; use https://"
        )
    return parts


@dataclass
class Downloaded:
    """A verified package fetched from a URL, and what fetching it took."""

    path: Path
    sha256: str
    size: int
    bytes_transferred: int
    bytes_resumed: int
    interruptions: int = 0
    restarts: int = 0
    from_cache: bool = False


@dataclass
class _Partial:
    """``<sha256>.partial`` and its hash so far; the validator (ETag or Last-Modified) of
    the response its bytes came from is kept beside it, for ``If-Range``."""

    path: Path
    meta: Path
    size: int = 0
    validator: str | None = None
    hasher: Any = field(default_factory=hashlib.sha256)

    @classmethod
    def open(cls, directory: Path, sha256: str) -> _Partial:
        partial = cls(directory / f"{sha256}.partial", directory / f"{sha256}.partial.json")
        try:
            validator = json.loads(partial.meta.read_text()).get("validator")
        except (OSError, ValueError, AttributeError):
            validator = None
        try:  # never through a link: whatever is not our regular file is replaced
            fd = os.open(partial.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = -1
        if fd >= 0 and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            fd = -1
        if isinstance(validator, str) and fd >= 0:
            # What an interrupted fetch left: resumable with If-Range against its validator.
            with os.fdopen(fd, "rb") as file:
                while block := file.read(1 << 20):
                    partial.hasher.update(block)
                    partial.size += len(block)
            partial.validator = validator
        else:
            if fd >= 0:
                os.close(fd)
            partial.restart()
        return partial

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)  # a link planted there goes, not followed
        os.close(_open_private(self.path, os.O_WRONLY | os.O_TRUNC))
        self.meta.unlink(missing_ok=True)
        self.size, self.validator, self.hasher = 0, None, hashlib.sha256()

    def append(self) -> io.BufferedWriter:
        """The partial file, open for appending (never through a link)."""
        return os.fdopen(_open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab")

    def remember(self, validator: str | None) -> None:
        self.validator = validator
        if validator is None:
            self.meta.unlink(missing_ok=True)
            return
        self.meta.unlink(missing_ok=True)
        fd = _open_private(self.meta, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps({"validator": validator}))

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)


def _open_private(path: Path, flags: int) -> int:
    """``path`` opened with ``flags``, created 0600 if missing, never through a symlink."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _validator(response: http.client.HTTPResponse) -> str | None:
    """What ``If-Range`` may name: a strong ETag, else Last-Modified."""
    etag = response.getheader("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.getheader("Last-Modified")


def _ssl_context(policy: UrlPolicy) -> ssl.SSLContext:
    import ssl

    context = ssl.create_default_context()  # the system's CAs, host names checked
    if policy.ca_file is not None:
        try:
            context.load_verify_locations(cafile=policy.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UrlFetchError(f"cannot load ca_file {policy.ca_file}: {exc}") from None
    return context


Progress = Callable[[int, int], None]


class Abort:
    """Stops a download from another thread at once: :meth:`abort` sets a flag the download
    looks at between reads and shuts down the connection in use, so a read blocked on it
    returns now rather than at its timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        self._sock: socket.socket | None = None

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = self._sock
        _shutdown(sock)

    def attach(self, sock: socket.socket | None) -> None:
        """The connection the download reads from now (``None``: none)."""
        with self._lock:
            self._sock = sock
            aborted = self._aborted
        if aborted:
            _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            # The plain socket's shutdown, also under TLS: it only wakes the reader up (an
            # SSLSocket's own would drop its TLS state under the reading thread's feet).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Fetch:
    """One download: attempts, redirects, resume, limits."""

    def __init__(
        self,
        url: str,
        partial: _Partial,
        policy: UrlPolicy,
        limit: int,
        expected: int | None,
        progress: Progress,
        cancelled: Callable[[], bool],
        log: Callable[[str], None],
        abort: Abort,
    ) -> None:
        self.url = url
        self.abort = abort
        self.partial = partial
        self.policy = policy
        self.limit = limit
        self.expected = expected
        self.progress = progress
        self.cancelled = cancelled
        self.log = log
        self.received = 0
        self.interruptions = 0
        self.restarts = 0
        self.total: int | None = expected
        self._context: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ attempts

    def run(self) -> None:
        """Fill the partial file with the whole body, retrying what may be retried."""
        fruitless = 0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self._check_cancelled()
            before = self.received
            try:
                if self._attempt():
                    return
                raise UrlFetchError("the response ended early", retry=True)
            except UrlFetchError as exc:
                if not exc.retry:
                    raise
                error = str(exc)
            except (OSError, _http_errors()) as exc:
                import ssl

                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise UrlFetchError(
                        f"TLS verification of {redact(self.url)} failed: {exc.verify_message}"
                        " (give the CA of a private CDN as ca_file in [plugins.deploy_tar])"
                    ) from None
                error = _describe(exc)
            self.interruptions += 1
            fruitless = 0 if self.received > before else fruitless + 1
            self.log(
                f"package download interrupted at byte {self.partial.size} "
                f"(attempt {attempt}): {error}"
            )
            if fruitless >= MAX_FRUITLESS:
                raise UrlFetchError(
                    f"{redact(self.url)}: {fruitless} attempts in a row brought no data; "
                    f"last: {error}",
                    keep=True,
                )
            self._pause(min(self.policy.backoff * 2 ** max(fruitless - 1, 0), MAX_PAUSE))
        raise UrlFetchError(
            f"{redact(self.url)}: still incomplete after {MAX_ATTEMPTS} attempts", keep=True
        )

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds * random.uniform(0.8, 1.2)  # jitter
        while (left := end - time.monotonic()) > 0:
            self._check_cancelled()
            time.sleep(min(left, 0.1))

    def _check_cancelled(self) -> None:
        if self.abort.aborted or self.cancelled():
            raise UrlFetchError("the deployment gave up on the download", keep=True)

    def _attempt(self) -> bool:
        """One request (following redirects) and its body; ``True`` when the package is
        complete, ``False`` when the body ended before its announced end."""
        offset = self.partial.size
        headers = {"Accept-Encoding": "identity", "User-Agent": "deploy-center-agent"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.partial.validator is not None:
                headers["If-Range"] = self.partial.validator
        conn, response = self._open(headers)
        try:
            return self._body(response, offset)
        finally:
            self.abort.attach(None)
            conn.close()

    def _open(
        self, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        import http.client

        url = self.url
        for _hop in range(MAX_REDIRECTS + 1):
            parts = check_url(url, self.policy)
            port = parts.port
            conn: http.client.HTTPConnection
            if parts.scheme.lower() == "https":
                if self._context is None:
                    self._context = _ssl_context(self.policy)
                conn = http.client.HTTPSConnection(
                    parts.hostname or "", port, timeout=self.policy.read_timeout,
                    context=self._context,
                )  # fmt: skip
            else:
                conn = http.client.HTTPConnection(
                    parts.hostname or "", port, timeout=self.policy.read_timeout
                )
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.connect()
                self.abort.attach(conn.sock)
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except BaseException:
                self.abort.attach(None)
                conn.close()
                raise
            if response.status not in _REDIRECTS:
                return conn, response
            location = response.getheader("Location")
            conn.close()
            if not location:
                raise UrlFetchError(f"{redact(url)}: redirect {response.status} without Location")
            following = urljoin(url, location)
            try:
                check_url(following, self.policy)
            except UrlRefused as exc:
                raise UrlFetchError(f"redirect from {redact(url)} refused: {exc}") from None
            url = following
        raise UrlFetchError(f"{redact(self.url)}: more than {MAX_REDIRECTS} redirects")

    # ------------------------------------------------------------------ the body

    def _body(self, response: http.client.HTTPResponse, offset: int) -> bool:
        status = response.status
        where = redact(self.url)
        if status == 206:
            start, total = _content_range(response.getheader("Content-Range"))
            if start != offset:
                self._restart(
                    f"asked for bytes from {offset}, the server sent a range from {start}"
                )
                raise UrlFetchError("the server sent another range; starting over", retry=True)
            self._set_total(total, where)
            if not offset:
                self.partial.remember(_validator(response))
        elif status == 200:
            if offset:
                self._restart("the server ignored the Range request (200, not 206)")
            self._set_total(_length(response), where)
            self.partial.remember(_validator(response))
        elif status == 416 and offset:
            self._restart("the server refused the range (416)")
            raise UrlFetchError("range not satisfiable; starting over", retry=True)
        else:
            reason = f"HTTP {status} {response.reason}".strip()
            raise UrlFetchError(f"{where} answered {reason}", retry=status in _RETRY_STATUS)
        self.progress(self.partial.size, self.total or 0)
        with self.partial.append() as out:
            while True:
                self._check_cancelled()
                want = min(CHUNK, self.limit - self.partial.size + 1)
                data = response.read(want)  # the socket's timeout bounds the wait
                if not data:
                    break
                if self.partial.size + len(data) > self.limit:
                    raise UrlFetchError(self._too_large())
                out.write(data)
                out.flush()
                self.partial.hasher.update(data)
                self.partial.size += len(data)
                self.received += len(data)
                self.progress(self.partial.size, self.total or 0)
            os.fsync(out.fileno())
        return self.total is None or self.partial.size >= self.total

    def _restart(self, why: str) -> None:
        self.log(f"package download restarts from byte 0: {why}")
        self.restarts += 1
        self.partial.restart()

    def _set_total(self, total: int | None, where: str) -> None:
        if total is None:
            return
        if total > self.limit:
            raise UrlFetchError(
                f"{where} announces {total} bytes; "
                + (
                    f"the request said size {self.expected}"
                    if self.expected is not None
                    else f"the agent's limit is {self.limit} bytes (max_bytes)"
                )
            )
        if self.expected is not None and total != self.expected:
            raise UrlFetchError(
                f"{where} announces {total} bytes; the request said size {self.expected}"
            )
        self.total = total

    def _too_large(self) -> str:
        if self.expected is not None:
            return f"{redact(self.url)} sent more than the {self.expected} bytes the request said"
        return (
            f"{redact(self.url)} sent more than {self.limit} bytes, the agent's limit "
            "(max_bytes of [plugins.deploy_tar]); give the package's size in the request"
        )


def _http_errors() -> type[Exception]:
    import http.client

    return http.client.HTTPException


def _describe(exc: BaseException) -> str:
    import http.client

    if isinstance(exc, TimeoutError):
        return "no data within the read timeout"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed in the middle of the body"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _length(response: http.client.HTTPResponse) -> int | None:
    value = response.getheader("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` → ``(100, 200)``; unparsable parts are ``None``."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.partition("-")[0]
    return (
        int(start) if start.strip().isdigit() else None,
        int(total) if total.strip().isdigit() else None,
    )


def download(
    url: str,
    sha256: str,
    directory: Path,
    policy: UrlPolicy,
    *,
    size: int | None = None,
    progress: Progress = lambda done, total: None,
    cancelled: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda line: None,
    abort: Abort | None = None,
) -> Downloaded:
    """Fetch ``url`` into ``directory/<sha256>`` and verify it (blocking; run it in a
    thread). A ``<sha256>.partial`` an interrupted fetch left there is resumed.

    :param size: the package's size as the request gives it: the limit, and what the server
        must announce; ``None``: the policy's ``max_bytes`` is the limit.
    :param cancelled: looked at between reads and pauses; once true the fetch stops.
    :param abort: stops the fetch from another thread at once, a blocked read too.
    :raises UrlRefused: the URL (or a redirect) breaks a rule.
    :raises UrlFetchError: it could not be fetched or failed verification twice.
    """
    check_url(url, policy)
    limit = size if size is not None else policy.max_bytes
    if limit > policy.max_bytes:
        raise UrlFetchError(
            f"the package's size {size} is over the agent's limit of {policy.max_bytes} bytes "
            "(max_bytes of [plugins.deploy_tar] in the agent's config)"
        )
    final = directory / sha256
    partial = _Partial.open(directory, sha256)
    resumed = partial.size
    if resumed:
        log(f"resuming the package download at byte {resumed}")
    fetch = _Fetch(url, partial, policy, limit, size, progress, cancelled, log, abort or Abort())
    for attempt in (1, 2):
        try:
            fetch.run()
        except UrlFetchError as exc:
            if not exc.keep:
                partial.discard()
            raise
        except UrlRefused:
            partial.discard()
            raise
        digest = partial.hasher.hexdigest()
        if digest == sha256:
            os.replace(partial.path, final)
            partial.meta.unlink(missing_ok=True)
            return Downloaded(
                final,
                sha256,
                partial.size,
                fetch.received,
                resumed,
                fetch.interruptions,
                fetch.restarts,
            )
        partial.restart()
        if attempt == 1:
            log(f"the bytes received hash to {digest}, not {sha256}: fetching again from 0")
            fetch.total = size
            continue
        partial.discard()
        raise UrlFetchError(
            f"the package from {redact(url)} failed SHA-256 verification twice (its bytes "
            f"hash to {digest}, the request says {sha256}); check the sha256, or whether "
            "the file at the URL changed"
        )
    raise AssertionError("unreachable")

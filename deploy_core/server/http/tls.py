"""The HTTP API over TLS (issue 16 §5): when to serve it, and with which certificate.

* ``--api-tls`` is on by default when ``--api-host`` is not a loopback address, off on
  loopback (nothing crosses a network there, and ``http://127.0.0.1:8470`` keeps working for
  the quick start, curl and tools).  Plain HTTP on a network address is refused unless the
  operator says so (``--api-insecure-http``), and then logged as a warning.
* The certificate is the server's own (``server.pem``, signed by its CA, the one agents pin;
  it is issued to cover the API host too), or one the operator supplies (``--api-cert`` and
  ``--api-key``, e.g. from ACME), checked before the server starts: readable, PEM, the key
  belongs to the certificate, not expired and not yet to come.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from deploy_core.loopback import is_loopback_host, is_wildcard_host
from deploy_core.transport import ServerCerts

log = logging.getLogger(__name__)

__all__ = [
    "ApiTls",
    "ApiTlsChoice",
    "ApiTlsError",
    "CertificateReloader",
    "check_certificate_pair",
]


class ApiTlsError(ValueError):
    """The API's TLS options contradict each other, or a supplied certificate is unusable."""


@dataclass(frozen=True)
class ApiTls:
    """The files the API serves TLS with, and the CA a client verifies them with (the
    server's own ``ca.pem``; ``None`` for a supplied certificate, which clients verify with
    their trust store or ``--ca``)."""

    cert: Path
    key: Path
    ca: Path | None


@dataclass(frozen=True)
class ApiTlsChoice:
    """Whether the API serves TLS, and with a supplied certificate or the server's own."""

    enabled: bool
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def choose(
        cls,
        host: str,
        *,
        tls: bool | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        insecure_http: bool = False,
    ) -> ApiTlsChoice:
        """Check the options and decide; a supplied certificate and key are checked too.

        :param tls: ``--api-tls`` (True), ``--no-api-tls`` (False) or neither (None: on
            unless ``host`` is a loopback address).
        :raises ApiTlsError: contradicting options, plain HTTP on a network address without
            ``insecure_http``, or an unusable certificate or key.
        """
        if (cert is None) != (key is None):
            raise ApiTlsError(
                "--api-cert and --api-key go together: give the certificate (full chain) and "
                "its private key, or neither to use the server's own certificate"
            )
        if insecure_http and (tls or cert is not None):
            raise ApiTlsError(
                "--api-insecure-http serves plain HTTP: it contradicts "
                + ("--api-cert/--api-key" if cert is not None else "--api-tls")
            )
        if tls is False and cert is not None:
            raise ApiTlsError("--no-api-tls contradicts --api-cert/--api-key: drop one")
        loopback = is_loopback_host(host)
        enabled = tls if tls is not None else cert is not None or not (loopback or insecure_http)
        if not enabled and not loopback and not insecure_http:
            raise ApiTlsError(
                f"refusing to serve the API over plain HTTP on {host or 'every address'}, which "
                "is not a loopback address: API tokens would cross the network in clear. Drop "
                "--no-api-tls to serve HTTPS (with the server's certificate, or --api-cert and "
                "--api-key), or add --api-insecure-http if something else protects the "
                "connection (e.g. a TLS proxy on a private network)"
            )
        if cert is not None and key is not None:
            check_certificate_pair(cert, key)
        return cls(enabled, cert, key)

    def hostnames(self, names: Sequence[str], host: str) -> tuple[str, ...]:
        """The names the server's own certificate must cover: ``names`` (``--cert-name``
        and the defaults), plus the API host when the API serves that certificate and
        listens on one name or address."""
        names = tuple(names)
        if not self.enabled or self.cert is not None or is_wildcard_host(host):
            return names
        host = host.strip("[]")
        return names if host in names else (*names, host)

    def files(self, certs: ServerCerts) -> ApiTls | None:
        """The certificate and key to serve; ``None`` for plain HTTP."""
        if not self.enabled:
            return None
        if self.cert is not None and self.key is not None:
            return ApiTls(self.cert, self.key, None)
        return ApiTls(certs.cert, certs.key, certs.ca_cert)

    def log_start(self, host: str, names: Sequence[str], defaults: Sequence[str]) -> None:
        """Warn about what an operator should know at start: plain HTTP on a network
        address, a supplied certificate that does not name the API host, or the server's
        own certificate on every address with no name of its own."""
        if self.key is not None and self.key.stat().st_mode & 0o077:
            log.warning(
                "--api-key %s can be read by other users of this host (mode %o): make it 0600",
                self.key,
                self.key.stat().st_mode & 0o777,
            )
        if self.cert is not None and not (is_wildcard_host(host) or is_loopback_host(host)):
            leaf = x509.load_pem_x509_certificates(self.cert.read_bytes())[0]
            if not covers(leaf, host):
                log.warning(
                    "--api-cert %s does not name --api-host %s: clients that connect to %s "
                    "refuse it",
                    self.cert,
                    host,
                    host,
                )
        if not self.enabled and not is_loopback_host(host):
            log.warning(
                "the API serves plain HTTP on %s (--api-insecure-http): tokens and everything "
                "else cross the network in clear; serve it over TLS (--api-tls) unless a TLS "
                "proxy or a private network protects it",
                host or "every address",
            )
        elif (
            self.enabled
            and self.cert is None
            and is_wildcard_host(host)
            and not set(names) - set(defaults)
        ):
            log.warning(
                "the API listens on %s with the server's certificate, which names only %s: "
                "clients that connect by another name or address refuse it; give each one "
                "with --cert-name",
                host or "every address",
                ", ".join(names),
            )


class CertificateReloader:
    """Serves a supplied certificate (``--api-cert``/``--api-key``) anew once its files
    change, e.g. after an ACME client renewed it, without a restart.

    Each new handshake picks the current context (:meth:`install` sets the serving context's
    SNI callback, which OpenSSL calls for every ClientHello, with or without a name). A
    changed pair is checked as at start and built into a new context before it replaces the
    old one; a pair caught mid-renewal, or broken, is logged and the old one kept."""

    def __init__(self, tls: ApiTls) -> None:
        self.tls = tls
        self.current = self._context()
        self._stamp = self._files_stamp()

    def _context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        return context

    def _files_stamp(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self.tls.cert, self.tls.key):
            try:
                st = path.stat()
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamps)

    def install(self, serving: ssl.SSLContext) -> None:
        """Make ``serving`` (the listening socket's context) hand each handshake over to
        the current certificate."""

        def pick(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
            sslobj.context = self.current

        serving.sni_callback = pick  # type: ignore[assignment]

    def check(self) -> bool:
        """Load the files again if they changed and are usable; whether it did."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        try:
            check_certificate_pair(self.tls.cert, self.tls.key)
            context = self._context()
        except (ApiTlsError, OSError, ssl.SSLError) as exc:
            log.warning("the API keeps serving its previous certificate: %s", exc)
            return False
        finally:
            self._stamp = stamp
        self.current = context
        leaf = x509.load_pem_x509_certificates(self.tls.cert.read_bytes())[0]
        log.info(
            "the API serves the renewed certificate %s (valid until %s UTC)",
            self.tls.cert,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M}",
        )
        return True

    async def run(self, interval: float) -> None:
        """:meth:`check` every ``interval`` seconds, in a worker thread."""
        import asyncio

        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.check)
            except Exception:
                log.exception("could not check %s for a renewal", self.tls.cert)


def check_certificate_pair(
    cert: Path, key: Path, *, now: datetime.datetime | None = None
) -> x509.Certificate:
    """Check a supplied certificate (chain) and key for the API; the leaf certificate.

    :raises ApiTlsError: a file cannot be read, is not PEM, the key is encrypted or does
        not belong to the certificate, or the certificate is expired or not valid yet.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    cert_pem = _read(cert, "--api-cert")
    key_pem = _read(key, "--api-key")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        raise ApiTlsError(
            f"--api-cert {cert}: not a PEM certificate (a file starting with -----BEGIN "
            "CERTIFICATE-----, e.g. an ACME client's fullchain.pem)"
        ) from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ApiTlsError(
            f"--api-key {key}: the key is encrypted with a password; give it unencrypted "
            "(readable by the server's user only, mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ApiTlsError(
            f"--api-key {key}: not a PEM private key (a file starting with -----BEGIN "
            f"PRIVATE KEY----- or similar): {exc}"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        raise ApiTlsError(
            f"--api-key {key} does not belong to the certificate in --api-cert {cert} (their "
            "public keys differ): give the key the certificate was issued for"
        )
    if leaf.not_valid_after_utc <= now:
        raise ApiTlsError(
            f"--api-cert {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "renew it (e.g. with the ACME client) and start again"
        )
    if leaf.not_valid_before_utc > now:
        raise ApiTlsError(
            f"--api-cert {cert} is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC on: check this host's clock, or wait"
        )
    try:  # what the TLS library itself says (a chain it cannot use, a key type it lacks)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ApiTlsError(
            f"--api-cert {cert} with --api-key {key}: unusable for TLS: {exc}"
        ) from None
    return leaf


def covers(cert: x509.Certificate, host: str) -> bool:
    """Whether ``cert``'s subject alternative names include ``host`` (a ``*.`` name covers
    one label)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    host = host.strip("[]").rstrip(".").lower()
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    for name in san.get_values_for_type(x509.DNSName):
        name = name.rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in host:
            return True
    return False


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ApiTlsError(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None

"""The server's own certificate authority and TLS certificate.

On first start the server makes an EC P-256 CA and a server certificate signed by it;
agents pin that CA (``ca.pem``) and never trust public roots. Later starts reuse the
files. The server certificate (not the CA) is re-issued from the CA key when it nears
expiry or no longer covers the requested host names, which agents accept unchanged.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ServerCerts", "ensure_server_certs", "write_private_file"]

_CA_LIFETIME = datetime.timedelta(days=20 * 365)
_SERVER_LIFETIME = datetime.timedelta(days=2 * 365)
_RENEW_BEFORE = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerCerts:
    """Paths of the CA and server certificate files in the server's state directory."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def write_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` from the start.

    A crash leaves either the old file or the new one, never a half-written secret.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the mode given to open()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_server_certs(
    state_dir: Path, *, hostnames: Sequence[str] = _DEFAULT_HOSTNAMES
) -> ServerCerts:
    """Return the server's certificate files, creating whatever is missing.

    :param state_dir: directory for ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``;
        created (mode 0700) if needed.
    :param hostnames: names agents connect to; IP address strings become IP SANs.
    :raises ValueError: when ``hostnames`` is empty or only one of ``ca.pem``/``ca.key``
        exists and the server certificate has to be issued.
    """
    if not hostnames:
        raise ValueError("hostnames must name at least one host agents connect to")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certs = ServerCerts(
        ca_cert=state_dir / "ca.pem",
        ca_key=state_dir / "ca.key",
        cert=state_dir / "server.pem",
        key=state_dir / "server.key",
    )
    if not certs.ca_cert.exists() and not certs.ca_key.exists():
        _create_ca(certs)
    if not _server_cert_usable(certs, hostnames):
        _issue_server_cert(certs, hostnames)
    return certs


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _create_ca(certs: ServerCerts) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Deploy Center"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Deploy Center CA {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_file(certs.ca_key, _key_pem(key))
    write_private_file(certs.ca_cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _server_cert_usable(certs: ServerCerts, hostnames: Sequence[str]) -> bool:
    """True when server.pem and server.key exist, come from ca.pem, cover ``hostnames``
    and are not close to expiry."""
    if not (certs.cert.exists() and certs.key.exists() and certs.ca_cert.exists()):
        return False
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    if cert.issuer != ca.subject:
        return False
    if cert.not_valid_after_utc - _RENEW_BEFORE < _now():
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(entry in san for entry in _san_entries(hostnames))


def _issue_server_cert(certs: ServerCerts, hostnames: Sequence[str]) -> None:
    if not (certs.ca_cert.exists() and certs.ca_key.exists()):
        missing = certs.ca_key if certs.ca_cert.exists() else certs.ca_cert
        raise ValueError(
            f"cannot issue a server certificate: {missing} is missing; restore it, or remove "
            f"both ca.pem and ca.key from {certs.ca_cert.parent} to create a new CA (agents "
            "must then be given the new ca.pem)"
        )
    ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{certs.ca_key} is not an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + _SERVER_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private_file(certs.key, _key_pem(key))
    write_private_file(certs.cert, cert.public_bytes(serialization.Encoding.PEM))

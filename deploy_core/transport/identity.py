"""An agent's own Ed25519 key: what it signs in the handshake and how the server checks it.

The agent makes its key pair itself and the server stores only the public half, so a copy
of the server's database lets no one pose as an agent. In the handshake the agent signs
:func:`auth_transcript`: the server's fresh nonce of this connection, the agent's client
id and the SHA-256 of the server certificate the agent saw in TLS. A signature therefore
proves the key for this one challenge to this one server and is worth nothing on another
connection.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "auth_transcript",
    "certificate_digest",
    "new_private_key",
    "public_bytes",
    "verify_signature",
]

#: Raw Ed25519 public keys and signatures, as sent hex-encoded in AUTH.
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# Domain separation: these bytes are never signed for any other purpose.
_CONTEXT = b"deploy-center agent auth v1\x00"


def certificate_digest(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's DER encoding: the server identity a signature is bound to."""
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()


def auth_transcript(client_id: str, nonce: bytes, server_certificate: bytes) -> bytes:
    """The bytes an agent signs to answer the challenge ``nonce``.

    :param client_id: the id the agent said HELLO with.
    :param nonce: the 32 random bytes of the server's CHALLENGE on this connection.
    :param server_certificate: :func:`certificate_digest` of the server's certificate.
    """
    cid = client_id.encode()
    return _CONTEXT + len(cid).to_bytes(2, "big") + cid + nonce + server_certificate


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public half of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of ``message``; a
    malformed key or signature is simply not valid."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def new_private_key() -> Ed25519PrivateKey:
    """A fresh key pair."""
    return Ed25519PrivateKey.generate()

"""QUIC transport between the server and its agents.

The wire format (:mod:`.envelope`), the server's CA and certificate (:mod:`.certs`), the
server endpoint with in-connection agent authentication (:mod:`.server`) and the agent's
reconnecting connector (:mod:`.client`).
"""

from .certs import ServerCerts, ensure_server_certs
from .client import AgentConnector, CredentialStore, FileCredentials, HandshakeRefused
from .envelope import (
    ALPN_PROTOCOL,
    CLIENT_ID_PATTERN,
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    FrameDecoder,
    Kind,
    ProtocolError,
    ack_for,
    encode,
    error_for,
)
from .server import AUTH_FAILED, AgentAuthority, AgentSession, AuthError, QuicServer, RevokedAgent

__all__ = [
    "ALPN_PROTOCOL",
    "AUTH_FAILED",
    "CLIENT_ID_PATTERN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "AgentAuthority",
    "AgentConnector",
    "AgentSession",
    "AuthError",
    "CredentialStore",
    "Envelope",
    "FileCredentials",
    "FrameDecoder",
    "HandshakeRefused",
    "Kind",
    "ProtocolError",
    "QuicServer",
    "RevokedAgent",
    "ServerCerts",
    "ack_for",
    "encode",
    "ensure_server_certs",
    "error_for",
]

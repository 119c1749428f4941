"""QUIC transport between the server and its agents.

The wire format (:mod:`.envelope`), the server's CA and certificate (:mod:`.certs`), the
agent's own key pair and what it signs (:mod:`.identity`), the server endpoint with
in-connection agent authentication (:mod:`.server`) and the agent's reconnecting connector
(:mod:`.client`).
"""

from .certs import ServerCerts, ensure_server_certs
from .client import (
    AgentConnector,
    CredentialStore,
    FileCredentials,
    HandshakeRefused,
    ServerBusy,
)
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
from .server import (
    AUTH_FAILED,
    AgentAuthority,
    AgentCredential,
    AgentSession,
    AuthError,
    QuicServer,
)

__all__ = [
    "ALPN_PROTOCOL",
    "AUTH_FAILED",
    "CLIENT_ID_PATTERN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "AgentAuthority",
    "AgentConnector",
    "AgentCredential",
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
    "ServerBusy",
    "ServerCerts",
    "ack_for",
    "encode",
    "ensure_server_certs",
    "error_for",
]

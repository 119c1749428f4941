"""QUIC transport between the server and its agents.

The wire format (:mod:`.envelope`), the server's CA and certificate (:mod:`.certs`), the
agent's own key pair and what it signs (:mod:`.identity`), the server endpoint with
in-connection agent authentication (:mod:`.server`) and the agent's reconnecting connector
(:mod:`.client`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# Each name is imported from its module when first asked for (PEP 562), so that an agent,
# which asks only for the client's and the envelope's, never imports the server endpoint
# (issue 12 item 6: an agent is not a server).
_MODULES = {
    "certs": ("ServerCerts", "ensure_server_certs"),
    "client": (
        "AgentConnector",
        "CredentialStore",
        "FileCredentials",
        "HandshakeRefused",
        "ServerBusy",
    ),
    "envelope": (
        "ALPN_PROTOCOL",
        "CLIENT_ID_PATTERN",
        "DEFAULT_MAX_MESSAGE_BYTES",
        "PROTOCOL_VERSION",
        "Envelope",
        "FrameDecoder",
        "Kind",
        "ProtocolError",
        "ack_for",
        "encode",
        "error_for",
    ),
    "server": (
        "AUTH_FAILED",
        "AgentAuthority",
        "AgentCredential",
        "AgentSession",
        "AuthError",
        "QuicServer",
    ),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


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

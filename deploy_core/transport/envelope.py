"""The envelope: the one message shape on the control stream, and its framing.

A frame is a 4-byte big-endian length followed by that many bytes of compact UTF-8
JSON holding one :class:`Envelope`; a field left out is its default (ACKs and PONGs are sent
without the fields at their defaults). Both ends refuse frames over a size limit before
buffering them, and turn anything that is not a valid envelope into a
:class:`ProtocolError` that says what was wrong.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import struct
from typing import Any, Literal
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ALPN_PROTOCOL",
    "CAPABILITY_ACK_REFS",
    "CLIENT_ID_PATTERN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEARTBEAT_QUIC",
    "PROTOCOL_VERSION",
    "Envelope",
    "FrameDecoder",
    "Kind",
    "ProtocolError",
    "ack_for",
    "acks_for",
    "encode",
    "error_for",
    "pong_for",
]

#: TLS ALPN identifier; a peer that does not offer it is not a Deploy Center peer.
ALPN_PROTOCOL = "deploy-center/1"
#: Version of the handshake carried in HELLO's ``protocol`` field.
PROTOCOL_VERSION = 1
#: What an agent may call itself (checked by the server in HELLO).
CLIENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
#: WELCOME's ``heartbeat`` when the server takes QUIC PING frames as the agent's heartbeats
#: (the agent then sends no PING envelope; the server's QUIC ACK answers). A server without
#: it answers PING envelopes with PONGs, which every server still does.
HEARTBEAT_QUIC = "quic"

#: The capability (in AUTH's ``capabilities``) of an agent that takes one ACK for many
#: events: an ACK whose payload holds ``"refs"``, the ids of every event it acknowledges in
#: the order they were sent (``ref`` is the first of them).  The server sends those only to
#: an agent that announced it; to any other, one ACK per event as before.
CAPABILITY_ACK_REFS = "ack_refs"

_HEADER = struct.Struct(">I")
_ANSWER_KINDS = frozenset({"ack", "pong"})


class Kind(enum.StrEnum):
    """What an envelope is for; ``ref`` links ACK, ERROR and PONG to the message answered."""

    HELLO = "hello"
    CHALLENGE = "challenge"
    AUTH = "auth"
    WELCOME = "welcome"
    COMMAND = "command"
    EVENT = "event"
    ACK = "ack"
    ERROR = "error"
    PING = "ping"
    PONG = "pong"


class Envelope(BaseModel):
    """One message on the control stream, in either direction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    id: str = Field(default_factory=lambda: uuid4().hex, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: Kind
    name: str = Field(default="", max_length=128, pattern=r"^[a-z0-9_.-]*$")
    wait_ack: bool = False
    need_callback: bool = False
    callback_id: str | None = Field(default=None, max_length=64)
    ref: str | None = Field(default=None, max_length=64)
    payload: dict[str, Any] = Field(default_factory=dict)


class ProtocolError(Exception):
    """A frame or message broke the wire protocol; the text says how."""


def encode(env: Envelope, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Frame ``env`` for the wire.

    :param env: the envelope to send.
    :param max_bytes: largest JSON body allowed (the 4-byte prefix is not counted).
    :raises ProtocolError: when the encoded body is larger than ``max_bytes``.
    """
    body = _answer_json(env) if env.kind in _ANSWER_KINDS else None
    if body is None:
        body = env.model_dump_json().encode("utf-8")
    if len(body) > max_bytes:
        raise ProtocolError(
            f"{env.kind.value} {env.name or env.id} encodes to {len(body)} bytes, over the "
            f"{max_bytes}-byte message limit; send large data as a file, not in the payload"
        )
    return _HEADER.pack(len(body)) + body


def _answer_json(env: Envelope) -> bytes | None:
    """An ACK or PONG made by :func:`ack_for` / :func:`pong_for` (nothing but an id, a name
    and a ref), written by hand: fields at their defaults left out (every receiver fills them
    in), so an ACK is ~110 bytes instead of ~190 (one per status report: fewer QUIC packets)
    and costs no model serialisation.  ``None`` for any other envelope."""
    if (
        env.payload
        or env.wait_ack
        or env.need_callback
        or env.callback_id is not None
        or not isinstance(env.ref, str)
    ):
        return None
    name = f',"name":{json.dumps(env.name)}' if env.name else ""
    return (
        f'{{"v":1,"id":{json.dumps(env.id)},"kind":"{env.kind.value}"{name},'
        f'"ref":{json.dumps(env.ref)}}}'
    ).encode()


def _describe(error: ValidationError) -> str:
    """Turn pydantic's report into one line that names each bad field."""
    problems = []
    for item in error.errors(include_url=False):
        if item["type"] == "json_invalid":
            return f"frame is not valid JSON: {item['msg']}"
        if item["type"] == "model_type":
            return "frame is not a JSON object"
        where = ".".join(str(part) for part in item["loc"]) or "envelope"
        problems.append(f"{where}: {item['msg']}")
    return "invalid envelope: " + "; ".join(problems)


def _finite(value: Any) -> bool:
    """False when ``value`` holds NaN or an infinity anywhere (the parser accepts the
    ``NaN`` and ``Infinity`` tokens, which JSON does not have)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _decode_body(body: bytes) -> Envelope:
    """Parse one frame body (without its length prefix).

    :raises ProtocolError: when the body is not JSON, not an object, or not a valid envelope.
    """
    try:
        env = Envelope.model_validate_json(body)
    except ValidationError as exc:
        raise ProtocolError(_describe(exc)) from None
    if not _finite(env.payload):
        raise ProtocolError("frame is not valid JSON: NaN and Infinity are not JSON numbers")
    return env


class FrameDecoder:
    """Incremental decoder for one byte stream of frames.

    After it has raised :class:`ProtocolError` the stream is out of sync, so every
    later :meth:`feed` raises the same error.
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._failure: ProtocolError | None = None
        #: The framed size of each envelope the last :meth:`feed` returned, in order.
        self.sizes: list[int] = []

    def feed(self, data: bytes) -> list[Envelope]:
        """Add received bytes and return the envelopes they complete, in order.

        :raises ProtocolError: on a declared length over the limit (checked as soon as
            the prefix arrives, before the body is buffered) or on a bad body.
        """
        if self._failure is not None:
            raise self._failure
        self._buffer += data
        envelopes: list[Envelope] = []
        self.sizes = []
        offset = 0
        try:
            while len(self._buffer) - offset >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self._buffer, offset)
                if length > self._max_bytes:
                    raise ProtocolError(
                        f"frame declares {length} bytes, over the {self._max_bytes}-byte "
                        "message limit"
                    )
                end = offset + _HEADER.size + length
                if len(self._buffer) < end:
                    break
                envelopes.append(_decode_body(bytes(self._buffer[offset + _HEADER.size : end])))
                self.sizes.append(end - offset)
                offset = end
        except ProtocolError as exc:
            self._failure = exc
            self._buffer.clear()
            raise
        del self._buffer[:offset]
        return envelopes

    @property
    def pending(self) -> int:
        """Bytes received of a frame not yet complete."""
        return len(self._buffer)


# Ids of the answers this process makes (ACK, PONG): a random prefix and a counter, not a
# uuid4 each (an ACK per status report is on the server's hot path).
_ANSWER_PREFIX = uuid4().hex[:16]
_ANSWER_IDS = itertools.count()


def _answer(kind: Kind, env: Envelope) -> Envelope:
    # Built without validation: every field is either a constant or taken from ``env``,
    # which was validated when it was made or received.
    return Envelope.model_construct(
        v=1,
        id=f"{_ANSWER_PREFIX}{next(_ANSWER_IDS):x}",
        kind=kind,
        name=env.name if kind is Kind.ACK else "",
        wait_ack=False,
        need_callback=False,
        callback_id=None,
        ref=env.id,
        payload={},
    )


def ack_for(env: Envelope) -> Envelope:
    """The ACK that confirms ``env`` was received."""
    return _answer(Kind.ACK, env)


def acks_for(acks: list[Envelope]) -> Envelope:
    """One ACK standing for ``acks`` (made by :func:`ack_for`, in order): ``ref`` the first's,
    ``payload.refs`` all of theirs (see :data:`CAPABILITY_ACK_REFS`).  A single one is
    returned as it is."""
    if len(acks) == 1:
        return acks[0]
    first = acks[0]
    return Envelope.model_construct(
        v=1,
        id=f"{_ANSWER_PREFIX}{next(_ANSWER_IDS):x}",
        kind=Kind.ACK,
        name=first.name,
        wait_ack=False,
        need_callback=False,
        callback_id=None,
        ref=first.ref,
        payload={"refs": [ack.ref for ack in acks]},
    )


def pong_for(env: Envelope) -> Envelope:
    """The PONG answering the PING ``env``."""
    return _answer(Kind.PONG, env)


def error_for(env: Envelope | None, reason: str) -> Envelope:
    """An ERROR answering ``env`` (or no message in particular when ``None``).

    :param reason: what was wrong and, where possible, what to do; goes in ``payload.reason``.
    """
    return Envelope(
        kind=Kind.ERROR,
        ref=env.id if env is not None else None,
        name=env.name if env is not None else "",
        payload={"reason": reason},
    )

"""Hostile bytes on the wire: property tests on the frame decoder, then attacks on a real
QUIC server on 127.0.0.1 while an authenticated agent keeps talking to it.

tests/transport/test_envelope.py already feeds random frames to the decoder; these add what
an attacker tries beyond that: arbitrary chunking, valid frames followed by garbage, deep
nesting, non-UTF-8 and surrogate escapes, and lengths that would make the decoder buffer.
Every attack on the server is followed by a round trip of the steady agent.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_harness import LoopThread, RawPeer, mac_for, raw_peer

from deploy_core.transport import (
    AgentCredential,
    AgentSession,
    AuthError,
    Envelope,
    FrameDecoder,
    Kind,
    ProtocolError,
    QuicServer,
    ServerCerts,
    encode,
    ensure_server_certs,
)

LIMIT = 64 * 1024
FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# JSON has no NaN or Infinity; the decoder refuses them (see the test below).
finite = st.floats(allow_nan=False, allow_infinity=False)
json_leaf = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=16)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
envelopes = st.builds(
    Envelope,
    kind=st.sampled_from(list(Kind)),
    name=st.from_regex(r"[a-z0-9_.-]{0,20}", fullmatch=True),
    wait_ack=st.booleans(),
    ref=st.none() | st.from_regex(r"[A-Za-z0-9]{1,20}", fullmatch=True),
    payload=st.dictionaries(st.text(max_size=8), json_value, max_size=5),
)


# --------------------------------------------------------------------------- the decoder


@FUZZ
@given(envs=st.lists(envelopes, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 4000)))
def test_any_chunking_of_valid_frames_decodes_the_same_envelopes(
    envs: list[Envelope], cuts: list[int]
) -> None:
    data = b"".join(encode(env) for env in envs)
    points = sorted({c % (len(data) + 1) for c in cuts})
    decoder = FrameDecoder(max_bytes=LIMIT)
    out: list[Envelope] = []
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        out += decoder.feed(data[start:end])
    assert out == envs


@FUZZ
@given(
    envs=st.lists(envelopes, max_size=3),
    garbage=st.one_of(
        st.binary(min_size=1, max_size=64).map(frame),
        st.text(max_size=32).map(lambda t: frame(t.encode("utf-8", "surrogatepass"))),
        json_value.map(lambda v: frame(json.dumps(v).encode())),
        st.integers(LIMIT + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    ),
)
def test_valid_frames_then_garbage_give_the_envelopes_then_a_sticky_protocol_error(
    envs: list[Envelope], garbage: bytes
) -> None:
    decoder = FrameDecoder(max_bytes=LIMIT)
    good = b"".join(encode(env) for env in envs)
    assert decoder.feed(good) == envs
    try:
        extra = decoder.feed(garbage)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decoder.feed(encode(Envelope(kind=Kind.PING)))
    else:
        # Garbage that happens to be a valid envelope is one; it must survive a re-encode.
        for env in extra:
            assert FrameDecoder().feed(encode(env)) == [env]


@FUZZ
@given(
    depth=st.integers(100, 100_000),
    opener=st.sampled_from([b"[", b'{"a":']),
    escape=st.sampled_from([b"\\ud800", b"\\udfff", b"\\u0000", b"\\ud83d\\ude00", b"\xff\xfe"]),
)
def test_deep_nesting_and_odd_escapes_never_escape_as_anything_but_protocol_error(
    depth: int, opener: bytes, escape: bytes
) -> None:
    closer = b"]" if opener == b"[" else b"}"
    nested = b'{"kind":"event","payload":{"x":' + opener * depth + b"1" + closer * depth + b"}}"
    odd = b'{"kind":"event","payload":{"s":"' + escape + b'"}}'
    for body in (nested, odd):
        try:
            decoded = FrameDecoder(max_bytes=1 << 20).feed(frame(body))
        except ProtocolError:
            continue
        for env in decoded:  # whatever is accepted can be sent on again
            assert FrameDecoder().feed(encode(env)) == [env]


@FUZZ
@given(
    token=st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]),
    where=st.sampled_from([b'{"x":%s}', b'{"a":[1,{"b":%s}]}', b'{"deploy_id":"d","seq":%s}']),
)
def test_nan_and_infinity_are_not_json_and_are_refused(token: bytes, where: bytes) -> None:
    body = b'{"kind":"event","name":"deploy.status","payload":' + where % token + b"}"
    with pytest.raises(ProtocolError, match="not valid JSON"):
        FrameDecoder().feed(frame(body))


@FUZZ
@given(declared=st.integers(LIMIT + 1, 2**32 - 1), sent=st.integers(0, 4096))
def test_an_oversize_length_is_refused_before_its_body_is_buffered(
    declared: int, sent: int
) -> None:
    decoder = FrameDecoder(max_bytes=LIMIT)
    with pytest.raises(ProtocolError, match="over the 65536-byte message limit"):
        decoder.feed(struct.pack(">I", declared) + b"x" * sent)
    assert len(decoder._buffer) == 0


# --------------------------------------------------------------------------- a real server


class Recorder:
    """Server callbacks that remember who connected and what they sent."""

    def __init__(self) -> None:
        self.connected: list[str] = []
        self.messages: list[tuple[str, Envelope]] = []

    async def on_connect(self, session: AgentSession) -> None:
        self.connected.append(session.client_id)

    async def on_message(self, session: AgentSession, env: Envelope) -> None:
        self.messages.append((session.client_id, env))

    async def on_disconnect(self, session: AgentSession) -> None:
        return None


class Authority:
    """Agent keys in memory; one join token."""

    join_token = "join-" + secrets.token_hex(8)

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, bytes] = {}

    async def credential(self, client_id: str) -> AgentCredential | None:
        if client_id in self.public_keys:
            return AgentCredential(public_key=self.public_keys[client_id])
        key = self.keys.get(client_id)
        return None if key is None else AgentCredential(shared_key=key)

    async def enroll(self, client_id: str, join_token: str, public_key: bytes) -> None:
        if join_token != self.join_token:
            raise AuthError("join token refused")
        self.public_keys[client_id] = public_key

    async def upgrade(self, client_id: str, public_key: bytes) -> None:
        self.keys.pop(client_id, None)
        self.public_keys[client_id] = public_key


class Wire:
    """The server under attack, its steady agent, and a way to send one attack."""

    def __init__(self, tmp: Path) -> None:
        self.loop = LoopThread()
        self.certs: ServerCerts = ensure_server_certs(tmp)
        self.authority = Authority()
        self.recorder = Recorder()
        self.steady_key = self.authority.keys["steady"] = secrets.token_bytes(32)
        self.victim_key = self.authority.keys["victim"] = secrets.token_bytes(32)
        self.server: QuicServer = self.loop.run(self._start())
        self._steady_cm = raw_peer(self.server.port, self.certs.ca_cert, idle_timeout=60)
        self.steady: RawPeer = self.loop.run(self._steady_cm.__aenter__())
        welcome = self.loop.run(self.steady.authenticate("steady", self.steady_key))
        assert welcome.kind is Kind.WELCOME

    async def _start(self) -> QuicServer:
        server = QuicServer(
            host="127.0.0.1",
            port=0,
            certs=self.certs,
            authority=self.authority,
            on_connect=self.recorder.on_connect,
            on_message=self.recorder.on_message,
            on_disconnect=self.recorder.on_disconnect,
            max_message_bytes=LIMIT,
            idle_timeout=30.0,
            handshake_timeout=1.0,
        )
        await server.start()
        return server

    def attack(self, moves: Callable[[RawPeer], Awaitable[Any]], *, enters: bool = False) -> str:
        """Open a fresh connection, make ``moves`` on it, and return the reason the server
        gave when it closed it; then check the steady agent still gets answers.

        :param enters: the moves include a correct handshake, so one session may start.
        """
        before = len(self.recorder.connected)

        async def run() -> str:
            async with raw_peer(self.server.port, self.certs.ca_cert) as peer:
                await moves(peer)
                return await peer.refused()

        reason = self.loop.run(run())
        self.loop.run(self.steady.round_trip())
        assert set(self.server.sessions) == {"steady"}
        # Closed on the server's side too, whatever became of the close frame on the way.
        assert sum(not c.shut for c in self.server._connections) == 1
        assert len(self.recorder.connected) - before == (1 if enters else 0)
        return reason

    def close(self) -> None:
        self.loop.run(self._steady_cm.__aexit__(None, None, None))
        self.loop.run(self.server.close())
        self.loop.close()


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wire]:
    w = Wire(tmp_path_factory.mktemp("wire"))
    try:
        yield w
    finally:
        w.close()


def send(data: bytes, *, end: bool = False) -> Callable[[RawPeer], Awaitable[None]]:
    async def moves(peer: RawPeer) -> None:
        peer.send_raw(data, end=end)

    return moves


@FUZZ
@given(
    data=st.one_of(
        st.binary(min_size=1, max_size=200),
        st.binary(max_size=100).map(frame),
        json_value.map(lambda v: frame(json.dumps(v).encode())),
        st.binary(min_size=1, max_size=8).map(
            lambda b: encode(Envelope(kind=Kind.HELLO, payload={"client_id": "x"}))[:-1] + b
        ),
    )
)
def test_malformed_bytes_before_hello_get_the_connection_closed(wire: Wire, data: bytes) -> None:
    # The stream is ended after the bytes, so an incomplete frame is refused too.
    wire.attack(send(data, end=True))


@FUZZ
@given(size=st.integers(LIMIT + 1, LIMIT + 4096), authenticated=st.booleans())
def test_an_oversize_message_is_refused_before_or_after_authentication(
    wire: Wire, size: int, authenticated: bool
) -> None:
    body = b'{"kind":"event","payload":{"blob":"' + b"x" * size + b'"}}'

    async def moves(peer: RawPeer) -> None:
        if authenticated:
            assert (await peer.authenticate("victim", wire.victim_key)).kind is Kind.WELCOME
        peer.send_raw(frame(body))

    assert "message limit" in wire.attack(moves, enters=authenticated)


@FUZZ
@given(
    kind=st.sampled_from([k for k in Kind if k is not Kind.HELLO] + ["hello!", "", "EVENT", 7]),
    name=st.text(max_size=20),
    payload=json_value,
)
def test_anything_but_hello_first_is_refused(
    wire: Wire, kind: Kind | str | int, name: str, payload: Any
) -> None:
    body = {"kind": kind.value if isinstance(kind, Kind) else kind, "payload": payload}
    if name:
        body["name"] = name
    reason = wire.attack(send(frame(json.dumps(body).encode())))
    assert reason  # an invalid envelope or "expected hello as the first message"


bad_client_ids = st.one_of(
    st.sampled_from(
        ["../etc/passwd", "..", "a/b", "web-1\n", "web-1\x00", "-lead", ".hidden", "x" * 65,
         "wéb", "web 1", "\uff57\uff45\uff42", "web\u202e1", "", "web-1\r\n"]
    ),
    st.text(min_size=1, max_size=80).filter(lambda s: not s.isascii() or "/" in s),
    st.integers() | st.none() | st.lists(st.text(max_size=3), max_size=2),
)  # fmt: skip


@FUZZ
@given(client_id=bad_client_ids)
def test_a_hello_with_a_bad_client_id_is_refused_at_once(wire: Wire, client_id: Any) -> None:
    hello = Envelope(kind=Kind.HELLO, payload={"client_id": client_id, "protocol": 1})
    assert "client_id must match" in wire.attack(send(encode(hello)))


@pytest.mark.parametrize("protocol", [0, 2, "1", True, None, 1.5, [1]])
def test_a_hello_with_another_protocol_is_refused_at_once(wire: Wire, protocol: Any) -> None:
    hello = Envelope(kind=Kind.HELLO, payload={"client_id": "victim", "protocol": protocol})
    assert "unsupported protocol" in wire.attack(send(encode(hello)))


# Proofs of wrong lengths (and the odd right one), non-hex, and not strings at all.
hex_garbage = st.one_of(
    st.binary(max_size=100).map(bytes.hex),
    st.text(alphabet="0123456789abcdefg xyz", max_size=80),
    st.integers(),
    st.none(),
    st.lists(st.integers(0, 255), max_size=32),
)
auth_garbage = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["key", "join", "signature", "KEY", "", None, 1, ["key"]]),
        "mac": hex_garbage,
        "signature": hex_garbage,
        "public_key": hex_garbage,
        "join_token": st.one_of(st.text(max_size=40), st.integers(), st.none()),
        "capabilities": st.one_of(
            json_value,
            st.integers(1, 2000).map(lambda n: {f"k{i}": "v" * 16 for i in range(n)}),
        ),
    },
)


@FUZZ
@given(payload=auth_garbage)
def test_an_auth_with_garbage_fields_is_refused(wire: Wire, payload: dict[str, Any]) -> None:
    async def moves(peer: RawPeer) -> None:
        await peer.hello("victim")
        peer.send_env(Envelope(kind=Kind.AUTH, payload=payload))

    reason = wire.attack(moves)
    assert reason and "internal error" not in reason


def test_huge_capabilities_are_refused_even_with_the_right_key(wire: Wire) -> None:
    capabilities = {f"plugin{i}": "x" * 100 for i in range(400)}  # ~45 KiB, under the frame limit

    async def moves(peer: RawPeer) -> None:
        answer = await peer.authenticate("victim", wire.victim_key, capabilities=capabilities)
        assert answer.kind is Kind.ERROR, answer

    assert "capabilities" in wire.attack(moves)


def test_a_replayed_auth_is_refused(wire: Wire) -> None:
    captured: list[Envelope] = []

    async def legit(peer: RawPeer) -> None:
        nonce = await peer.hello("victim")
        auth = Envelope(
            kind=Kind.AUTH,
            payload={"method": "key", "mac": mac_for(wire.victim_key, nonce, "victim")},
        )
        captured.append(auth)
        peer.send_env(auth)
        assert (await peer.recv()).kind is Kind.WELCOME
        peer.send_raw(b"\x00\x00\x00\x01{")  # and then leave, badly

    wire.attack(legit, enters=True)

    async def replay(peer: RawPeer) -> None:
        await peer.hello("victim")  # a fresh nonce: the old MAC does not fit it
        peer.send_env(captured[0])

    assert "wrong agent key for client victim" in wire.attack(replay)

    async def replay_without_hello(peer: RawPeer) -> None:
        peer.send_env(captured[0])

    assert "expected hello" in wire.attack(replay_without_hello)


def test_a_third_handshake_message_and_a_second_stream_are_refused(wire: Wire) -> None:
    async def extra(peer: RawPeer) -> None:
        await peer.hello("victim")
        peer.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": "victim", "protocol": 1}))

    assert "expected auth after challenge, got hello" in wire.attack(extra)

    async def side_stream(peer: RawPeer) -> None:
        peer.send_env(Envelope(kind=Kind.HELLO, payload={"client_id": "victim", "protocol": 1}))
        other = peer._quic.get_next_available_stream_id()
        peer._quic.send_stream_data(other, b"\x00\x00\x00\x02{}")
        peer.transmit()

    assert "before authentication" in wire.attack(side_stream)


def test_the_steady_agents_messages_all_arrived(wire: Wire) -> None:
    event = Envelope(kind=Kind.EVENT, name="still.here", payload={"n": 1})
    wire.steady.send_env(event)

    async def arrived() -> None:
        while ("steady", event) not in wire.recorder.messages:
            await asyncio.sleep(0.01)

    wire.loop.run(asyncio.wait_for(arrived(), 5))
    assert {cid for cid, _ in wire.recorder.messages} == {"steady"}

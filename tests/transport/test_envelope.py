"""The envelope and its framing: round trips, partial frames, and refusals."""

from __future__ import annotations

import json
import random
import struct

import hypothesis
import hypothesis.strategies as st
import pytest

from deploy_core.transport import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    FrameDecoder,
    Kind,
    ProtocolError,
    ack_for,
    encode,
    error_for,
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frame_json(obj: object) -> bytes:
    return frame(json.dumps(obj).encode())


def sample() -> Envelope:
    return Envelope(
        kind=Kind.COMMAND,
        name="deploy.start",
        wait_ack=True,
        need_callback=True,
        callback_id="cb-1",
        payload={"deploy_id": "7f3c", "steps": [1, 2.5, None, "é"], "nested": {"ok": True}},
    )


def test_encode_then_decode_gives_the_same_envelope() -> None:
    env = sample()
    data = encode(env)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert b": " not in data and b", " not in data  # compact JSON
    assert FrameDecoder().feed(data) == [env]


def test_frames_fed_byte_by_byte_decode_in_order() -> None:
    envs = [sample(), Envelope(kind=Kind.EVENT, name="x"), Envelope(kind=Kind.PING)]
    data = b"".join(encode(env) for env in envs)
    decoder = FrameDecoder()
    out: list[Envelope] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == envs


def test_merged_and_split_frames_decode_in_order() -> None:
    envs = [Envelope(kind=Kind.EVENT, name=f"e{i}", payload={"i": i}) for i in range(5)]
    data = b"".join(encode(env) for env in envs)
    decoder = FrameDecoder()
    cut = len(encode(envs[0])) + 3  # first frame plus part of the second's header
    assert decoder.feed(data[:cut]) == envs[:1]
    assert decoder.feed(data[cut:]) == envs[1:]
    assert decoder.feed(b"") == []


def test_declared_length_over_limit_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_bytes=1000)
    with pytest.raises(ProtocolError, match="1001 bytes, over the 1000-byte"):
        decoder.feed(struct.pack(">I", 1001))  # header only: nothing buffered yet
    with pytest.raises(ProtocolError):  # the stream is out of sync from now on
        decoder.feed(encode(sample()))


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 1 << 20
    with pytest.raises(ProtocolError, match="over the 1048576-byte"):
        FrameDecoder().feed(struct.pack(">I", (1 << 20) + 1))


def test_encode_refuses_a_message_over_the_limit() -> None:
    env = Envelope(kind=Kind.EVENT, payload={"blob": "x" * 2000})
    with pytest.raises(ProtocolError, match="over the 1000-byte message limit"):
        encode(env, max_bytes=1000)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (frame(b"{not json"), "not valid JSON"),
        (frame(b"\xff\xfe\x00"), "not valid JSON"),
        (frame(b""), "not valid JSON"),
        (frame(b"[1, 2]"), "not a JSON object"),
        (frame(b'"hello"'), "not a JSON object"),
        (frame_json({"kind": "explode"}), "kind: Input should be"),
        (frame_json({"kind": "event", "id": "has space"}), "id: String should match pattern"),
        (frame_json({"kind": "event", "id": "x" * 65}), "id: String should match pattern"),
        (frame_json({"kind": "event", "surprise": 1}), "surprise: Extra inputs are not permitted"),
        (frame_json({"kind": "event", "name": "Upper"}), "name: String should match pattern"),
        (frame_json({"kind": "event", "payload": [1]}), "payload: Input should be an object"),
        (frame_json({"kind": "event", "v": 2}), "v: Input should be 1"),
        (frame_json({"name": "x"}), "kind: Field required"),
    ],
)
def test_bad_frames_raise_protocol_error_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(data)
    assert problem in str(info.value)


def test_a_bad_frame_after_good_ones_still_raises() -> None:
    with pytest.raises(ProtocolError, match="surprise"):
        FrameDecoder().feed(encode(sample()) + frame_json({"kind": "event", "surprise": 1}))


def test_ack_and_error_refer_to_the_message_answered() -> None:
    env = sample()
    ack = ack_for(env)
    assert (ack.kind, ack.ref, ack.name) == (Kind.ACK, env.id, "deploy.start")
    assert ack.id != env.id
    error = error_for(env, "client web-1 is busy")
    assert (error.kind, error.ref, error.payload) == (
        Kind.ERROR,
        env.id,
        {"reason": "client web-1 is busy"},
    )
    orphan = error_for(None, "bad frame")
    assert orphan.ref is None and orphan.name == ""


def test_envelopes_are_frozen_and_refuse_unknown_fields() -> None:
    env = sample()
    with pytest.raises(ValueError):
        env.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Envelope(kind=Kind.EVENT, bogus=1)  # type: ignore[call-arg]


def _assert_only_protocol_errors(decoder: FrameDecoder, data: bytes) -> None:
    try:
        for env in decoder.feed(data):
            assert isinstance(env, Envelope)
    except ProtocolError:
        pass


def test_random_bytes_only_ever_raise_protocol_error() -> None:
    rng = random.Random(20240611)
    valid = encode(sample())
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.4:
            data = rng.randbytes(rng.randrange(0, 64))
        elif choice < 0.8:  # a valid frame with a few bytes changed
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        else:  # plausible length, random body
            body = rng.randbytes(rng.randrange(0, 48))
            data = frame(body)
        decoder = FrameDecoder(max_bytes=4096)
        _assert_only_protocol_errors(decoder, data)


def test_random_frames_only_ever_raise_protocol_error_property() -> None:
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    )
    envelope_like = st.fixed_dictionaries(
        {"kind": st.sampled_from([kind.value for kind in Kind] + ["bogus", ""])},
        optional={
            "id": st.text(max_size=70) | json_values,
            "name": st.text(max_size=20) | json_values,
            "v": json_values,
            "wait_ack": json_values,
            "ref": json_values,
            "payload": json_values,
            "extra": json_values,
        },
    )
    bodies = st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda value: json.dumps(value).encode()),
        envelope_like.map(lambda value: json.dumps(value).encode()),
    )
    pieces = st.lists(st.one_of(bodies.map(frame), st.binary(max_size=8)), max_size=4)

    def check(parts: list[bytes], cut: int) -> None:
        data = b"".join(parts)
        decoder = FrameDecoder(max_bytes=4096)
        for chunk in (data[:cut], data[cut:]):
            try:
                for env in decoder.feed(chunk):
                    assert isinstance(env, Envelope)
            except ProtocolError:
                return

    settings = hypothesis.settings(max_examples=300, deadline=None, database=None)
    settings(hypothesis.given(parts=pieces, cut=st.integers(0, 300))(check))()

"""ACKs and PONGs travel without the fields at their defaults (envelope.encode): shorter,
and decoded by every receiver to the same envelope, as the full form is."""

from __future__ import annotations

import json

import pytest

from deploy_core.transport.envelope import (
    Envelope,
    FrameDecoder,
    Kind,
    ack_for,
    encode,
    pong_for,
)


def _body(frame: bytes) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(frame[4:])
    return loaded


def _event() -> Envelope:
    return Envelope(
        id="st-" + "b" * 32,
        kind=Kind.EVENT,
        name="deploy.status",
        callback_id="a" * 32,
        payload={"deploy_id": "a" * 32, "seq": 3},
    )


@pytest.mark.parametrize("answer", [ack_for(_event()), pong_for(Envelope(kind=Kind.PING))])
def test_an_answer_is_sent_without_its_defaults_and_decodes_to_itself(answer: Envelope) -> None:
    frame = encode(answer)
    full = answer.model_dump_json().encode()
    assert len(frame) - 4 < len(full)
    body = _body(frame)
    assert body["v"] == 1 and body["id"] == answer.id and body["ref"] == answer.ref
    assert not {"wait_ack", "need_callback", "callback_id", "payload"} & body.keys()
    assert FrameDecoder().feed(frame) == [answer]
    # The full form (what a server of the previous version sends) decodes to the same.
    assert FrameDecoder().feed(len(full).to_bytes(4, "big") + full) == [answer]


def test_other_envelopes_keep_every_field() -> None:
    with_payload = Envelope(kind=Kind.ACK, ref="c" * 32, name="deploy.shell", payload={"x": 1})
    for env in (_event(), with_payload, Envelope(kind=Kind.ACK), Envelope(kind=Kind.PING)):
        body = _body(encode(env))
        assert set(body) == set(Envelope.model_fields)
        assert FrameDecoder().feed(encode(env)) == [env]


def test_a_compact_answer_is_held_to_the_size_limit() -> None:
    from deploy_core.transport.envelope import ProtocolError

    with pytest.raises(ProtocolError):
        encode(ack_for(_event()), max_bytes=50)

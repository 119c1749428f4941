"""The dispatcher's count of commands awaiting their agents' ACK, which paces a rollout's
chunks of starts (issue 13: 2,000 starts at once outran the server)."""

from __future__ import annotations

import asyncio

import pytest

from deploy_core.server import dispatch
from deploy_core.server.dispatch import Dispatcher


def dispatcher() -> Dispatcher:
    # Neither the records nor the transport take part in the count.
    return Dispatcher(records=None, transport=None, max_log_bytes=0)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_room_waits_until_enough_commands_are_acknowledged() -> None:
    d = dispatcher()
    for deploy_id in ("a", "b", "c"):
        d.sent(deploy_id)
    d.sent("a")  # sent again (redelivered): still one command
    assert d.awaiting_ack() == 3
    assert await d.room(1, timeout=0.05) is False
    d.acknowledged("nobody-sent-this")
    assert d.awaiting_ack() == 3

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, d.acknowledged, "a")
    loop.call_later(0.1, d.acknowledged, "c")
    waiting = asyncio.create_task(d.room(1, timeout=10))
    await asyncio.sleep(0.07)
    assert not waiting.done()  # one ACK of the two it needs
    assert await asyncio.wait_for(waiting, 5) is True
    assert d.awaiting_ack() == 1
    assert await d.room(1, timeout=0) is True


@pytest.mark.asyncio
async def test_a_command_never_acknowledged_stops_counting_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent that went away never acknowledges; its command must not hold back every
    later rollout (redelivery and the deadline take care of it)."""
    monkeypatch.setattr(dispatch, "UNACKED_MEMORY", 0.2)
    d = dispatcher()
    d.sent("gone")
    await asyncio.sleep(0.1)
    d.sent("fresh")
    assert d.awaiting_ack() == 2
    assert await d.room(1, timeout=5) is True  # "gone" is forgotten within 0.2 s
    assert d.awaiting_ack() == 1


@pytest.mark.asyncio
async def test_commands_never_acknowledged_are_not_kept_when_no_rollout_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a rollout nobody asks for the count; sending still drops what is too old, so
    a server of agents that never answer does not gather their ids forever."""
    monkeypatch.setattr(dispatch, "UNACKED_MEMORY", 0.05)
    d = dispatcher()
    for i in range(100):
        d.sent(f"old-{i}")
    await asyncio.sleep(0.1)
    d.sent("new")
    assert list(d._unacked) == ["new"]

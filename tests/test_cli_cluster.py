"""``deployctl cluster status`` as text: live and stale replicas, duties held by a replica no
longer listed, none held, and control characters from the server never reach the terminal."""

from __future__ import annotations

from typing import Any

from deploy_core.cli.cluster import render_status


def replica(server_id: str, **fields: Any) -> dict[str, Any]:
    row = {
        "server_id": server_id,
        "this": False,
        "live": True,
        "api_url": f"http://{server_id}:8470",
        "quic_address": f"{server_id}:8471",
        "started_at": None,
        "last_seen": None,
        "seconds_since_seen": 0.5,
        "heartbeat_interval": 5.0,
        "agents_connected": 3,
        "agents_held": 4,
        "duties": [],
    }
    return {**row, **fields}


def test_live_stale_and_a_duty_held_by_an_unlisted_replica() -> None:
    view = {
        "server_id": "a",
        "live": 1,
        "replicas": [
            replica("a", this=True, duties=["watchdog"]),
            replica("b", live=False, seconds_since_seen=42.4),
        ],
        "duties": [
            {"duty": "watchdog", "holder": "a", "expires_at": None},
            {"duty": "retention", "holder": "gone", "expires_at": None},
        ],
    }
    assert render_status(view).splitlines() == [
        "1 live of 2 replicas (answered by a)",
        "a *  live  api http://a:8470  quic a:8471",
        "    agents: 4 held (3 connected at its last heartbeat); duties: watchdog",
        "b  STALE (last seen 42s ago)  api http://b:8470  quic b:8471",
        "    agents: 4 held (3 connected at its last heartbeat); duties: -",
        "duty retention: held by unlisted gone",
    ]


def test_no_duty_held_and_escapes_shown_not_sent() -> None:
    view = {
        "server_id": "a",
        "live": 1,
        "replicas": [replica("a", this=True, api_url="http://a\x1b]0;pwned\x07:8470")],
        "duties": [],
    }
    text = render_status(view)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;pwned\\x07" in text
    assert text.endswith("no duty is held right now (each is taken within a lease period)")


def test_the_answering_replicas_bus_is_shown() -> None:
    view: dict[str, Any] = {
        "server_id": "a",
        "live": 1,
        "replicas": [replica("a", this=True, duties=["watchdog"])],
        "duties": [{"duty": "watchdog", "holder": "a", "expires_at": None}],
        "bus": {"listening": False, "sent": 5, "received": 7, "malformed": 1, "dropped": 2},
    }
    assert render_status(view).splitlines()[-1] == (
        "cluster bus of a: NOT LISTENING (reconnecting); notifications sent 5, received 7, "
        "malformed 1, dropped 2"
    )
    view["bus"] = None  # SQLite: one server, no bus
    assert "cluster bus" not in render_status(view)

"""The rollout routes' real answers (and refusals) match the OpenAPI document."""

from __future__ import annotations

import json
import time

from test_openapi import Api, api, server_caps

__all__ = ["api"]  # the module-scoped fixture, shared with test_openapi


def test_rollout_answers_have_the_documented_shapes(api: Api) -> None:
    server, http = api.server, api.http
    records = server.records
    for i in range(3):
        cid = f"roll-{i}"
        records.enroll(cid, f"{i:02d}" * 32)
        records.set_connected(
            cid,
            remote="127.0.0.1:1",
            capabilities=server_caps(server),
            labels={"role": "web" if i < 2 else "db"},
        )
        records.set_disconnected(cid, last_seen=time.time())  # offline: the rollout waits

    body = {
        "type": "shell",
        "request": {"script": "true"},
        "targets": {"selector": {"role": "web"}},
        "strategy": {"batch_size": "50%", "canary": 1, "offline_timeout": "10m"},
    }
    accepted = api.check(http.post("/api/rollouts", json=body), "/api/rollouts", "post")
    assert accepted["targets"] == 2 and accepted["batches"] == 2
    rollout_id = accepted["rollout_id"]
    path = "/api/rollouts/{rollout_id}"
    view = api.check(http.get(f"/api/rollouts/{rollout_id}"), path)
    assert [t["client_id"] for b in view["batches"] for t in b["targets"]] == ["roll-0", "roll-1"]
    assert view["strategy"]["offline_timeout"] == 600
    listing = api.check(http.get("/api/rollouts?active=1&limit=5"), "/api/rollouts")
    assert rollout_id in [item["rollout_id"] for item in listing["items"]]
    mine = api.check(http.get("/api/rollouts?client_id=roll-1"), "/api/rollouts")
    assert [item["rollout_id"] for item in mine["items"]] == [rollout_id]
    assert api.check(http.get("/api/rollouts?client_id=roll-2"), "/api/rollouts")["total"] == 0
    assert http.get("/api/rollouts?client_id=../x").status_code == 422
    api.check(http.post(f"/api/rollouts/{rollout_id}/pause"), path + "/pause", "post")
    promote = http.post(f"/api/rollouts/{rollout_id}/promote")
    assert promote.status_code == 409
    api.check(promote, path + "/promote", "post")
    api.check(http.post(f"/api/rollouts/{rollout_id}/resume"), path + "/resume", "post")
    aborted = api.check(http.post(f"/api/rollouts/{rollout_id}/abort"), path + "/abort", "post")
    assert aborted["status"] == "aborted" and aborted["counts"] == {"skipped": 2}

    empty = http.post("/api/rollouts", json={**body, "targets": {"selector": {}}})
    assert empty.status_code == 422
    api.check(empty, "/api/rollouts", "post")
    bad = http.post("/api/rollouts", json={**body, "strategy": {"max_failures": "x"}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][0] == "strategy"
    api.check(http.get("/api/rollouts/nope"), path)  # 404
    api.check(http.post("/api/rollouts/nope/abort"), path + "/abort", "post")  # 404
    body_given = http.post(f"/api/rollouts/{rollout_id}/pause", json={"now": True})
    assert body_given.status_code == 422

    client = http.get("/api/clients/roll-2").json()
    assert client["labels"] == {"role": "db"}


def test_hostile_rollout_bodies_are_refused_with_reasons(api: Api) -> None:
    http = api.http
    ok = {"type": "shell", "request": {"script": "true"}, "targets": {"clients": ["x-1"]}}
    cases = [
        [],
        "rollout",
        {**ok, "type": "../shell"},
        {**ok, "type": None},
        {**ok, "request": ["script"]},
        {**ok, "targets": ["x-1"]},
        {**ok, "targets": {"clients": [f"c-{i}" for i in range(10_001)]}},
        {**ok, "targets": {"clients": ["x-1\n"]}},
        {**ok, "targets": {"selector": {f"k{i}": "v" for i in range(33)}}},
        {**ok, "targets": {"selector": {"role": ["web"]}}},
        {**ok, "targets": {"selector": {"role": "web\u0000"}}},
        {**ok, "strategy": []},
        {**ok, "strategy": {"batch_size": "1e9%"}},
        {**ok, "strategy": {"batch_size": 10**12}},
        {**ok, "strategy": {"max_failures": "NaN%"}},
        {**ok, "strategy": {"progress_deadline": float("inf")}},
        {**ok, "strategy": {"progress_deadline": "1e9h"}},
        {**ok, "extra": 1},
    ]
    for body in cases:
        content = json.dumps(body, allow_nan=True).encode()
        answer = http.post(
            "/api/rollouts", content=content, headers={"content-type": "application/json"}
        )
        assert answer.status_code in (400, 413, 422), (body if len(content) < 200 else "", answer)
        api.check(answer, "/api/rollouts", "post")
    assert http.post("/api/rollouts", content=b"{").status_code == 400
    long_id = "a" * 5000
    assert http.get(f"/api/rollouts/{long_id}").status_code == 404
    assert http.post(f"/api/rollouts/{long_id}/abort").status_code == 404
    assert http.post("/api/rollouts/x/explode").status_code in (404, 405)
    assert http.get("/api/rollouts?limit=0").status_code == 422
    assert http.get("/api/rollouts?active=maybe").status_code == 422

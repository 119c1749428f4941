"""Rollouts end to end (issue 14, docs/rollouts.md): a real server and twelve real agents
with labels over QUIC.  Every run of a script appends its host to a file, so the tests count
what ran where on disk, not only what the records say."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_core.client import ApiError
from deploy_core.testing import DeployCenter

HOSTS = [f"web-{i:02d}" for i in range(1, 13)]
# The script's host: the --client-id of the agent process it runs under.
WHO = (
    'p=$$; host=""; while [ "$p" -gt 1 ]; do c=$(tr "\\0" " " < /proc/$p/cmdline); '
    'case "$c" in *--client-id*) host=$(echo "$c" | sed "s/.*--client-id \\([^ ]*\\).*/\\1/"); '
    "break;; esac; p=$(cut -d' ' -f4 /proc/$p/stat); done\n"
)
FINAL = ("succeeded", "failed", "aborted", "rolled_back")


def agent_config(i: int) -> str:
    return f'[agent]\nlabels = {{role = "web", zone = "z{i % 3}", n = "{i}"}}\n'


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("rollouts"))
    try:
        c.start_server()
        for i, host in enumerate(HOSTS, 1):
            c.start_agent(host, config=agent_config(i), timeout=60)
        yield c
    finally:
        c.close()


def start(
    center: DeployCenter, script: str, request: dict[str, Any] | None = None, **body: Any
) -> str:
    body.setdefault("targets", {"selector": {"role": "web"}})
    answer = center.api.request(
        "POST",
        "/api/rollouts",
        json={"type": "shell", "request": {"script": script, **(request or {})}, **body},
    )
    rollout_id: str = answer["rollout_id"]
    return rollout_id


def view(center: DeployCenter, rollout_id: str) -> dict[str, Any]:
    found: dict[str, Any] = center.api.request("GET", f"/api/rollouts/{rollout_id}")
    return found


def wait_for(
    center: DeployCenter, rollout_id: str, statuses: tuple[str, ...], timeout: float = 180
) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            current = view(center, rollout_id)
        except ApiError:  # a restarting server
            current = {"status": None}
        if current["status"] in statuses:
            return current
        time.sleep(0.2)
    raise TimeoutError(f"rollout {rollout_id} not {statuses} after {timeout}s: {current}")


def wait_until(check: Any, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"not {what} after {timeout}s")


def runs(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def targets(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for b in rollout["batches"] for t in b["targets"]]


def control(center: DeployCenter, rollout_id: str, action: str) -> dict[str, Any]:
    answer: dict[str, Any] = center.api.request(
        "POST", f"/api/rollouts/{rollout_id}/{action}", json={}
    )
    return answer


def refusal(call: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


class LiveRollouts:
    """The ``rollout`` events of ``WS /api/live``, collected in a thread."""

    def __init__(self, center: DeployCenter) -> None:
        from websockets.sync.client import connect

        token = (center.server_dir / "admin.token").read_text().strip()
        self._connection = connect(
            f"ws://127.0.0.1:{center.api_port}/api/live",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=30,
        )
        self.socket = self._connection.__enter__()
        # The server subscribes the socket before it says hello: nothing after is missed.
        assert json.loads(self.socket.recv(timeout=30))["type"] == "hello"
        self.events: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                message = json.loads(self.socket.recv())
                if message["type"] == "rollout":
                    self.events.append(message["rollout"])
        except Exception:
            return

    def statuses(self, rollout_id: str) -> list[str]:
        seen = [e["status"] for e in self.events if e["rollout_id"] == rollout_id]
        return [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s]

    def close(self) -> None:
        self._connection.__exit__(None, None, None)
        self.thread.join(10)


def test_labels_are_shown_with_the_clients(center: DeployCenter) -> None:
    labels = {
        c["client_id"]: c["labels"] for c in center.api.request("GET", "/api/clients")["clients"]
    }
    assert labels["web-01"] == {"role": "web", "zone": "z1", "n": "1"}
    assert labels["web-12"] == {"role": "web", "zone": "z0", "n": "12"}
    detail = center.api.request("GET", "/api/clients/web-05")
    assert detail["labels"] == {"role": "web", "zone": "z2", "n": "5"}
    assert "labels" not in detail["capabilities"]


def test_canary_pauses_then_batches_of_a_quarter(center: DeployCenter, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    live = LiveRollouts(center)
    try:
        rollout_id = start(
            center,
            WHO + f'echo "$host" >> {log}; sleep 0.2',
            strategy={"batch_size": "25%", "canary": 1},
        )
        paused = wait_for(center, rollout_id, ("paused", *FINAL))
        assert paused["status"] == "paused" and paused["paused_for"] == "canary"
        assert [len(b["targets"]) for b in paused["batches"]] == [1, 3, 3, 3, 2]
        assert [b["canary"] for b in paused["batches"]] == [True] + [False] * 4
        assert paused["batches"][0]["targets"][0]["status"] == "success"
        assert [b["state"] for b in paused["batches"]] == ["done"] + ["waiting"] * 4
        assert runs(log) == Counter({"web-01": 1})  # the canary only
        time.sleep(1.5)  # paused: nothing more starts
        assert runs(log) == Counter({"web-01": 1})
        resume = refusal(lambda: control(center, rollout_id, "resume"))
        assert resume.status == 409 and "promote" in str(resume)
        control(center, rollout_id, "promote")
        done = wait_for(center, rollout_id, FINAL)
        assert done["status"] == "succeeded", done
        assert done["counts"] == {"success": 12}
        assert runs(log) == Counter(dict.fromkeys(HOSTS, 1))
        # Each batch started after the one before ended.
        for before, after in zip(done["batches"], done["batches"][1:], strict=False):
            assert before["finished_at"] <= after["started_at"]
        statuses = [h["status"] for h in done["history"]]
        assert statuses == ["pending", "running", "paused", "running", "succeeded"]
        again = refusal(lambda: control(center, rollout_id, "pause"))
        assert again.status == 409 and "already ended succeeded" in str(again)
        wait_until(lambda: "succeeded" in live.statuses(rollout_id), 30, "told live")
        assert live.statuses(rollout_id)[-3:] == ["paused", "running", "succeeded"]
    finally:
        live.close()


def test_failures_stop_the_rollout_and_roll_back_what_succeeded(
    center: DeployCenter, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    marks = tmp_path / "marks"
    marks.mkdir()
    failing = {"web-05", "web-06", "web-07"}
    script = (
        WHO + f'if [ "$DEPLOY_ACTION" = rollback ]; then rm {marks}/"$host"; '
        f'echo "undo-$host" >> {log}; exit 0; fi\n'
        + f'echo "$host" >> {log}; touch {marks}/"$host"\n'
        + 'case "$host" in '
        + "|".join(sorted(failing))
        + ") exit 3;; esac\n"
    )
    rollout_id = start(
        center,
        script,
        request={"rollback": {"strategy": "inline"}},
        strategy={"batch_size": 3, "max_failures": 1, "on_failure": "rollback"},
    )
    done = wait_for(center, rollout_id, FINAL)
    assert done["status"] == "rolled_back", done
    states = {t["client_id"]: t for t in targets(done)}
    # Batches of 3: web-05 and web-06 fail in the second → 2 > max_failures 1: stop there.
    for host in ("web-01", "web-02", "web-03", "web-04"):
        assert states[host]["status"] == "success"
        assert states[host]["rollback_status"] == "rolled_back", states[host]
    for host in ("web-05", "web-06"):
        # The agent undid the failed ones itself (inline rollback): they count as failures.
        assert states[host]["status"] == "rolled_back"
        assert states[host]["rollback_id"] is None
    for host in HOSTS[6:]:
        assert states[host]["state"] == "skipped" and states[host]["deploy_id"] is None
    assert done["failures"] == 2 and "more than max_failures 1" in done["reason"]
    ran = runs(log)
    assert {h for h in ran if not h.startswith("undo-")} == set(HOSTS[:6])
    assert all(ran[h] == 1 for h in HOSTS[:6])
    assert "web-07" not in ran  # failing, but never started: the rollout stopped first
    # On disk: every host that succeeded was undone, newest first.
    assert sorted(p.name for p in marks.iterdir()) == []
    undone = [line for line in log.read_text().split() if line.startswith("undo-")]
    assert sorted(undone) == sorted(f"undo-{h}" for h in HOSTS[:6])
    finished = {t["client_id"]: t["finished_at"] for t in targets(done)}
    rollbacks = [
        center.api.request("GET", f"/api/deploy/{states[h]['rollback_id']}")
        for h in ("web-01", "web-02", "web-03", "web-04")
    ]
    order = [r["client_id"] for r in sorted(rollbacks, key=lambda r: r["created_at"])]
    assert order == sorted(order, key=lambda h: finished[h], reverse=True)
    assert [h["status"] for h in done["history"]][-2:] == ["rolling_back", "rolled_back"]


def test_abort_mid_batch(center: DeployCenter, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    go = tmp_path / "go"
    script = (
        WHO + f'echo "$host" >> {log}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do '
        "sleep 0.1; i=$((i+1)); done"
    )
    rollout_id = start(center, script, strategy={"batch_size": 4})
    wait_until(lambda: len(runs(log)) == 4, 60, "4 running")
    aborted = control(center, rollout_id, "abort")
    assert aborted["status"] == "aborted" and "aborted by" in aborted["reason"]
    go.touch()
    wait_until(
        lambda: view(center, rollout_id)["counts"].get("success") == 4, 60, "first batch done"
    )
    time.sleep(2)  # the driver would have started the next batch by now
    final = view(center, rollout_id)
    assert final["status"] == "aborted"
    assert final["counts"] == {"success": 4, "skipped": 8}
    assert runs(log) == Counter(dict.fromkeys(HOSTS[:4], 1))
    for action in ("resume", "promote", "abort"):
        assert refusal(lambda a=action: control(center, rollout_id, a)).status == 409


def test_pause_and_resume(center: DeployCenter, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    gate = tmp_path / "gate"
    script = (
        WHO + f'echo "$host" >> {log}; i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do '
        "sleep 0.1; i=$((i+1)); done"
    )
    rollout_id = start(
        center,
        script,
        targets={"clients": ["web-03", "web-01"], "selector": {"zone": "z0"}},
        strategy={"max_parallel": 2},
    )
    wait_until(lambda: len(runs(log)) == 2, 60, "2 running")
    paused = control(center, rollout_id, "pause")
    assert paused["status"] == "paused" and paused["paused_for"] == "operator"
    assert refusal(lambda: control(center, rollout_id, "promote")).status == 409
    gate.touch()
    wait_until(lambda: view(center, rollout_id)["counts"].get("success") == 2, 60, "2 done")
    time.sleep(1.5)
    assert len(runs(log)) == 2  # paused
    control(center, rollout_id, "resume")
    done = wait_for(center, rollout_id, FINAL)
    assert done["status"] == "succeeded"
    # The listed clients first, in the order given, then the selector's (zone z0: 3, 6, 9,
    # 12 → web-03 already listed).
    assert [t["client_id"] for t in targets(done)] == [
        "web-03",
        "web-01",
        "web-06",
        "web-09",
        "web-12",
    ]
    assert runs(log) == Counter(
        dict.fromkeys(["web-01", "web-03", "web-06", "web-09", "web-12"], 1)
    )


def test_refusals(center: DeployCenter) -> None:
    def post(body: dict[str, Any]) -> ApiError:
        base = {"type": "shell", "request": {"script": "true"}}
        return refusal(lambda: center.api.request("POST", "/api/rollouts", json={**base, **body}))

    for targets_ in ({"selector": {}}, {"clients": []}, {}, {"selector": {"role": "db"}}):
        err = post({"targets": targets_})
        assert err.status == 422 and "no targets" in str(err), (targets_, str(err))
    err = post({"targets": {"clients": ["web-01", "nope-1"]}})
    assert err.status == 422 and "nope-1" in str(err)
    err = post(
        {"targets": {"clients": ["web-01"]}, "request": {"script": "true", "client_id": "x"}}
    )
    assert err.status == 422 and "client_id" in str(err)
    err = post({"targets": {"clients": ["web-01"]}, "request": {"scrip": "true"}})
    assert err.status == 422 and err.body["detail"][0]["loc"][0] == "request"
    err = post({"type": "nosuch", "targets": {"clients": ["web-01"]}})
    assert err.status == 404
    err = post({"targets": {"clients": ["web-01"]}, "strategy": {"canary": 1}})
    assert err.status == 422 and "canary" in str(err)
    err = post({"targets": {"clients": ["web-01"]}, "strategy": {"batch_size": "0%"}})
    assert err.status == 422
    assert refusal(lambda: view(center, "0" * 32)).status == 404
    assert refusal(lambda: control(center, "0" * 32, "pause")).status == 404
    listing = center.api.request("GET", "/api/rollouts", params={"status": "succeeded"})
    assert listing["total"] >= 1 and all(i["status"] == "succeeded" for i in listing["items"])
    assert refusal(lambda: center.api.request("GET", "/api/rollouts?status=nope")).status == 422


def test_revoked_clients_are_never_targets(center: DeployCenter, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    center.start_agent("gone-1", config='[agent]\nlabels = {role = "web", zone = "z1"}\n')
    center.api.request("POST", "/api/clients/gone-1/revoke")
    err = refusal(
        lambda: center.api.request(
            "POST",
            "/api/rollouts",
            json={
                "type": "shell",
                "request": {"script": "true"},
                "targets": {"clients": ["gone-1"]},
            },
        )
    )
    assert err.status == 422 and "revoked" in str(err)
    rollout_id = start(
        center,
        WHO + f'echo "$host" >> {log}',
        targets={"selector": {"zone": "z1"}},
        strategy={"max_parallel": 4},
    )
    done = wait_for(center, rollout_id, FINAL)
    assert done["status"] == "succeeded" and done["total"] == 4
    assert "gone-1" not in {t["client_id"] for t in targets(done)}
    assert runs(log) == Counter(dict.fromkeys(["web-01", "web-04", "web-07", "web-10"], 1))
    assert center.api.request("GET", "/api/deploy/gone-1/list")["total"] == 0


def test_an_offline_host_counts_as_failed_after_its_limit(
    center: DeployCenter, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    center.stop_agent("web-02")
    center.wait_connected("web-02", connected=False)
    try:
        rollout_id = start(
            center,
            WHO + f'echo "$host" >> {log}',
            targets={"selector": {"zone": "z2"}},
            strategy={"max_parallel": 4, "max_failures": 1, "offline_timeout": 2},
        )
        done = wait_for(center, rollout_id, FINAL, timeout=60)
    finally:
        center.start_agent("web-02", config=agent_config(2))
    assert done["status"] == "succeeded", done
    web02 = next(t for t in targets(done) if t["client_id"] == "web-02")
    assert web02["state"] == "failed" and web02["error"].startswith("offline")
    assert web02["deploy_id"] is None
    assert done["failures"] == 1 and done["counts"] == {"not_started": 1, "success": 3}
    assert runs(log) == Counter(dict.fromkeys(["web-05", "web-08", "web-11"], 1))


def test_busy_targets_are_skipped_or_waited_for(center: DeployCenter, tmp_path: Path) -> None:
    log = tmp_path / "runs"
    gate = tmp_path / "gate"
    holder = center.deploy(
        "shell",
        "web-03",
        script=f"i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
    )
    try:
        pair = {"clients": ["web-03", "web-04"]}
        skipped = start(
            center,
            WHO + f'echo "$host" >> {log}',
            targets=pair,
            strategy={"max_parallel": 2, "busy": "skip"},
        )
        done = wait_for(center, skipped, FINAL, timeout=60)
        assert done["status"] == "succeeded" and done["counts"] == {"skipped": 1, "success": 1}
        web03 = targets(done)[0]
        assert web03["state"] == "skipped" and web03["error"] == f"busy with {holder}"
        waited = start(
            center,
            WHO + f'echo "$host" >> {log}',
            targets=pair,
            strategy={"max_parallel": 2, "busy_timeout": 1, "max_failures": 1},
        )
        done = wait_for(center, waited, FINAL, timeout=60)
        assert done["status"] == "succeeded" and done["failures"] == 1
        web03 = targets(done)[0]
        assert web03["state"] == "failed" and web03["error"].startswith(f"busy with {holder}")
        assert runs(log) == Counter({"web-04": 2})
    finally:
        gate.touch()
        center.wait(holder)


def test_a_batch_past_its_progress_deadline_fails_the_rollout(
    center: DeployCenter, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = f"i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    rollout_id = start(
        center,
        script,
        targets={"clients": ["web-08", "web-09", "web-10"]},
        strategy={"batch_size": 2, "progress_deadline": "1s"},
    )
    try:
        wait_until(lambda: view(center, rollout_id)["reason"] is not None, 60, "past its deadline")
        assert view(center, rollout_id)["status"] == "running"  # its deployments still run
    finally:
        gate.touch()
    done = wait_for(center, rollout_id, FINAL, timeout=60)
    assert done["status"] == "failed"
    assert "batch 0 did not finish within its progress deadline of 1 s" in done["reason"]
    assert done["counts"] == {"skipped": 1, "success": 2}


def test_rolling_back_what_cannot_be_rolled_back_fails(center: DeployCenter) -> None:
    rollout_id = start(
        center,
        WHO + 'case "$host" in web-11) exit 1;; esac',
        request={"rollback": False},
        targets={"clients": ["web-10", "web-11"]},
        strategy={"on_failure": "rollback"},
    )
    done = wait_for(center, rollout_id, FINAL, timeout=60)
    assert done["status"] == "failed", done
    web10 = targets(done)[0]
    assert web10["status"] == "success" and web10["rollback_id"] is None
    assert "no restorable state" in web10["rollback_error"]
    assert "not rolled back: web-10" in done["history"][-1]["message"]


def test_scopes(center: DeployCenter) -> None:
    from deploy_core.client import DeployClient

    token = center.api.request("POST", "/api/tokens", json={"name": "viewer", "scope": "read"})
    reader = DeployClient(f"http://127.0.0.1:{center.api_port}", token["token"], timeout=30)
    try:
        assert reader.request("GET", "/api/rollouts")["total"] >= 1
        body = {"type": "shell", "request": {"script": "true"}, "targets": {"clients": ["web-01"]}}
        assert refusal(lambda: reader.request("POST", "/api/rollouts", json=body)).status == 403
        some = reader.request("GET", "/api/rollouts")["items"][0]["rollout_id"]
        assert refusal(lambda: reader.request("POST", f"/api/rollouts/{some}/abort")).status == 403
    finally:
        reader.close()


def test_secrets_reach_every_target_and_stay_out_of_the_rollout(
    center: DeployCenter, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    secret = "s3cret-" + uuid.uuid4().hex
    digest = hashlib.sha256(f"{secret}\n".encode()).hexdigest()
    rollout_id = start(
        center,
        WHO + f'echo "$host-$(echo "$TOKEN" | sha256sum | cut -d" " -f1)" >> {log}',
        request={"secret_env": {"TOKEN": secret}},
        targets={"clients": ["web-01", "web-02"]},
        strategy={"max_parallel": 2},
    )
    done = wait_for(center, rollout_id, FINAL, timeout=60)
    assert done["status"] == "succeeded"
    assert runs(log) == Counter({f"web-01-{digest}": 1, f"web-02-{digest}": 1})
    assert done["request"]["secret_env_names"] == ["TOKEN"]
    assert secret not in json.dumps(done)
    assert secret not in json.dumps(center.api.request("GET", "/api/rollouts"))
    stored = b"".join(p.read_bytes() for p in center.server_dir.glob("deploy-center.db*"))
    assert secret.encode() not in stored  # sealed while it ran, deleted once it ended


def test_server_killed_while_rolling_back_undoes_each_host_once(
    center: DeployCenter, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (
        WHO + f'if [ "$DEPLOY_ACTION" = rollback ]; then echo "undo-$host" >> {log}; sleep 2; '
        f'rm {marks}/"$host"; exit 0; fi\n'
        + f'echo "$host" >> {log}; touch {marks}/"$host"\n'
        + 'case "$host" in web-03) exit 3;; esac\n'
    )
    rollout_id = start(
        center,
        script,
        request={"rollback": {"strategy": "inline"}},
        targets={"clients": ["web-01", "web-02", "web-03", "web-04"]},
        strategy={"batch_size": 2, "on_failure": "rollback"},
    )
    wait_until(lambda: any(h.startswith("undo-web-0") for h in runs(log)), 90, "rolling back")
    center.stop_server(signal.SIGKILL)
    center.start_server()
    done = wait_for(center, rollout_id, FINAL, timeout=180)
    assert done["status"] == "rolled_back", done
    # Batches web-01/02, web-03/04: web-03 failed and rolled itself back (inline); the
    # three that succeeded were undone by the rollout, each once, across the restart.
    hosts = ["web-01", "web-02", "web-03", "web-04"]
    assert runs(log) == Counter(dict.fromkeys(hosts + [f"undo-{h}" for h in hosts], 1))
    assert sorted(p.name for p in marks.iterdir()) == []
    states = {t["client_id"]: t for t in targets(done)}
    for host in ("web-01", "web-02", "web-04"):
        assert states[host]["status"] == "success"
        assert states[host]["rollback_status"] == "rolled_back"
    assert states["web-03"]["status"] == "rolled_back"


# Last: it restarts the module's server.
def test_server_killed_mid_rollout_continues_without_running_a_host_twice(
    center: DeployCenter, tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    script = WHO + f'echo "$host" >> {log}; sleep 1'
    rollout_id = start(center, script, strategy={"batch_size": 2})
    wait_until(lambda: len(runs(log)) >= 3, 60, "second batch started")
    center.stop_server(signal.SIGKILL)
    center.start_server()
    done = wait_for(center, rollout_id, FINAL, timeout=240)
    assert done["status"] == "succeeded", done
    assert runs(log) == Counter(dict.fromkeys(HOSTS, 1))
    assert done["counts"] == {"success": 12}
    # Every target's deployment is the one the rollout chose for it.
    for t in targets(done):
        assert (
            center.api.request("GET", f"/api/deploy/{t['deploy_id']}")["client_id"]
            == (t["client_id"])
        )

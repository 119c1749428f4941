"""``deployctl … --json``: every command that shows something has it (checked on the whole
command tree, plugins' commands included), and each prints what docs/user-guide.md
("Scripting with --json") promises, against a real server and agent; an error prints
nothing on stdout."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.client import DeployClient
from deploy_core.testing import DeployCenter

# Commands with nothing to read: they act (and say what they did), or run until stopped.
# Reviewed: a command that shows something does not belong here, it takes --json.
NO_READ_OUTPUT = {
    "agent": "runs an agent until stopped",
    "server": "runs the server until stopped",
    "up": "runs a server and an agent until stopped",
    "db prune": "deletes old deployments; one count line for people",
    "db upgrade": "migrates the schema; one line for people",
    "cluster key": "writes a new cluster key file; says where, for people",
    "deploy submit": "starts a deployment; prints the API's JSON answer already",
    "deploy shell": "starts a deployment; prints the API's JSON answer already",
    "deploy tar": "starts a deployment; prints the API's JSON answer already",
    "deploy docker": "starts a deployment; prints the API's JSON answer already",
    "rollback": "starts a rollback; prints the API's JSON answer already",
    "rollout submit": "starts a rollout; prints the API's JSON answer already",
    "rollout shell": "starts a rollout; prints the API's JSON answer already",
    "rollout tar": "starts a rollout; prints the API's JSON answer already",
    "rollout docker": "starts a rollout; prints the API's JSON answer already",
    "rollout pause": "acts on a rollout",
    "rollout resume": "acts on a rollout",
    "rollout promote": "acts on a rollout",
    "rollout abort": "acts on a rollout",
    "token create": "prints the new token's value alone on stdout",
    "token revoke": "acts",
    "clients revoke": "acts",
    "clients forget": "acts",
    "webhook ping": "acts (the delivery shows in webhook deliveries --json)",
    "webhook remove": "acts",
}
# A command named so shows something, whatever the list above says.
READ_WORDS = {
    "list", "show", "status", "ps", "logs", "get", "describe", "info", "inspect", "history",
    "deliveries", "plugins", "clients", "stats", "top", "events", "version",
}  # fmt: skip
# Registered by the plugins installed with the core: the walk must see them.
PLUGIN_COMMANDS = {"deploy shell", "deploy tar", "deploy docker", "docker ps"}


def _commands() -> dict[str, click.Command]:
    """Every command ``deployctl`` runs, by its words, plugins' included (a group that runs
    on its own, as ``clients``, counts as a command too)."""
    found: dict[str, click.Command] = {}

    def walk(command: click.Command, words: list[str], parent: click.Context | None) -> None:
        ctx = click.Context(command, info_name=words[-1] if words else "deployctl", parent=parent)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, f"deployctl {' '.join(words)} lists {name} but has none"
                walk(sub, [*words, name], ctx)
            if not command.invoke_without_command:
                return
        found[" ".join(words)] = command

    walk(main, [], None)
    return found


def _json_flag(command: click.Command) -> click.Parameter | None:
    return next((p for p in command.params if "--json" in getattr(p, "opts", ())), None)


def test_every_command_that_shows_something_has_the_shared_json_flag() -> None:
    commands = _commands()
    assert set(commands) >= PLUGIN_COMMANDS, "a plugin installed with the core is not loaded"
    missing = sorted(
        name
        for name in commands
        if name not in NO_READ_OUTPUT and _json_flag(commands[name]) is None
    )
    assert not missing, f"read commands without --json (add json_option): {missing}"
    reference = _json_flag(commands["list"])
    assert isinstance(reference, click.Option)
    for name, command in commands.items():
        flag = _json_flag(command)
        if flag is None:
            continue
        # The one json_option: same name, a flag, the same help everywhere.
        assert isinstance(flag, click.Option) and flag.is_flag, name
        assert (flag.name, flag.help) == (reference.name, reference.help), name


def test_the_allow_list_is_reviewed_and_current() -> None:
    commands = _commands()
    assert not set(NO_READ_OUTPUT) - set(commands), "allow-listed commands that do not exist"
    for name in NO_READ_OUTPUT:
        assert name.split()[-1] not in READ_WORDS, f"{name} shows something: give it --json"
        assert _json_flag(commands[name]) is None, f"{name} has --json: drop it from the list"


def test_the_user_guide_says_what_each_json_command_prints() -> None:
    guide = (Path(__file__).parent.parent / "docs" / "user-guide.md").read_text()
    section = guide.split("### Scripting with `--json`", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = set()
    for row in rows:
        usage = row.split("`")[1]  # e.g. "rollout status ROLLOUT_ID [--wait]"
        words = [w for w in usage.split() if w.islower() and w.isalpha()]
        documented.add(" ".join(words))
    with_json = {name for name, command in _commands().items() if _json_flag(command)}
    # "clients [list]" stands for both.
    assert with_json - documented - {"clients list"} == set()
    assert documented - with_json == set(), "the guide lists commands that have no --json"


def test_a_new_read_command_without_the_flag_fails_the_walk(monkeypatch: Any) -> None:
    @click.command("probe-list")
    def probe() -> None:
        """Shows something."""

    monkeypatch.setitem(main.commands, "probe-list", probe)
    commands = _commands()
    assert "probe-list" in commands and _json_flag(commands["probe-list"]) is None
    with pytest.raises(AssertionError, match="probe-list"):
        test_every_command_that_shows_something_has_the_shared_json_flag()


# --------------------------------------------------------------------------- a real server

CLIENT = "json-1"
# An escape sequence, a bell, a quote and non-ASCII text: JSON escapes what a terminal would
# obey, and json.loads gives the exact text back.
HOSTILE_LINE = 'x \x1b]52;c;Zm9v\x07 "q" é ✓'


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployCenter]:
    c = DeployCenter(tmp_path_factory.mktemp("json"))
    try:
        c.start_server()
        c.start_agent(CLIENT)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def finished(center: DeployCenter) -> str:
    deploy_id = center.deploy(
        "shell",
        CLIENT,
        script="echo one; echo two >&2; printf 'x \\033]52;c;Zm9v\\007 \"q\" é ✓\\n'",
    )
    assert center.wait(deploy_id)["status"] == "success"
    return deploy_id


def run_json(center: DeployCenter, *args: str) -> Any:
    """``deployctl ARGS --json``: the one JSON document on stdout (exit 0)."""
    ran = center.deployctl(*args, "--json")
    assert ran.returncode == 0, ran.stderr
    assert "\x1b" not in ran.stdout
    return json.loads(ran.stdout)


def test_status_is_the_api_record(center: DeployCenter, finished: str) -> None:
    assert run_json(center, "status", finished) == center.api.get(finished)
    with_history = run_json(center, "status", finished, "--history")
    assert with_history["deploy_id"] == finished
    assert [r["status"] for r in with_history["history"]][-1] == "success"
    assert with_history["history"] == center.api.history(finished)


def test_list_is_the_api_page(center: DeployCenter, finished: str) -> None:
    page = run_json(center, "list", "--client", CLIENT, "--status", "success")
    assert page["total"] >= 1
    assert finished in [item["deploy_id"] for item in page["items"]]
    assert all(item["status"] == "success" for item in page["items"])


def test_clients_is_the_api_list(center: DeployCenter) -> None:
    for words in (["clients"], ["clients", "list"]):
        clients = run_json(center, *words)
        (mine,) = [c for c in clients if c["client_id"] == CLIENT]
        assert mine["connected"] is True
        assert "deploy.shell" in mine["capabilities"]["deploy_types"]


def test_logs_are_json_lines_as_the_api_gives_them(center: DeployCenter, finished: str) -> None:
    ran = center.deployctl("logs", finished, "--json")
    assert ran.returncode == 0, ran.stderr
    assert "\x1b" not in ran.stdout and "\x07" not in ran.stdout
    lines = [json.loads(raw) for raw in ran.stdout.splitlines()]
    assert lines == center.api.logs(finished)["lines"]
    # stdout and stderr are read apart: each in its order, not one against the other.
    assert [(x["stream"], x["line"]) for x in lines if x["stream"] == "stdout"] == [
        ("stdout", "one"),
        ("stdout", HOSTILE_LINE),
    ]
    assert [x["line"] for x in lines if x["stream"] == "stderr"] == ["two"]
    followed = center.deployctl("logs", finished, "--json", "--follow")
    assert followed.returncode == 0, followed.stderr
    assert [json.loads(raw) for raw in followed.stdout.splitlines()] == lines
    assert "deployment ended: success" in followed.stderr


def test_logs_json_of_bytes_that_are_not_utf8_is_strict_json(center: DeployCenter) -> None:
    deploy_id = center.deploy("shell", CLIENT, script=r"printf 'bad \377\376 bytes\n'")
    assert center.wait(deploy_id)["status"] == "success"
    ran = center.deployctl("logs", deploy_id, "--json")
    assert ran.returncode == 0, ran.stderr
    (line,) = [json.loads(raw) for raw in ran.stdout.splitlines()]
    assert line["line"].startswith("bad ") and line["line"].endswith(" bytes")
    line["line"].encode("utf-8")  # no lone surrogate, which strict parsers (jq) refuse


def _lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Each stdout line of ``proc`` as it comes (``None`` at the end)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_logs_json_follow_streams_each_line_as_it_comes(
    center: DeployCenter, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = (
        f"echo first; i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); "
        f"done; echo second"
    )
    deploy_id = center.deploy("shell", CLIENT, script=script)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy_core.cli", "logs", deploy_id, "--json", "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=center.cli_env(),
    )
    try:
        lines = _lines_of(proc)
        first = lines.get(timeout=60)
        assert first is not None, proc.stderr.read() if proc.stderr else ""
        assert json.loads(first)["line"] == "first"
        # The script is still waiting for us: the line came while it ran.
        assert center.api.get(deploy_id)["finished"] is False
        go.touch()
        rest = []
        while (line := lines.get(timeout=60)) is not None:
            rest.append(json.loads(line))
        assert [x["line"] for x in rest] == ["second"]
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None and "deployment ended: success" in proc.stderr.read()
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert center.wait(deploy_id)["status"] == "success"


def test_logs_follow_reads_on_when_the_server_ends_its_stream(
    center: DeployCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends a follow after max_wait (an hour by default; a second here) with
    {"end": false, "next_after": N}: deployctl reads on from there, no line lost or twice."""
    original = DeployClient.follow_logs
    calls: list[int] = []

    def following(self: DeployClient, deploy_id: str, *, after: int = 0) -> Any:
        calls.append(after)
        return original(self, deploy_id, after=after, max_wait=1)

    monkeypatch.setattr(DeployClient, "follow_logs", following)
    deploy_id = center.deploy("shell", CLIENT, script="echo a; sleep 2.5; echo b")
    token = (center.server_dir / "admin.token").read_text().strip()
    url = f"http://127.0.0.1:{center.api_port}"
    result = CliRunner().invoke(
        main, ["logs", deploy_id, "--json", "-f", "--url", url, "--token", token]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(raw)["line"] for raw in result.stdout.splitlines()] == ["a", "b"]
    assert len(calls) >= 2 and calls[0] == 0 and calls[-1] >= 1, calls
    assert "deployment ended: success" in result.stderr


def test_token_list_never_shows_a_value(center: DeployCenter) -> None:
    made = center.api.request("POST", "/api/tokens", json={"name": "ci-json", "scope": "read"})
    join = center.api.request("POST", "/api/join-tokens", json={"uses": 2, "note": "web-9"})
    ran = center.deployctl("token", "list", "--json")
    assert ran.returncode == 0, ran.stderr
    assert made["token"] not in ran.stdout and join["token"] not in ran.stdout
    listed = json.loads(ran.stdout)
    assert set(listed) == {"tokens", "join_tokens"}
    assert listed["tokens"] == center.api.request("GET", "/api/tokens")["tokens"]
    (ci,) = [t for t in listed["tokens"] if t["name"] == "ci-json"]
    assert ci["scope"] == "read" and isinstance(ci["created_at"], str)
    (mine,) = [t for t in listed["join_tokens"] if t["token_id"] == join["token_id"]]
    assert mine["uses_left"] == 2 and mine["note"] == "web-9"
    assert not any("hash" in key for t in listed["join_tokens"] for key in t)
    table = center.deployctl("token", "list")
    assert table.returncode == 0, table.stderr
    assert "ci-json" in table.stdout and join["token_id"] in table.stdout
    assert made["token"] not in table.stdout and join["token"] not in table.stdout


def test_plugins_here_and_on_the_server(center: DeployCenter) -> None:
    here = run_json(center, "plugins")
    on_server = run_json(center, "plugins", "--server")
    assert on_server == center.api.plugins()
    for described in (here, on_server):
        by_name = {p["name"]: p for p in described}
        assert by_name["deploy_shell"]["deploy_types"] == ["deploy.shell"]
        assert "deploy_register_deploy_types" in by_name["deploy_shell"]["hooks"]
    table = center.deployctl("plugins")
    assert table.returncode == 0 and "deploy.shell" in table.stdout
    with pytest.raises(ValueError):
        json.loads(table.stdout)  # for people; scripts use --json


def test_docker_ps_is_the_monitor_view(center: DeployCenter) -> None:
    view = run_json(center, "docker", "ps", "--client", CLIENT)
    assert view["client_id"] == CLIENT
    assert isinstance(view["containers"], list)
    assert set(view) == set(center.api.request("GET", f"/api/docker/monitor/{CLIENT}"))


def test_rollout_status_and_list(center: DeployCenter) -> None:
    made = center.api.create_rollout(
        {"type": "shell", "request": {"script": "echo r"}, "targets": {"clients": [CLIENT]}}
    )
    rollout_id = made["rollout_id"]
    final = run_json(center, "rollout", "status", rollout_id, "--wait", "--wait-timeout", "120")
    assert final["rollout_id"] == rollout_id and final["status"] == "succeeded"
    assert run_json(center, "rollout", "status", rollout_id) == center.api.rollout(rollout_id)
    page = run_json(center, "rollout", "list", "--client", CLIENT)
    assert rollout_id in [item["rollout_id"] for item in page["items"]]


def test_rollout_status_wait_json_of_a_failed_rollout_exits_1_with_the_record(
    center: DeployCenter,
) -> None:
    made = center.api.create_rollout(
        {
            "type": "shell",
            "request": {"script": "exit 3", "rollback": False},
            "targets": {"clients": [CLIENT]},
        }
    )
    ran = center.deployctl(
        "rollout", "status", made["rollout_id"], "--wait", "--wait-timeout", "120", "--json"
    )
    assert ran.returncode == 1, ran.stderr
    final = json.loads(ran.stdout)  # the record, and nothing else, on stdout
    assert final["rollout_id"] == made["rollout_id"] and final["status"] != "succeeded"
    assert final == center.api.rollout(made["rollout_id"])


def test_webhook_list_and_deliveries(center: DeployCenter) -> None:
    # Nothing is ever sent: no rollout finishes after it is added (and it is loopback).
    hook = center.api.add_webhook("https://127.0.0.1:9/hook", ["rollout.finished"], "s" * 32)
    try:
        hooks = run_json(center, "webhook", "list")
        (mine,) = [h for h in hooks if h["id"] == hook["id"]]
        assert mine["url"] == "https://127.0.0.1:9/hook"
        assert "s" * 32 not in json.dumps(hooks)
        assert run_json(center, "webhook", "deliveries", hook["id"]) == []
    finally:
        center.api.remove_webhook(hook["id"])


def test_artifact_show(center: DeployCenter, tmp_path: Path) -> None:
    package = tmp_path / "p.bin"
    package.write_bytes(b"json" * 1000)
    pushed = run_json(center, "artifact", "push", str(package))
    shown = run_json(center, "artifact", "show", pushed["sha256"])
    assert shown == center.api.artifact(pushed["sha256"]) and shown["size"] == 4000


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["status", "0" * 32], 1, "no deployment"),
        (["logs", "0" * 32], 1, "no deployment"),
        (["logs", "0" * 32, "--follow"], 1, "no deployment"),
        (["rollout", "status", "nope"], 1, "Error"),
        (["docker", "ps", "--client", "nobody"], 1, "unknown client"),
        (["docker", "ps", "--client", "../../deploy/x"], 2, "not a client id"),
        (["docker", "ps", "--client", "a/b"], 2, "not a client id"),
        # An id is one path segment: these read /api/clients, /api/ and /api/info before.
        (["status", "../clients"], 1, "HTTP 404"),
        (["status", ".."], 1, "HTTP 404"),
        (["logs", "../../info"], 1, "HTTP 404"),
        (["list", "--client", "../../info#"], 1, "HTTP 404"),
        (["artifact", "show", "../info"], 1, "HTTP 404"),
        (["list", "--limit", "0"], 2, "--limit"),
        (["clients", "--state", "sleeping"], 2, "--state"),
    ],
)
def test_an_error_is_on_stderr_and_stdout_stays_empty(
    center: DeployCenter, args: list[str], code: int, said: str
) -> None:
    ran = center.deployctl(*args, "--json")
    assert ran.returncode == code, (ran.stdout, ran.stderr)
    assert ran.stdout == ""
    assert said in ran.stderr


def test_a_name_to_revoke_cannot_reach_another_endpoint(center: DeployCenter) -> None:
    """``token revoke --join ../tokens/NAME`` once meant DELETE /api/tokens/NAME: an API
    token revoked when a join token was named."""
    center.api.request("POST", "/api/tokens", json={"name": "victim", "scope": "read"})
    ran = center.deployctl("token", "revoke", "--join", "../tokens/victim")
    assert ran.returncode == 1 and "404" in ran.stderr, (ran.stdout, ran.stderr)
    names = [t["name"] for t in center.api.request("GET", "/api/tokens")["tokens"]]
    assert "victim" in names


def test_an_unreachable_server_is_an_error_too(center: DeployCenter) -> None:
    ran = center.deployctl("token", "list", "--json", "--url", "http://127.0.0.1:9")
    assert ran.returncode == 1 and ran.stdout == ""
    assert "cannot reach the server" in ran.stderr

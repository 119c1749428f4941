"""``deployctl rollout``: its options parsed into the request docs/rollouts.md describes, the
commands made from ``deployctl deploy KIND``, bad input refused by click (exit 2, no
traceback), and a rollout record (the documented shape) rendered for a person.

The commands against a real server and agents are in tests/e2e/test_cli_rollouts_e2e.py.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.cli.rollout_display import (
    batch_lines,
    counts_text,
    failing_hosts,
    render,
    rollback_lines,
    summary_line,
)
from deploy_core.cli.rollout_options import (
    CountOrPercent,
    Duration,
    parse_selector,
    rollout_fields,
)
from deploy_core.cli.rollouts import rollout_command

# Nothing listens there: a command that got as far as calling the API would say so.
NOWHERE = ["--url", "http://127.0.0.1:9", "--token", "t"]


def _options(**given: Any) -> dict[str, Any]:
    """The keyword arguments a rollout command receives, with ``given`` set."""
    values: dict[str, Any] = {
        "rollout_clients": (),
        "selector": (),
        "batch_size": None,
        "max_parallel": None,
        "canary": None,
        "canary_action": None,
        "max_failures": None,
        "on_failure": None,
        "progress_deadline": None,
        "busy": None,
        "busy_timeout": None,
        "offline_timeout": None,
        "script": "true",  # the deploy command's own: left in place
    }
    values.update(given)
    return values


@pytest.mark.parametrize(
    ("text", "minimum", "value"),
    [("3", 1, 3), ("10%", 1, "10%"), (" 100% ", 1, "100%"), ("0", 0, 0), ("0%", 0, "0%")],
)
def test_counts_and_percentages_are_read_as_the_api_takes_them(
    text: str, minimum: int, value: int | str
) -> None:
    assert CountOrPercent(minimum).convert(text, None, None) == value


@pytest.mark.parametrize(
    ("text", "minimum", "message"),
    [
        ("150%", 1, "a percentage must be 1% to 100%, got 150%"),
        ("0%", 1, "a percentage must be 1% to 100%, got 0%"),
        ("0", 1, "must be at least 1, got 0"),
        ("-2", 0, "expected a number of hosts (3) or a percentage (10%)"),
        ("2.5%", 1, "expected a number of hosts"),
        ("ten", 1, "expected a number of hosts"),
        ("%", 1, "expected a number of hosts"),
        ("", 1, "expected a number of hosts"),
    ],
)
def test_bad_counts_and_percentages_say_what_is_expected(
    text: str, minimum: int, message: str
) -> None:
    with pytest.raises(click.BadParameter, match=message.replace("(", r"\(").replace(")", r"\)")):
        CountOrPercent(minimum).convert(text, None, None)


def test_durations_accept_units_and_zero_only_where_it_means_something() -> None:
    assert Duration().convert("10m", None, None) == 600
    assert Duration().convert("90", None, None) == 90
    assert Duration(zero=True).convert("0", None, None) == 0
    assert Duration(zero=True).convert("0s", None, None) == 0
    for bad in ("0", "nan", "inf", "-5m", "soon", ""):
        with pytest.raises(click.BadParameter):
            Duration().convert(bad, None, None)


def test_a_selector_is_pairs_separated_by_commas_or_repeated() -> None:
    assert parse_selector(("role=web,zone=eu-1",)) == {"role": "web", "zone": "eu-1"}
    assert parse_selector(("role=web", "zone=eu-1", "role=web")) == {
        "role": "web",
        "zone": "eu-1",
    }
    assert parse_selector(()) == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (("role",), "expected key=value"),
        (("role=web", "role=db"), "names 'role' twice"),
        (("=web",), "invalid key ''"),
        (("ro le=web",), "invalid key 'ro le'"),
        (("role=w\x1bb",), "invalid value"),
        (("role=web,,zone=eu",), "expected key=value"),
    ],
)
def test_bad_selectors_are_refused_with_the_rule(values: tuple[str, ...], message: str) -> None:
    with pytest.raises(click.BadParameter, match=message) as caught:
        parse_selector(values)
    assert "--selector KEY=VALUE" in caught.value.message


def test_targets_and_strategy_leave_out_what_was_not_given() -> None:
    options = _options(
        rollout_clients=("web-2", "web-1", "web-2"),
        selector=("role=web",),
        batch_size="25%",
        canary=1,
        canary_action="pause",
        max_failures=0,
        on_failure="rollback",
        progress_deadline=600.0,
        offline_timeout=0.0,
    )
    targets, strategy = rollout_fields(options)
    assert targets == {"clients": ["web-2", "web-1"], "selector": {"role": "web"}}
    assert strategy == {
        "batch_size": "25%",
        "canary": 1,
        "canary_action": "pause",
        "max_failures": 0,  # zero is a value, not "not given"
        "on_failure": "rollback",
        "progress_deadline": 600.0,
        "offline_timeout": 0.0,
    }
    assert options == {"script": "true"}  # the deploy command's own options stay


def test_a_rollout_needs_targets_and_a_canary_for_its_action() -> None:
    with pytest.raises(click.UsageError, match="name the targets"):
        rollout_fields(_options())
    with pytest.raises(click.UsageError, match="--canary-action needs --canary"):
        rollout_fields(_options(selector=("a=b",), canary_action="continue"))


def test_rollout_commands_have_the_deploy_commands_options_plus_targets_and_strategy() -> None:
    ctx = click.Context(main)
    deploy_group = main.get_command(ctx, "deploy")
    rollout_group = main.get_command(ctx, "rollout")
    assert isinstance(deploy_group, click.Group) and isinstance(rollout_group, click.Group)
    kinds = deploy_group.list_commands(ctx)
    assert "submit" in kinds
    listed = rollout_group.list_commands(ctx)
    for name in ("status", "list", "pause", "resume", "promote", "abort", *kinds):
        assert name in listed
    for kind in kinds:
        deploy_cmd = deploy_group.get_command(ctx, kind)
        rollout_cmd = rollout_group.get_command(ctx, kind)
        assert deploy_cmd is not None and rollout_cmd is not None
        deploy_opts = {o for p in deploy_cmd.params for o in p.opts}
        rollout_opts = {o for p in rollout_cmd.params for o in p.opts}
        assert deploy_opts - {"--client"} <= rollout_opts, kind
        assert {"--client", "--selector", "--batch", "--max-parallel", "--canary"} <= rollout_opts
        assert {"--max-failures", "--on-failure", "--progress-deadline", "--busy"} <= rollout_opts
        assert {"--offline-timeout", "--wait", "--wait-timeout"} <= rollout_opts
        client = next(p for p in rollout_cmd.params if p.name == "rollout_clients")
        assert client.multiple and not client.required


def _hostile_command(**extra: Any) -> click.Command:
    @click.command("odd")
    @click.option("--client", "client_id", required=True)
    @click.option("--wait", is_flag=True)
    @click.option("--wait-timeout", type=float, default=10)
    def odd(client_id: str | None, wait: bool, wait_timeout: float, **rest: Any) -> None:
        click.echo(f"ran with client_id={client_id}")

    for decls in extra.values():
        odd = click.option(*decls)(odd)
    return odd


def test_a_deploy_command_with_an_option_named_like_a_rollout_option_gets_no_rollout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clashing = _hostile_command(batch=("--batch",))
    assert rollout_command(clashing) is None
    assert "deployctl deploy odd has options named like rollout options (batch)" in caplog.text


def test_a_group_under_deploy_gets_no_rollout_command() -> None:
    @click.group("things")
    def things() -> None:
        """Several commands."""

    assert rollout_command(things) is None


def test_a_deploy_command_that_does_not_submit_through_the_helper_is_not_faked() -> None:
    derived = rollout_command(_hostile_command())
    assert derived is not None
    result = CliRunner().invoke(derived, ["--selector", "role=web"])
    assert result.exit_code == 1
    assert "ran with client_id=None" in result.output  # its code ran, without a client
    assert "does not send its request through submit_and_follow" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["shell", "--selector", "role=web", "--script", "x", "--batch", "150%"], "1% to 100%"),
        (["shell", "--selector", "role=web", "--script", "x", "--batch", "0"], "at least 1"),
        (["shell", "--selector", "role=web", "--script", "x", "--max-failures", "-1"], "a number"),
        (["shell", "--selector", "role", "--script", "x"], "expected key=value"),
        (["shell", "--selector", "role=web;rm", "--script", "x"], "invalid value"),
        (["shell", "--script", "x"], "name the targets"),
        (["shell", "--client", "a", "--script", "x", "--busy", "maybe"], "'maybe' is not one of"),
        (["shell", "--client", "a", "--script", "x", "--progress-deadline", "0"], "positive"),
        (["nosuchtype", "--client", "a"], "No such command 'nosuchtype'"),
        (["shell", "--client", "a"], "give --script or --script-file"),  # the plugin's check
        (["tar", "--client", "a", "--target-dir", "/srv"], "give exactly one of --package"),
        (["tar", "--client", "a"], "Missing option '--target-dir'"),  # still required
        (["shell", "--client", "a", "--script", "x", "--wait-timeout", "nan"], "finite"),
        (["status", "r1", "--wait", "--wait-timeout", "inf"], "finite"),
        (["list", "--status", "done"], "'done' is not one of"),
        (["submit", "shell", "-", "--client", "a", "--canary-action", "pause"], "needs --canary"),
        (["submit", "shell", "-", "--client", "a"], "the body names client_id 'web-9'"),
    ],
)
def test_bad_input_is_a_usage_error_not_a_traceback(args: list[str], message: str) -> None:
    body = '{"client_id": "web-9", "script": "true"}'
    result = CliRunner().invoke(main, ["rollout", *args, *NOWHERE], input=body)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # click's exit, not a crash
    assert "Traceback" not in result.output
    assert "cannot reach the server" not in result.output  # refused before any request


def _target(client: str, state: str, status: str | None, **more: Any) -> dict[str, Any]:
    return {
        "client_id": client,
        "deploy_id": f"d-{client}" if status else None,
        "state": state,
        "status": status,
        "error": None,
        "rollback_id": None,
        "rollback_status": None,
        **more,
    }


# GET /api/rollouts/{id} as docs/rollouts.md shows it: 12 targets, a canary, batches of 25 %,
# two failures past a budget of 1, the third batch still running.
RECORD: dict[str, Any] = {
    "rollout_id": "3f2a",
    "status": "running",
    "paused_for": None,
    "reason": None,
    "type": "shell",
    "total": 12,
    "failures": 2,
    "max_failures": 1,
    "current_batch": 2,
    "counts": {"success": 6, "failed": 1, "not_started": 1, "script_running": 1, "waiting": 3},
    "batches": [
        {
            "index": 0,
            "canary": True,
            "state": "done",
            "targets": [_target("w01", "done", "success")],
        },
        {
            "index": 1,
            "canary": False,
            "state": "done",
            "targets": [
                _target("w02", "done", "success"),
                _target("w03", "done", "failed", error="script exited with 3"),
                _target("w04", "done", "success"),
            ],
        },
        {
            "index": 2,
            "canary": False,
            "state": "running",
            "targets": [
                _target("w05", "done", "success"),
                _target("w06", "running", "script_running"),
                _target("w07", "failed", None, error="offline for 300 s"),
            ],
        },
        {
            "index": 3,
            "canary": False,
            "state": "waiting",
            "targets": [_target("w08", "waiting", None), _target("w09", "waiting", None)],
        },
        {
            "index": 4,
            "canary": False,
            "state": "waiting",
            "targets": [
                _target("w10", "done", "success"),
                _target("w11", "done", "success"),
                _target("w12", "waiting", None),
            ],
        },
    ],
}


def test_a_rollout_renders_as_a_line_per_batch_with_counts() -> None:
    lines = render(RECORD)
    assert lines[0] == (
        "rollout 3f2a running: 12 hosts, failures 2 of 1 allowed: success 6, "
        "script_running 1, waiting 3, not_started 1, failed 1"
    )
    assert lines[1:] == batch_lines(RECORD)
    assert [line.split()[0] for line in lines[1:]] == ["batch", "batch", ">batch", "batch", "batch"]
    assert lines[1] == "  batch 1/5 canary done       1 host   success 1"
    assert lines[2] == "  batch 2/5        done       3 hosts  success 2, failed 1"
    assert lines[3] == (
        " >batch 3/5        running    3 hosts  success 1, script_running 1, not_started 1"
    )
    assert lines[4] == "  batch 4/5        waiting    2 hosts  waiting 2"


def test_failing_hosts_are_listed_with_their_errors() -> None:
    assert failing_hosts(RECORD) == [
        "  w03  failed (deployment d-w03): script exited with 3",
        "  w07  not_started: offline for 300 s",
    ]
    assert rollback_lines(RECORD) == []


def test_a_failing_hosts_list_keeps_one_line_per_host() -> None:
    record = copy.deepcopy(RECORD)
    record["batches"][1]["targets"][1]["error"] = "script exited with code 3:\nline one\n\tline two"
    record["reason"] = "over\nbudget"
    assert failing_hosts(record, most=1) == [
        "  w03  failed (deployment d-w03): script exited with code 3: line one line two",
        "  … and 1 more (deployctl rollout status --json)",
    ]
    assert summary_line(record).endswith(" - over budget")


def test_a_paused_rollout_says_how_to_go_on() -> None:
    paused = {**RECORD, "status": "paused", "paused_for": "canary"}
    assert summary_line(paused).startswith("rollout 3f2a paused (canary): 12 hosts")
    assert render(paused)[-1] == (
        "  paused: deployctl rollout promote 3f2a to go on, deployctl rollout abort 3f2a to stop"
    )
    by_operator = {**RECORD, "status": "paused", "paused_for": "operator"}
    assert "deployctl rollout resume 3f2a" in render(by_operator)[-1]


def test_rolled_back_targets_and_the_reason_are_shown() -> None:
    record = copy.deepcopy(RECORD)
    record.update(status="rolled_back", reason="3 failures, more than the 1 allowed")
    record["batches"][0]["targets"][0].update(rollback_id="r-w01", rollback_status="rolled_back")
    assert summary_line(record).endswith(" - 3 failures, more than the 1 allowed")
    assert rollback_lines(record) == ["  w01  rollback r-w01: rolled_back"]
    record["batches"][1]["targets"][0]["rollback_error"] = "no rollback strategy\nfor deploy.shell"
    record["batches"][1]["targets"][2].update(
        rollback_id="r-w04", rollback_status="rollback_failed", rollback_error="exit 1"
    )
    assert rollback_lines(record) == [
        "  w01  rollback r-w01: rolled_back",
        "  w02  not rolled back: no rollback strategy for deploy.shell",
        "  w04  rollback r-w04: rollback_failed - exit 1",
    ]


def test_text_from_hosts_cannot_drive_the_terminal() -> None:
    record = copy.deepcopy(RECORD)
    record["batches"][1]["targets"][1]["error"] = "boom \x1b]52;c;Zm9v\x07 \x1b[2J"
    record["reason"] = "\r\x9bq"
    out = "\n".join([*render(record), *failing_hosts(record)])
    assert not any(c in out for c in ("\x1b", "\x07", "\r", "\x9b"))
    assert r"boom \x1b]52;c;Zm9v\x07 \x1b[2J" in out


def test_many_failures_are_counted_past_the_first_twenty() -> None:
    targets = [_target(f"h{i:03d}", "done", "failed", error="x") for i in range(45)]
    record = {
        **RECORD,
        "batches": [{"index": 0, "canary": False, "state": "done", "targets": targets}],
    }
    lines = failing_hosts(record)
    assert len(lines) == 21
    assert lines[-1] == "  … and 25 more (deployctl rollout status --json)"
    assert counts_text({}) == "no hosts"


def test_a_fleet_in_many_batches_folds_alike_batches_into_one_line() -> None:
    def batch(index: int, state: str, status: str | None) -> dict[str, Any]:
        target = _target(f"h{index:03d}", "done" if status else state, status)
        return {"index": index, "canary": index == 0, "state": state, "targets": [target]}

    batches = [batch(0, "done", "success")]
    batches += [batch(i, "done", "failed" if i == 20 else "success") for i in range(1, 40)]
    batches += [batch(40, "running", "script_running")]
    batches += [batch(i, "waiting", None) for i in range(41, 100)]
    record = {**RECORD, "current_batch": 40, "batches": batches}
    assert batch_lines(record) == [
        "  batch 1/100 canary done       1 host   success 1",
        "  batches 2-20/100 done      19 hosts  success 19",
        "  batch 21/100        done       1 host   failed 1",  # a failure keeps its own line
        "  batches 22-40/100 done      19 hosts  success 19",
        " >batch 41/100        running    1 host   script_running 1",
        "  batches 42-100/100 waiting   59 hosts  waiting 59",
    ]
    # Up to SHOWN_BATCHES, every batch has its line.
    assert len(batch_lines({**record, "batches": batches[:12]})) == 12


def _guide_commands() -> list[list[str]]:
    """The ``deployctl rollout …`` commands of docs/rollouts.md's shell blocks (optional
    parts' brackets dropped, comments dropped, ``;``, ``&&``, ``|`` separating commands)."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "rollouts.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", guide, re.S):
        text = block.replace("\\\n", " ").replace("[", " ").replace("]", " ")
        for line in text.splitlines():
            for part in re.split(r";|&&|\|\|?", line.split("#")[0]):
                words = shlex.split(part)
                if words[:2] == ["deployctl", "rollout"]:
                    commands.append(words[1:])
    return commands


GUIDE = _guide_commands()


def test_the_guide_shows_rollout_commands() -> None:
    assert len(GUIDE) >= 6, GUIDE


@pytest.mark.parametrize("args", GUIDE, ids=[" ".join(a[:2]) for a in GUIDE])
def test_a_rollout_command_in_the_guide_exists_with_its_options(args: list[str]) -> None:
    # Everything before --help is parsed (an unknown option is an error); nothing is sent.
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
@pytest.mark.parametrize(
    "args",
    [["deploy", "shell", "--client", "a", "--script", "x"], ["rollback", "d1"]],
    ids=["deploy shell", "rollback"],
)
def test_deploy_commands_refuse_a_wait_timeout_that_never_ends(args: list[str], value: str) -> None:
    """The same rule as rollout's --wait-timeout for the deploy commands (plugins' too:
    they pass it to submit_and_follow), before anything is sent."""
    result = CliRunner().invoke(main, [*args, "--wait", "--wait-timeout", value, *NOWHERE])
    assert result.exit_code == 2, result.output
    assert "--wait-timeout" in result.output and "positive, finite" in result.output
    assert "cannot reach the server" not in result.output


@pytest.mark.parametrize("args", GUIDE, ids=[" ".join(a[:2]) for a in GUIDE])
def test_a_rollout_command_in_the_guide_gets_as_far_as_the_server(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its values too are right: it runs (with the files it names) until it asks the
    server, which is not there."""
    monkeypatch.chdir(tmp_path)
    for name in ("app.tar.gz", "upgrade.sh"):
        (tmp_path / name).write_text("x")
    (tmp_path / "body.json").write_text('{"script": "true"}')
    result = CliRunner().invoke(main, [*args, *NOWHERE])
    assert result.exit_code == 1, result.output
    assert "cannot reach the server at http://127.0.0.1:9" in result.output

"""``deployctl webhook`` refuses bad input before sending anything, and ``[webhooks]`` of the
server configuration is checked before the server starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.cli.server_command import webhook_settings
from deploy_core.server.webhooks import WebhookSettings
from deploy_core.webhook_events import EVENTS

# Nothing listens there: a command that sent a request would say it cannot reach the server.
OFFLINE = ["--url", "http://127.0.0.1:9", "--token", "t"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ("deployment.finished,deployment.exploded", "unknown event 'deployment.exploded'"),
        (",,", "name at least one event"),
        ("agent.connected,\x1b[31mred", "unknown event"),
    ],
)
def test_bad_events_are_refused_before_any_request(
    tmp_path: Path, events: str, message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    code, output = run(
        "webhook", "add", "https://example.com/x", "--events", events,
        "--secret-file", str(secret), *OFFLINE,
    )  # fmt: skip
    assert code == 2 and message in output, output
    assert "cannot reach" not in output and "\x1b" not in output
    assert ", ".join(EVENTS) in output or "unknown" not in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\t\n", "is empty"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * 5000, "over 4096 bytes"),
    ],
)
def test_bad_secret_files_are_refused_before_any_request(
    tmp_path: Path, content: bytes, message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    code, output = run(
        "webhook", "add", "https://example.com/x", "--events", "deployment.finished",
        "--secret-file", str(secret), *OFFLINE,
    )  # fmt: skip
    assert code == 2 and message in output, output
    assert "cannot reach" not in output


def test_a_missing_secret_file_is_refused(tmp_path: Path) -> None:
    code, output = run(
        "webhook", "add", "https://example.com/x", "--events", "deployment.finished",
        "--secret-file", str(tmp_path / "nope"), *OFFLINE,
    )  # fmt: skip
    assert code == 2 and "cannot read" in output


def test_the_server_config_takes_a_webhooks_table(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[webhooks]\nallow_http_hosts = ["127.0.0.1"]\nmax_age = 3600\n')
    settings = webhook_settings(path)
    assert settings == WebhookSettings(allow_http_hosts=("127.0.0.1",), max_age=3600.0)
    assert webhook_settings(None) == WebhookSettings()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[webhooks]\nmax_age = "1d"\n', "max_age must be a number of seconds"),
        ("[webhooks]\nallow_http = true\n", "no setting allow_http"),
        ("webhooks = 3\n", "must be a table"),
    ],
)
def test_a_bad_webhooks_table_stops_the_server_before_it_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    code, output = run(
        "server", "--config", str(path), "--state-dir", str(tmp_path / "state"),
        "--api-port", "0", "--quic-port", "0",
    )  # fmt: skip
    assert code == 2 and message in output, output
    assert not (tmp_path / "state").exists()  # nothing was started

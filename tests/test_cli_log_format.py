"""``--log-format``: on the group, after ``server``/``agent``/``up``, or from
DEPLOY_CENTER_LOG_FORMAT; a wrong value is refused before anything starts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploy_core.cli import main
from deploy_core.logs import JsonFormatter


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _formatter() -> logging.Formatter | None:
    handlers = logging.getLogger().handlers
    assert len(handlers) == 1
    return handlers[0].formatter


def _agent(tmp_path: Path, *before: str, after: tuple[str, ...] = ()) -> list[str]:
    """An agent command line that stops at its bad --server, once logging is set up."""
    (tmp_path / "ca.pem").write_text("")
    return [
        *before,
        "agent",
        *after,
        *("--server", "no-port", "--client-id", "web-1"),
        *("--state-dir", str(tmp_path / "s"), "--ca", str(tmp_path / "ca.pem")),
    ]


@pytest.mark.parametrize(
    ("before", "after", "env"),
    [
        (("--log-format", "json"), (), {}),
        ((), ("--log-format", "json"), {}),
        ((), (), {"DEPLOY_CENTER_LOG_FORMAT": "json"}),
        (("--log-format", "text"), ("--log-format", "json"), {}),
    ],
)
def test_json_wherever_it_is_asked_for(
    tmp_path: Path, before: tuple[str, ...], after: tuple[str, ...], env: dict[str, str]
) -> None:
    result = CliRunner().invoke(main, _agent(tmp_path, *before, after=after), env=env)
    assert result.exit_code != 0  # the bad --server, after logging was set up
    assert isinstance(_formatter(), JsonFormatter)


def test_text_by_default(tmp_path: Path) -> None:
    CliRunner().invoke(main, _agent(tmp_path), env={"DEPLOY_CENTER_LOG_FORMAT": ""})
    formatter = _formatter()
    assert formatter is not None and not isinstance(formatter, JsonFormatter)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--log-format", "yaml"), {}),
        ((), {"DEPLOY_CENTER_LOG_FORMAT": "xml"}),
    ],
)
def test_a_wrong_format_is_refused(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    result = CliRunner().invoke(main, _agent(tmp_path, *args), env=env)
    assert result.exit_code == 2
    assert "'text', 'json'" in result.output or "text, json" in result.output


@pytest.mark.parametrize("command", ["server", "agent", "up"])
def test_the_long_running_commands_take_it(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--log-format [text|json]" in result.output

"""Agent labels: the config file's ``[agent] labels`` checked before the agent starts, sent
with its capabilities, and checked again by the server, which stores them apart from the
capabilities (and drops labels that break the rules)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click
import pytest

from deploy_core.cli import load_agent_settings
from deploy_core.plugins import load_plugins
from deploy_core.testing import in_process_center


def settings(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_agent_settings(path)


def test_labels_from_the_config_file(tmp_path: Path) -> None:
    text = '[agent]\nlabels = {role = "web", zone = "eu-1", "team/app" = ""}\n'
    assert settings(tmp_path, text)["labels"] == {"role": "web", "zone": "eu-1", "team/app": ""}
    assert settings(tmp_path, "")["labels"] == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[agent]\nlabels = {"bad key" = "x"}\n', "invalid key 'bad key'"),
        ('[agent]\nlabels = {role = "a b"}\n', "invalid value 'a b'"),
        ("[agent]\nlabels = {role = 3}\n", "must be a string"),
        ('[agent]\nlabels = "role=web"\n', "must be a table"),
        ('[agent]\nlabel = {role = "web"}\n', "[agent] holds only labels"),
        ('agent = "x"\n', "[agent] holds only labels"),
    ],
)
def test_bad_labels_stop_the_agent(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(click.BadParameter, match=message.replace("[", r"\[")):
        settings(tmp_path, text)


async def _recorded_connected(center: Any) -> Any:
    """The client's row once the server has stored its connection (the agent may know it is
    connected before the server's bookkeeping has committed)."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        row = await center.server.db(center.server.records.get_client, "web-1")
        if row.connected:
            return row
        await asyncio.sleep(0.05)
    raise TimeoutError("the server did not record the connection")


async def _stored_labels(center: Any) -> dict[str, str]:
    """Cut the agent's connection so it connects again with its (changed) labels; the labels
    stored when it is back."""
    before = (await center.server.db(center.server.records.get_client, "web-1")).connected_since
    session = center.server.transport.session("web-1")
    session.close("test: connect again")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        row = await center.server.db(center.server.records.get_client, "web-1")
        if row.connected and row.connected_since != before:
            return dict(row.labels)
        await asyncio.sleep(0.05)
    raise TimeoutError("the agent did not connect again")


async def test_the_server_checks_and_stores_labels(tmp_path: Path) -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "deploy_shell"})
    async with in_process_center(tmp_path, plugins) as center:
        row = await _recorded_connected(center)
        assert row.labels == {}
        center.agent.config.labels = {"role": "web"}
        assert await _stored_labels(center) == {"role": "web"}
        row = await center.server.db(center.server.records.get_client, "web-1")
        assert "labels" not in (row.capabilities or {})
        # An agent that skipped its own check (or a hostile one): the server drops them all.
        center.agent.config.labels = {"role": "web", "bad key": "x" * 100}
        assert await _stored_labels(center) == {}

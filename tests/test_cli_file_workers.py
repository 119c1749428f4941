"""``deployctl server --file-workers`` and ``[artifacts] file_workers`` of its ``--config``."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from deploy_core.cli.server_command import file_workers_setting


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_the_default_is_none_and_the_flag_wins_over_the_file(tmp_path: Path) -> None:
    assert file_workers_setting(None, None) == 0
    path = config(tmp_path, "[artifacts]\nfile_workers = 3\ndir = 'store'\n")
    assert file_workers_setting(path, None) == 3
    assert file_workers_setting(path, 0) == 0
    assert file_workers_setting(path, 2) == 2


@pytest.mark.parametrize("value", ["-1", "65", "true", "'2'", "1.5"])
def test_a_bad_value_in_the_file_says_what_is_wrong(tmp_path: Path, value: str) -> None:
    path = config(tmp_path, f"[artifacts]\nfile_workers = {value}\n")
    with pytest.raises(click.BadParameter, match="file_workers must be a whole number"):
        file_workers_setting(path, None)


def test_artifacts_takes_no_other_keys(tmp_path: Path) -> None:
    path = config(tmp_path, "[artifacts]\nworkers = 2\n")
    with pytest.raises(click.BadParameter, match="takes only dir and file_workers"):
        file_workers_setting(path, None)


def test_the_option_is_listed_and_bounded() -> None:
    from deploy_core.cli.server_command import server

    runner = CliRunner()
    assert "--file-workers" in runner.invoke(server, ["--help"]).output
    result = runner.invoke(server, ["--file-workers", "65"])
    assert result.exit_code == 2 and "--file-workers" in result.output

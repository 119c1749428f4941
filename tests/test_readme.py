"""README.md stays true: every ``deployctl`` command it shows exists and takes the options it
is shown with (its ``--help`` runs), and every file or directory of the checkout it names
exists."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from deploy_core.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Shell code blocks (```sh) and inline code spans (`...`), the two places commands appear.
_SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
_SPAN = re.compile(r"`([^`\n]+)`")
# A path into the checkout: starts at one of its top-level directories; not part of a
# longer path (~/..., /var/...) or a URL.
_PATH = re.compile(
    r"(?<![\w/.~$-])((?:scripts|docs|examples|plugins|tests|bench|deploy_core|\.ci)/[\w./*-]*)"
)


def _shell_commands() -> list[list[str]]:
    """The words of each command in the README's shell blocks (continuations joined,
    comments dropped, split at pipes and ``;``)."""
    commands: list[list[str]] = []
    for block in _SH_BLOCK.findall(README):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|;&()")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words: list[str] = []
            for word in lexer:
                if set(word) <= set("|;&()"):
                    commands.append(words)
                    words = []
                else:
                    words.append(word)
            commands.append(words)
    return [c for c in commands if c]


def _spans() -> list[list[str]]:
    """The words of each inline code span, brackets of optional parts removed."""
    return [span.replace("[", " ").replace("]", " ").split() for span in _SPAN.findall(README)]


def _deployctl_uses() -> list[tuple[str, ...]]:
    """Every ``deployctl`` invocation the README shows: the words after ``deployctl``."""
    uses: set[tuple[str, ...]] = set()
    for words in _shell_commands() + _spans():
        for i, word in enumerate(words):
            if word == "deployctl" or word.endswith("/deployctl"):
                uses.add(tuple(words[i + 1 :]))
    return sorted(uses)


def _resolve(args: tuple[str, ...]) -> tuple[list[str], click.Command, list[str]]:
    """The subcommand path the words name, that command, and the options given to it."""
    command: click.Command = main
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        ctx = click.Context(command, info_name=path[-1] if path else "deployctl")
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            pytest.fail(
                f"README shows `deployctl {' '.join(args)}`, but there is no command "
                f"{rest[0]!r} under `deployctl {' '.join(path)}`"
            )
        command = sub
        path.append(rest.pop(0))
    options = [w.split("=", 1)[0] for w in rest if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", w)]
    return path, command, options


USES = _deployctl_uses()


def test_the_readme_shows_deployctl_commands() -> None:
    assert len(USES) >= 20, USES  # the extraction found the quick start and the table


@pytest.mark.parametrize("args", USES, ids=[" ".join(a) or "(none)" for a in USES])
def test_a_deployctl_command_in_the_readme_exists_with_its_options(
    args: tuple[str, ...],
) -> None:
    path, command, options = _resolve(args)
    assert path or options, f"README shows a bare `deployctl {' '.join(args)}`"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    known |= {"--help"}
    unknown = [opt for opt in options if opt not in known]
    assert not unknown, (
        f"README shows `deployctl {' '.join(args)}`, but `deployctl {' '.join(path)}` has no "
        f"option {', '.join(unknown)} (it has {', '.join(sorted(known))})"
    )
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def _named_paths() -> list[str]:
    """Paths into the checkout that the README names, and its relative link targets."""
    found = set(_PATH.findall(README))
    found |= {target for target in re.findall(r"\]\(([^)#\s]+)\)", README) if "://" not in target}
    return sorted(p.rstrip(".,") for p in found)


PATHS = _named_paths()


def test_the_readme_names_files() -> None:
    assert "scripts/up.sh" in PATHS and "scripts/test.sh" in PATHS, PATHS


@pytest.mark.parametrize("name", PATHS)
def test_a_path_the_readme_names_exists(name: str) -> None:
    matches = glob.glob(str(ROOT / name))
    assert matches, f"README names {name}, which is not in the checkout ({ROOT})"

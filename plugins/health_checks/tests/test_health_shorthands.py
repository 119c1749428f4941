"""The ``--health`` shorthands the ``http`` and ``tcp`` checks register: each gives options
the check's own model accepts, and a malformed one says what was expected."""

from __future__ import annotations

import pytest

from deploy_core.plugins import load_plugins
from health_checks.http import HttpCheckParams
from health_checks.tcp import TcpCheckParams


@pytest.mark.parametrize(
    ("name", "text", "options"),
    [
        ("http", "8080/healthz", {"type": "http", "port": 8080, "path": "/healthz"}),
        ("http", "8080", {"type": "http", "port": 8080, "path": "/"}),
        ("http", "//web:80/a?b=1", {"type": "http", "host": "web", "port": 80, "path": "/a?b=1"}),
        ("tcp", "5432", {"type": "tcp", "port": 5432}),
        ("tcp", "db:5432", {"type": "tcp", "host": "db", "port": 5432}),
    ],
)
def test_a_shorthand_gives_options_the_check_accepts(
    name: str, text: str, options: dict[str, object]
) -> None:
    check = load_plugins(env={"DEPLOY_CORE_PLUGINS": "health_checks"}).health_checks.get(name)
    assert check is not None
    parsed = check.parse_shorthand(text)
    assert parsed == options
    model = {"http": HttpCheckParams, "tcp": TcpCheckParams}[name]
    assert model.model_validate(parsed).type == name


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("http", "web", "expected http:PORT[/PATH] or http://HOST:PORT/PATH, got http:web"),
        ("tcp", "db:", "expected tcp:[HOST:]PORT, got tcp:db: (no port in 'db:')"),
        ("tcp", "5432/x", "a tcp check has no path"),
    ],
)
def test_a_malformed_shorthand_says_what_was_expected(name: str, text: str, error: str) -> None:
    check = load_plugins(env={"DEPLOY_CORE_PLUGINS": "health_checks"}).health_checks.get(name)
    assert check is not None
    with pytest.raises(ValueError) as refused:
        check.parse_shorthand(text)
    assert error in str(refused.value)


def test_the_script_check_has_no_shorthand() -> None:
    check = load_plugins(env={"DEPLOY_CORE_PLUGINS": "health_checks"}).health_checks.get("script")
    assert check is not None and check.shorthand is None
    with pytest.raises(ValueError, match="the script check has no --health shorthand"):
        check.parse_shorthand("x")

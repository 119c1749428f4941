"""Parameters are validated at the edge: bad values are refused naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from deploy_core.agent.health import run_health_checks
from deploy_core.plugins import DeployPlugins
from health_checks.http import HttpCheckParams
from health_checks.script import MAX_SCRIPT_BYTES, ScriptCheckParams
from health_checks.tcp import TcpCheckParams


@pytest.mark.parametrize(
    ("spec", "loc"),
    [
        ({"type": "http", "port": 0}, ("port",)),
        ({"type": "http", "port": 65536}, ("port",)),
        ({"type": "http", "port": "8080"}, ("port",)),
        ({"type": "http", "port": True}, ("port",)),
        ({"type": "http", "port": 80, "path": "healthz"}, ("path",)),
        ({"type": "http", "port": 80, "path": "/a b"}, ("path",)),
        ({"type": "http", "port": 80, "path": "/x\r\nX-Injected: 1"}, ("path",)),
        ({"type": "http", "port": 80, "host": "http://web"}, ("host",)),
        ({"type": "http", "port": 80, "host": "web:8080"}, ("host",)),
        ({"type": "http", "port": 80, "host": "[::1]"}, ("host",)),
        ({"type": "http", "port": 80, "host": "web/healthz"}, ("host",)),
        ({"type": "http", "port": 80, "host": "-web"}, ("host",)),
        ({"type": "http", "port": 80, "expect_status": [200, 600]}, ("expect_status", 1)),
        ({"type": "http", "port": 80, "expect_status": [99]}, ("expect_status", 0)),
        ({"type": "http", "port": 80, "expect_status": []}, ("expect_status",)),
        ({"type": "http", "port": 80, "expect_body": ""}, ("expect_body",)),
        ({"type": "http", "port": 80, "scheme": "https"}, ("scheme",)),
        ({"type": "http", "port": 80, "colour": "red"}, ("colour",)),
        ({"type": "http", "port": 80, "retries": -1}, ("retries",)),
        ({"type": "tcp"}, ("port",)),
        ({"type": "tcp", "port": 22, "path": "/"}, ("path",)),
        ({"type": "script", "script": "x" * (MAX_SCRIPT_BYTES + 1)}, ("script",)),
        ({"type": "script", "script": ""}, ("script",)),
        ({"type": "script", "script": "true", "workdir": "relative/dir"}, ("workdir",)),
        ({"type": "script", "script": "true", "env": {"1BAD": "x"}}, ("env", "1BAD", "[key]")),
        ({"type": "script", "script": "true", "env": {"A": 1}}, ("env", "A")),
    ],
    ids=lambda value: None if isinstance(value, dict) else "-".join(map(str, value)),
)
def test_bad_params_are_refused_naming_the_field(
    plugins: DeployPlugins, spec: dict[str, Any], loc: tuple[str | int, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        plugins.parse_health_check(spec)

    assert [error["loc"] for error in caught.value.errors()] == [loc]
    assert str(loc[0]) in str(caught.value)


def test_script_size_error_says_what_the_limit_is(plugins: DeployPlugins) -> None:
    with pytest.raises(ValidationError, match=r"102401 bytes; the limit is 102400 bytes"):
        plugins.parse_health_check({"type": "script", "script": "#" * (MAX_SCRIPT_BYTES + 1)})


@pytest.mark.parametrize(
    "host", ["localhost", "web-1.internal", "10.0.0.5", "::1", "fe80::1", "myapp_web_1", "a.b."]
)
def test_hostnames_and_ips_are_accepted(plugins: DeployPlugins, host: str) -> None:
    _, params = plugins.parse_health_check({"type": "tcp", "host": host, "port": 5432})

    assert params.host == host


def test_a_script_of_exactly_100_kb_is_accepted(plugins: DeployPlugins) -> None:
    _, params = plugins.parse_health_check({"type": "script", "script": "#" * MAX_SCRIPT_BYTES})

    assert len(params.script) == MAX_SCRIPT_BYTES


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda: HttpCheckParams.model_validate({"type": "http", "port": 8080}),
            {"host": "127.0.0.1", "path": "/", "expect_status": None, "scheme": "http"},
        ),
        (lambda: TcpCheckParams.model_validate({"type": "tcp", "port": 22}), {"host": "127.0.0.1"}),
        (
            lambda: ScriptCheckParams.model_validate({"type": "script", "script": "true"}),
            {"workdir": None, "env": {}},
        ),
    ],
    ids=["http", "tcp", "script"],
)
def test_defaults_follow_the_spec(build: Callable[[], Any], expected: dict[str, Any]) -> None:
    params = build()

    for name, value in expected.items():
        assert getattr(params, name) == value
    # SPEC deploy-16: overall timeout 60 s, 3 retries 10 s apart.
    assert (params.timeout, params.retries, params.interval) == (60.0, 3, 10.0)


def test_a_spec_naming_another_check_type_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        HttpCheckParams.model_validate({"type": "tcp", "port": 80})

    assert caught.value.errors()[0]["loc"] == ("type",)


async def test_bad_params_in_a_deployment_become_a_failed_check_without_attempts(
    plugins: DeployPlugins, deploy_context: Callable[..., Any]
) -> None:
    ctx, _ = deploy_context()

    [result] = await run_health_checks(ctx, plugins, [{"type": "http", "port": 0}])

    assert result.success is False
    assert result.attempts == 0
    assert result.error is not None and "port" in result.error


def test_a_host_with_a_trailing_newline_is_refused() -> None:
    from health_checks.http import HttpCheckParams

    with pytest.raises(ValidationError, match="host"):
        HttpCheckParams(type="http", port=80, host="localhost\n")

"""Which rollback a request gets (issue 10 §2): request > server [defaults] > the deploy type's
default > none, resolved with the installed plugins."""

from __future__ import annotations

from typing import Any

import pytest

from deploy_core.plugins import DeployPlugins, get_plugins
from deploy_core.registry import DeployType
from deploy_core.server.rollback_plan import (
    RollbackDefaults,
    RollbackDefaultsError,
    RollbackPlan,
    RollbackPlanError,
    plan_rollback,
)
from tests.conftest import missing_part


@pytest.fixture(scope="module")
def plugins() -> DeployPlugins:
    loaded = get_plugins()
    for name in ("deploy.shell", "deploy.tar", "deploy.docker"):
        if name not in loaded.deploy_types:
            missing_part(f"the plugin providing {name} is not installed")
    if "snapshot" not in loaded.rollback_strategies:
        missing_part("rollback_basic (snapshot, inline) is not installed")
    return loaded


def plan(
    plugins: DeployPlugins,
    type_name: str,
    requested: dict[str, Any] | bool | None,
    params: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> RollbackPlan:
    deploy_type = plugins.deploy_types.get(type_name)
    assert isinstance(deploy_type, DeployType)
    table = RollbackDefaults(defaults or {}, plugins)
    return plan_rollback(
        plugins, table, deploy_type, requested, deploy_type.params.model_validate(params)
    )


SHELL = {"script": "true", "workdir": "/srv/app"}
TAR = {"artifact": "a" * 64, "target_dir": "/srv/site"}
DOCKER = {"image": "nginx:1", "container_name": "web"}


def test_tar_and_docker_roll_back_by_default(plugins: DeployPlugins) -> None:
    tar = plan(plugins, "deploy.tar", None, TAR)
    assert tar.spec is not None and tar.spec["strategy"] == "release"
    assert tar.source == "deploy type default"
    assert tar.note == "release, the default of deploy.tar"
    docker = plan(plugins, "deploy.docker", None, DOCKER)
    assert docker.spec is not None and docker.spec["strategy"] == "previous_container"


def test_shell_without_any_rollback_says_why(plugins: DeployPlugins) -> None:
    shell = plan(plugins, "deploy.shell", None, SHELL)
    assert shell.spec is None and shell.source == "none"
    assert shell.no_rollback_reason is not None
    assert shell.no_rollback_reason.startswith(
        "deploy.shell has no default rollback and the request named none"
    )
    assert '[defaults.rollback."deploy.shell"]' in shell.no_rollback_reason


@pytest.mark.parametrize("opt_out", [False, {"strategy": "none"}])
def test_request_opts_out(plugins: DeployPlugins, opt_out: Any) -> None:
    tar = plan(plugins, "deploy.tar", opt_out, TAR)
    assert tar.spec is None and tar.source == "opted out"
    assert tar.no_rollback_reason == "rollback disabled by the request"


def test_request_strategy_wins_over_every_default(plugins: DeployPlugins) -> None:
    defaults = {"deploy.shell": {"strategy": "snapshot", "path": "{workdir}"}}
    shell = plan(plugins, "deploy.shell", {"strategy": "inline"}, SHELL, defaults)
    assert shell.spec is not None and shell.spec["strategy"] == "inline"
    assert shell.source == "request"


def test_server_default_fills_in_the_requests_workdir(plugins: DeployPlugins) -> None:
    defaults = {"deploy.shell": {"strategy": "snapshot", "path": "{workdir}", "keep": 5}}
    shell = plan(plugins, "deploy.shell", None, SHELL, defaults)
    assert shell.spec is not None
    assert (shell.spec["strategy"], shell.spec["path"], shell.spec["keep"]) == (
        "snapshot",
        "/srv/app",
        5,
    )
    assert shell.source == "server defaults"
    # Options without a strategy refine the default.
    refined = plan(plugins, "deploy.shell", {"keep": 2}, SHELL, defaults)
    assert refined.spec is not None and refined.spec["keep"] == 2


def test_server_default_that_needs_an_unset_parameter_does_not_apply(
    plugins: DeployPlugins,
) -> None:
    defaults = {"deploy.shell": {"strategy": "snapshot", "path": "{workdir}"}}
    shell = plan(plugins, "deploy.shell", None, {"script": "true"}, defaults)
    assert shell.spec is None
    assert "the server's default (snapshot) takes workdir, which the request does not set" in (
        shell.note
    )


def test_server_default_none_disables_a_types_default(plugins: DeployPlugins) -> None:
    docker = plan(plugins, "deploy.docker", None, DOCKER, {"deploy.docker": {"strategy": "none"}})
    assert docker.spec is None
    assert (
        docker.note
        == 'rollback disabled by the server config ([defaults.rollback."deploy.docker"])'
    )


def test_server_default_beats_the_types_default(plugins: DeployPlugins) -> None:
    defaults = {"deploy.tar": {"strategy": "snapshot", "path": "{target_dir}"}}
    tar = plan(plugins, "deploy.tar", None, TAR, defaults)
    assert tar.spec is not None and tar.spec["strategy"] == "snapshot"
    assert tar.spec["path"] == "/srv/site"


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ({"strategy": "teleport"}, "unknown rollback strategy 'teleport'"),
        ({"strategy": "snapshot"}, "path: Field required"),
        ({"strategy": "inline", "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"strategy": "none", "path": "/x"}, 'rollback {"strategy": "none"} takes no options'),
        (True, "deploy.shell has no default rollback strategy; name one"),
        ({}, "deploy.shell has no default rollback strategy; name one"),
    ],
)
def test_bad_rollback_is_refused_with_what_to_do(
    plugins: DeployPlugins, requested: Any, message: str
) -> None:
    with pytest.raises(RollbackPlanError) as caught:
        plan(plugins, "deploy.shell", requested, SHELL)
    assert message in str(caught.value)


def test_asking_for_the_default_of_tar_gets_release(plugins: DeployPlugins) -> None:
    tar = plan(plugins, "deploy.tar", {"timeout": 60}, TAR)
    assert tar.spec is not None
    assert (tar.spec["strategy"], tar.spec["timeout"]) == ("release", 60)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"deploy.nothing": {"strategy": "inline"}}, "no deploy type 'deploy.nothing'"),
        ({"deploy.shell": {"path": "/x"}}, "give strategy = NAME"),
        ({"deploy.shell": {"strategy": "teleport"}}, "unknown rollback strategy 'teleport'"),
        ({"deploy.shell": {"strategy": "snapshot", "path": "{nope}"}}, "names no parameter"),
        ({"deploy.shell": {"strategy": "snapshot"}}, "path: Field required"),
        ({"deploy.shell": {"strategy": "none", "path": "/x"}}, "takes no options"),
    ],
)
def test_bad_server_defaults_stop_the_server(
    plugins: DeployPlugins, tables: dict[str, Any], message: str
) -> None:
    with pytest.raises(RollbackDefaultsError) as caught:
        RollbackDefaults(tables, plugins)
    assert message in str(caught.value)

"""The plugin as the core finds it: through the ``deploy_core`` entry-point group."""

from __future__ import annotations

from deploy_core.plugins import load_plugins
from deploy_core.registry import HealthCheckParams


def test_entry_point_discovery_registers_http_tcp_and_script() -> None:
    # Real discovery, limited to this plugin so other installed plugins cannot interfere.
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "health_checks"})

    assert plugins.health_checks.by_owner("health_checks") == ["http", "script", "tcp"]
    [info] = [p for p in plugins.describe() if p["name"] == "health_checks"]
    assert info["version"] == "0.1.0"
    assert info["hooks"] == ["deploy_register_health_checks"]
    assert plugins.capabilities()["health_checks"] == ["http", "script", "tcp"]


def test_each_check_parses_its_own_type_name() -> None:
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "health_checks"})

    for name in ("http", "tcp", "script"):
        check = plugins.health_checks.get(name)
        assert check is not None and check.description
        assert issubclass(check.params, HealthCheckParams)
        assert check.params.model_fields["type"].default == name

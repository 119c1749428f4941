"""The plugin as the core finds it: through the ``deploy_core`` entry-point group."""

from __future__ import annotations

from deploy_core.plugins import load_plugins


def test_entry_point_registers_the_three_strategies():
    plugins = load_plugins(env={"DEPLOY_CORE_PLUGINS": "rollback_basic"})

    assert plugins.rollback_strategies.by_owner("rollback_basic") == [
        "inline",
        "script",
        "snapshot",
    ]
    assert plugins.versions["rollback_basic"] == "0.1.0"
    snapshot = plugins.rollback_strategies.get("snapshot")
    assert snapshot is not None
    assert snapshot.needs_state and snapshot.prepare is not None


def test_each_strategy_validates_its_request_dict():
    strategies = load_plugins(env={"DEPLOY_CORE_PLUGINS": "rollback_basic"}).rollback_strategies
    requests = {
        "inline": {"strategy": "inline", "timeout": 60},
        "script": {"strategy": "script", "script": "systemctl restart app"},
        "snapshot": {"strategy": "snapshot", "path": "/srv/app/", "keep": 5},
    }
    for name, request in requests.items():
        strategy = strategies.get(name)
        assert strategy is not None
        params = strategy.params.model_validate(request)
        assert params.strategy == name
    snapshot = strategies.get("snapshot")
    assert snapshot is not None
    assert snapshot.params.model_validate(requests["snapshot"]).path == "/srv/app"

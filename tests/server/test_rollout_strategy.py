"""The arithmetic of rollout strategies (docs/rollouts.md#strategies-side-by-side): percent
rounding, batch sizes and order, canaries, defaults, and what the request model refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deploy_core.labels import LabelError, check_labels, matches, parse_selector
from deploy_core.server.http.rollouts import NewRollout, RolloutStrategy
from deploy_core.server.rollouts import percent_of, plan_batches, resolve_strategy


def resolved(total: int, **asked: Any) -> dict[str, Any]:
    return resolve_strategy(RolloutStrategy.model_validate(asked).model_dump(), total)


def sizes(total: int, **asked: Any) -> list[int]:
    batches = plan_batches(total, resolved(total, **asked))
    return [batches.count(i) for i in range(max(batches) + 1)] if batches else []


@pytest.mark.parametrize(
    ("value", "total", "up", "down"),
    [
        ("25%", 12, 3, 3),  # 3.0000000000000004 in floating point: still 3
        ("10%", 12, 2, 1),
        ("5%", 12, 1, 0),
        ("33%", 3, 1, 0),
        ("100%", 7, 7, 7),
        ("0%", 50, 0, 0),
        ("12.5%", 8, 1, 1),
        ("1%", 1000, 10, 10),
        ("0.1%", 1000, 1, 1),
        (4, 12, 4, 4),
    ],
)
def test_percent_rounding(value: int | str, total: int, up: int, down: int) -> None:
    assert percent_of(value, total, round_up=True) == up
    assert percent_of(value, total, round_up=False) == down


def test_batches_of_a_quarter_after_one_canary() -> None:
    assert sizes(12, batch_size="25%", canary=1) == [1, 3, 3, 3, 2]
    assert plan_batches(12, resolved(12, batch_size="25%", canary=1))[:5] == [0, 1, 1, 1, 2]


def test_defaults_one_host_at_a_time_in_one_batch() -> None:
    strategy = resolved(5)
    assert strategy["batch_size"] == 5 and strategy["max_parallel"] == 1
    assert sizes(5) == [5]
    assert strategy["max_failures"] == 0 and strategy["on_failure"] == "stop"
    assert strategy["canary_action"] == "pause" and strategy["busy"] == "wait"
    assert strategy["busy_timeout"] == 600 and strategy["offline_timeout"] == 300


def test_max_parallel_alone_is_one_sliding_window() -> None:
    strategy = resolved(1000, max_parallel=1000)
    assert sizes(1000, max_parallel=1000) == [1000]
    assert strategy["max_parallel"] == 1000
    assert resolved(10, max_parallel="25%")["max_parallel"] == 3


def test_batch_size_sets_max_parallel_unless_given() -> None:
    assert resolved(10, batch_size=4)["max_parallel"] == 4
    assert resolved(10, batch_size=4, max_parallel=2)["max_parallel"] == 2
    assert sizes(10, batch_size=4) == [4, 4, 2]
    assert sizes(10, batch_size=20) == [10]


def test_failure_budget_rounds_down() -> None:
    assert resolved(12, max_failures="10%")["max_failures"] == 1
    assert resolved(12, max_failures="5%")["max_failures"] == 0
    assert resolved(12, max_failures=3)["max_failures"] == 3


def test_canary_percent_and_limits() -> None:
    assert sizes(10, canary="10%", batch_size=3) == [1, 3, 3, 3]
    with pytest.raises(ValueError, match="at least one target after it"):
        resolved(3, canary=3)
    with pytest.raises(ValueError, match="at least one target after it"):
        resolved(1, canary="50%")


def test_durations() -> None:
    strategy = resolved(3, progress_deadline="10m", busy_timeout="90s", offline_timeout=0)
    assert strategy["progress_deadline"] == 600
    assert strategy["busy_timeout"] == 90
    assert strategy["offline_timeout"] == 0
    assert resolved(3, progress_deadline="1h")["progress_deadline"] == 3600
    assert resolved(3, progress_deadline=2.5)["progress_deadline"] == 2.5


@pytest.mark.parametrize(
    "asked",
    [
        {"batch_size": 0},
        {"batch_size": "0%"},
        {"batch_size": "101%"},
        {"batch_size": "-5%"},
        {"batch_size": "5"},
        {"batch_size": True},
        {"batch_size": 2.5},
        {"max_parallel": 0},
        {"canary": -1},
        {"max_failures": -1},
        {"max_failures": "1e3%"},
        {"canary_action": "wait"},
        {"on_failure": "panic"},
        {"busy": "queue"},
        {"progress_deadline": "10d"},
        {"progress_deadline": "-1s"},
        {"progress_deadline": 8 * 86400},
        {"busy_timeout": "soon"},
        {"offline_timeout": -1},
        {"batch": 3},
    ],
)
def test_bad_strategies_are_refused(asked: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RolloutStrategy.model_validate(asked)


@pytest.mark.parametrize(
    "targets",
    [
        {"selector": {"-bad": "x"}},
        {"selector": {"role": "web app"}},
        {"selector": {"role": 1}},
        {"selector": {"k" * 64: "v"}},
        {"clients": ["../etc"]},
        {"clients": "web-1"},
        {"hosts": ["web-1"]},
    ],
)
def test_bad_targets_are_refused(targets: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NewRollout.model_validate({"type": "shell", "request": {}, "targets": targets})


def test_labels_rules() -> None:
    assert check_labels({"role": "web", "zone": "eu-1", "team/x": "", "a.b_c": "V.1"}) == {
        "role": "web",
        "zone": "eu-1",
        "team/x": "",
        "a.b_c": "V.1",
    }
    for bad in (
        {"": "x"},
        {"-a": "x"},
        {"a-": "x"},
        {"k" * 64: "x"},
        {"role": "w" * 64},
        {"role": "a b"},
        {"role": "é"},
        {"role": 3},
        {3: "x"},
        {f"k{i}": "v" for i in range(33)},
        ["role=web"],
    ):
        with pytest.raises(LabelError):
            check_labels(bad)


def test_selectors() -> None:
    assert parse_selector(["role=web", "zone=eu-1"]) == {"role": "web", "zone": "eu-1"}
    assert parse_selector(["role="]) == {"role": ""}
    for bad in (["role"], ["role=web", "role=db"], ["=web"], ["role=a=b"]):
        with pytest.raises(LabelError):
            parse_selector(bad)
    assert matches({"role": "web", "zone": "eu-1"}, {"role": "web"})
    assert not matches({"role": "web"}, {"role": "web", "zone": "eu-1"})
    assert not matches({"role": "Web"}, {"role": "web"})
    assert not matches({"role": "web"}, {})
    assert not matches(None, {"role": "web"})

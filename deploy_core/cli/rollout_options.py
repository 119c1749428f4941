"""The options of ``deployctl rollout KIND``: which hosts (targets) and how (strategy), parsed
into the ``targets`` and ``strategy`` of ``POST /api/rollouts`` (docs/rollouts.md).

They are tuples of :class:`click.Option` objects rather than decorators because
:mod:`deploy_core.cli.rollouts` adds them to commands it derives from ``deployctl deploy
KIND`` at run time, beside that command's own options.
"""

from __future__ import annotations

from typing import Any

import click

from deploy_core.cli.common import parse_duration
from deploy_core.labels import LabelError
from deploy_core.labels import parse_selector as parse_selector_pairs


class CountOrPercent(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.4
    """``3`` (hosts) or ``10%`` (of the targets): an ``int`` or the string ``"10%"``, as the
    API takes them.  ``minimum`` is the smallest count (and percent) allowed."""

    name = "N|P%"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        percent = text.endswith("%")
        number = text[:-1].strip() if percent else text
        if not number.isdigit():
            self.fail(f"expected a number of hosts (3) or a percentage (10%), got {value!r}")
        amount = int(number)
        if percent and not self.minimum <= amount <= 100:
            self.fail(f"a percentage must be {self.minimum}% to 100%, got {text}")
        if not percent and amount < self.minimum:
            self.fail(f"must be at least {self.minimum}, got {amount}")
        return f"{amount}%" if percent else amount


class Duration(click.ParamType):  # type: ignore[type-arg]
    """``90``, ``90s``, ``10m``, ``1h`` → seconds (:func:`parse_duration`); ``0`` too when
    ``zero`` (e.g. "do not wait")."""

    name = "DURATION"

    def __init__(self, *, zero: bool = False) -> None:
        self.zero = zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if self.zero and text.rstrip("smhd") in ("0", "0.0"):
            return 0.0
        try:
            return parse_duration(text)
        except click.BadParameter as exc:
            self.fail(exc.message)


def parse_selector(values: tuple[str, ...]) -> dict[str, str]:
    """``--selector role=web,zone=eu-1`` (repeatable; a host must match every pair) as one
    selector, by the rules the server applies (:mod:`deploy_core.labels`)."""
    pairs = [item.strip() for value in values for item in value.split(",")]
    try:
        return parse_selector_pairs(pairs) if pairs else {}
    except LabelError as exc:
        raise click.BadParameter(
            f"{exc} (write --selector KEY=VALUE[,KEY=VALUE…])", param_hint="--selector"
        ) from None


def _option(*decls: str, **attrs: Any) -> click.Option:
    return click.Option(list(decls), **attrs)


TARGET_OPTIONS = (
    _option(
        "--client",
        "rollout_clients",
        multiple=True,
        help="a target client id, repeatable (with --selector: the hosts of either)",
    ),
    _option(
        "--selector",
        "selector",
        multiple=True,
        help="labels the targets carry, as role=web,zone=eu-1; repeated, all must match",
    ),
)

STRATEGY_OPTIONS = (
    _option(
        "--batch",
        "batch_size",
        type=CountOrPercent(1),
        default=None,
        help="hosts per batch: a count (3) or a percentage of the targets (10%, rounded up); "
        "a batch starts when the one before has ended  [default: all in one batch]",
    ),
    _option(
        "--max-parallel",
        type=CountOrPercent(1),
        default=None,
        help="at most N (or P% of the targets) deploying at once within a batch; alone, a "
        "sliding window over all targets  [default: the batch size; 1 without --batch]",
    ),
    _option(
        "--canary",
        type=CountOrPercent(0),
        default=None,
        help="deploy to the first N targets (or P%) alone first, as batch 0",
    ),
    _option(
        "--canary-action",
        type=click.Choice(["pause", "continue"]),
        default=None,
        help="after a canary batch within the failure budget: pause until 'deployctl rollout "
        "promote', or continue  [default: pause]",
    ),
    _option(
        "--max-failures",
        type=CountOrPercent(0),
        default=None,
        help="failed hosts tolerated: a count or a percentage (rounded down); one more stops "
        "the rollout  [default: 0]",
    ),
    _option(
        "--on-failure",
        type=click.Choice(["stop", "rollback"]),
        default=None,
        help="past the failure budget: stop starting hosts, or also roll back every host that "
        "succeeded, newest first  [default: stop]",
    ),
    _option(
        "--progress-deadline",
        type=Duration(),
        default=None,
        help="longest a batch may take (90s, 10m, 1h); past it the rollout fails",
    ),
    _option(
        "--busy",
        type=click.Choice(["wait", "skip"]),
        default=None,
        help="a host busy with another deployment: wait for it (up to --busy-timeout, then it "
        "counts as failed), or skip it  [default: wait]",
    ),
    _option(
        "--busy-timeout",
        type=Duration(zero=True),
        default=None,
        help="how long to wait for a busy host  [default: 10m]",
    ),
    _option(
        "--offline-timeout",
        type=Duration(zero=True),
        default=None,
        help="how long to wait for an offline host to connect; then it counts as failed  "
        "[default: 5m]",
    ),
)

WAIT_OPTIONS = (
    _option("--wait", is_flag=True, help="follow the rollout live until it ends"),
    _option(
        "--wait-timeout",
        type=Duration(),
        default="1h",
        show_default=True,
        help="how long to follow it (90s, 10m, 1h); the rollout goes on past it",
    ),
)

ROLLOUT_OPTION_NAMES = frozenset(str(o.name) for o in TARGET_OPTIONS + STRATEGY_OPTIONS)
_STRATEGY_NAMES = tuple(str(o.name) for o in STRATEGY_OPTIONS)


def targets_field(clients: tuple[str, ...], selector: tuple[str, ...]) -> dict[str, Any]:
    """The ``targets`` of a rollout request: ``clients`` and/or ``selector``."""
    targets: dict[str, Any] = {}
    if clients:
        targets["clients"] = list(dict.fromkeys(clients))  # once each, in order
    labels = parse_selector(selector)
    if labels:
        targets["selector"] = labels
    if not targets:
        raise click.UsageError("name the targets: --client ID (repeatable) and/or --selector K=V")
    return targets


def strategy_field(values: dict[str, Any]) -> dict[str, Any]:
    """The ``strategy`` of a rollout request from the :data:`STRATEGY_OPTIONS` values; what
    is not given is left to the server's defaults."""
    if values.get("canary_action") is not None and not values.get("canary"):
        raise click.UsageError("--canary-action needs --canary N (N > 0)")
    return {name: values[name] for name in _STRATEGY_NAMES if values.get(name) is not None}


def rollout_fields(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``targets`` and ``strategy`` from the values of :data:`TARGET_OPTIONS` and
    :data:`STRATEGY_OPTIONS`, which are taken out of ``options`` (a command's keyword
    arguments)."""
    values = {name: options.pop(name) for name in ROLLOUT_OPTION_NAMES}
    targets = targets_field(values.pop("rollout_clients"), values.pop("selector"))
    return targets, strategy_field(values)

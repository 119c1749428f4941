"""The options of ``deployctl rollout KIND``: which hosts (targets) and how (strategy), parsed
into the ``targets`` and ``strategy`` of ``POST /api/rollouts`` (docs/rollouts.md).

They are :class:`click.Option` objects rather than decorators because
:mod:`deploy_core.cli.rollouts` adds them to commands it derives from ``deployctl deploy
KIND`` at run time, beside that command's own options.
"""

from __future__ import annotations

import re
from typing import Any

import click

from deploy_core.cli.common import parse_duration

# What a label key and value may be (the server checks again; see docs/rollouts.md).
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


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
    """``90``, ``90s``, ``10m``, ``1h`` → seconds (:func:`parse_duration`)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value).strip())
        except click.BadParameter as exc:
            self.fail(exc.message)


def parse_selector(values: tuple[str, ...]) -> dict[str, str]:
    """``--selector role=web,zone=eu-1`` (repeatable; every pair must match) as one dict."""
    selector: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            key, sep, label = (part.strip() for part in item.partition("="))
            if not sep or not _LABEL.fullmatch(key) or not _LABEL.fullmatch(label):
                raise click.BadParameter(
                    f"expected KEY=VALUE[,KEY=VALUE…] (letters, digits and ._/- in each), "
                    f"got {item.strip()!r} in {value!r}",
                    param_hint="--selector",
                )
            if selector.get(key, label) != label:
                raise click.BadParameter(
                    f"{key} is given twice ({selector[key]!r} and {label!r}): a host has one "
                    f"value per label",
                    param_hint="--selector",
                )
            selector[key] = label
    return selector


def _option(*decls: str, **attrs: Any) -> click.Option:
    return click.Option(list(decls), **attrs)


TARGET_OPTIONS = [
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
]

STRATEGY_OPTIONS = [
    _option(
        "--batch",
        "batch_size",
        type=CountOrPercent(1),
        default=None,
        help="hosts per batch, as a count (3) or a percentage of the targets (10%)",
    ),
    _option(
        "--max-parallel",
        type=click.IntRange(min=1),
        default=None,
        help="instead of batches: at most N hosts deploying at once, the next starting as "
        "soon as one ends",
    ),
    _option(
        "--canary",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="deploy to the first N targets alone first",
    ),
    _option(
        "--canary-action",
        type=click.Choice(["pause", "continue"]),
        default=None,
        help="after the canaries succeed: pause until 'deployctl rollout promote' (the "
        "default), or continue",
    ),
    _option(
        "--max-failures",
        type=CountOrPercent(0),
        default=None,
        help="failed hosts (count or percentage) tolerated; one more stops the rollout "
        "(default: the server's, see docs/rollouts.md)",
    ),
    _option(
        "--on-failure",
        type=click.Choice(["stop", "rollback"]),
        default=None,
        help="when the rollout fails: stop starting hosts, or also roll back every host that "
        "succeeded (newest first)",
    ),
    _option(
        "--progress-deadline",
        type=Duration(),
        default=None,
        help="longest a batch may take (90s, 10m, 1h); its unfinished hosts then count as failed",
    ),
    _option(
        "--busy",
        type=click.Choice(["wait", "skip"]),
        default=None,
        help="a host busy with another deployment: wait for it (bounded), or skip it",
    ),
    _option(
        "--offline-timeout",
        type=Duration(),
        default=None,
        help="how long to wait for an offline host to connect before it counts as failed",
    ),
]

ROLLOUT_OPTION_NAMES = frozenset(str(o.name) for o in TARGET_OPTIONS + STRATEGY_OPTIONS)


def targets_field(clients: tuple[str, ...], selector: tuple[str, ...]) -> dict[str, Any]:
    """The ``targets`` of a rollout request: ``client_ids`` and/or ``selector``."""
    targets: dict[str, Any] = {}
    if clients:
        targets["client_ids"] = list(dict.fromkeys(clients))  # once each, in order
    labels = parse_selector(selector)
    if labels:
        targets["selector"] = labels
    if not targets:
        raise click.UsageError("name the targets: --client ID (repeatable) and/or --selector K=V")
    return targets


def strategy_field(
    batch_size: int | str | None,
    max_parallel: int | None,
    canary: int,
    canary_action: str | None,
    max_failures: int | str | None,
    on_failure: str | None,
    progress_deadline: float | None,
    busy: str | None,
    offline_timeout: float | None,
) -> dict[str, Any]:
    """The ``strategy`` of a rollout request; what is not given is left to the server."""
    if batch_size is not None and max_parallel is not None:
        raise click.UsageError(
            "--batch and --max-parallel are two ways to pace a rollout: give one"
        )
    if canary_action is not None and not canary:
        raise click.UsageError("--canary-action needs --canary N (N > 0)")
    strategy: dict[str, Any] = {
        "batch_size": batch_size,
        "max_parallel": max_parallel,
        "canary": canary or None,
        "canary_action": canary_action,
        "max_failures": max_failures,
        "on_failure": on_failure,
        "progress_deadline": progress_deadline,
        "busy": busy,
        "offline_timeout": offline_timeout,
    }
    return {key: value for key, value in strategy.items() if value is not None}


def rollout_fields(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``targets`` and ``strategy`` from the values of :data:`TARGET_OPTIONS` and
    :data:`STRATEGY_OPTIONS`, which are taken out of ``options`` (a command's keyword
    arguments)."""
    values = {name: options.pop(name) for name in ROLLOUT_OPTION_NAMES}
    targets = targets_field(values.pop("rollout_clients"), values.pop("selector"))
    return targets, strategy_field(**values)

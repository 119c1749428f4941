"""Client labels (``[agent] labels = {role = "web"}``) and label selectors.

Shared by the agent, which checks its configuration before it starts, and the server, which
checks what an agent sends when it connects and what a rollout or a client filter asks for:
the same rules on both ends (docs/rollouts.md#labels).
"""

from __future__ import annotations

import re
from typing import Any

LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._-]{0,63}$"
MAX_LABELS = 32
_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)

KEY_RULE = "1-63 letters, digits, '.', '_', '-', '/', starting and ending with a letter or digit"
VALUE_RULE = "0-63 letters, digits, '.', '_', '-'"


class LabelError(ValueError):
    """Labels or a selector that break the rules; the message says which and why."""


def check_labels(labels: Any, *, what: str = "labels") -> dict[str, str]:
    """``labels`` as a ``{key: value}`` dict of strings, checked.

    :raises LabelError: not a table of strings, too many, or a key or value breaking the rules.
    """
    if not isinstance(labels, dict):
        raise LabelError(f'{what} must be a table of key = "value" pairs')
    if len(labels) > MAX_LABELS:
        raise LabelError(f"{what}: {len(labels)} labels, at most {MAX_LABELS}")
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise LabelError(f"{what}: invalid key {str(key)[:80]!r}: {KEY_RULE}")
        if not isinstance(value, str):
            raise LabelError(f"{what}: the value of {key!r} must be a string")
        if not _VALUE.fullmatch(value):
            raise LabelError(f"{what}: invalid value {value[:80]!r} of {key!r}: {VALUE_RULE}")
        checked[key] = value
    return checked


def parse_selector(pairs: list[str]) -> dict[str, str]:
    """``["role=web", "zone=eu-1"]`` (query strings, command lines) as a selector.

    :raises LabelError: a pair without ``=``, a key given twice with different values, or a
        key or value breaking the rules.
    """
    selector: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LabelError(f"label selector {pair[:80]!r}: expected key=value")
        if selector.get(key, value) != value:
            raise LabelError(f"label selector names {key!r} twice with different values")
        selector[key] = value
    return check_labels(selector, what="label selector")


def matches(labels: dict[str, str] | None, selector: dict[str, str]) -> bool:
    """Whether a client with ``labels`` has every ``key: value`` of ``selector`` (an empty
    selector matches nothing: "every client" is never meant by leaving it out)."""
    if not selector or not labels:
        return False
    return all(labels.get(k) == v for k, v in selector.items())

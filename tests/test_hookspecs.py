"""The hooks police themselves: each is documented in its docstring and in docs/plugins.md,
and each has a test (DESIGN §2, STYLE: the datasette pattern)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
TESTS = ROOT / "tests"


def _hooks() -> list[tuple[str, Callable[..., Any]]]:
    """Every hook ``hookspecs.__all__`` exports (hook markers and constants are not hooks)."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return [
        (name, getattr(hookspecs, name))
        for name in hookspecs.__all__
        if hasattr(getattr(hookspecs, name), marker)
    ]


HOOKS = _hooks()
HOOK_IDS = [name for name, _ in HOOKS]


def _signature(fn: Callable[..., Any]) -> str:
    """``name(arg, arg)``, as the plugin guide writes a hook."""
    return f"{fn.__name__}({', '.join(inspect.signature(fn).parameters)})"


def test_all_lists_every_hook_defined_in_the_module() -> None:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    defined = {
        name
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, marker)
    }
    assert defined, "no hookspecs found: the marker attribute changed?"
    assert defined == set(HOOK_IDS), "a hook is missing from hookspecs.__all__"


def test_every_hook_is_prefixed() -> None:
    assert all(name.startswith("deploy_") for name in HOOK_IDS)


@pytest.mark.parametrize(("name", "hook"), HOOKS, ids=HOOK_IDS)
def test_hook_docstring_has_summary_params_and_versionadded(
    name: str, hook: Callable[..., Any]
) -> None:
    doc = inspect.getdoc(hook)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0].strip()
    assert summary and summary.endswith("."), f"{name}: first line must be a one-line summary"
    for arg in inspect.signature(hook).parameters:
        assert re.search(rf":param {arg}:\s*\S", doc), f"{name}: no ':param {arg}:' description"
    documented = set(re.findall(r":param (\w+):", doc))
    assert documented <= set(inspect.signature(hook).parameters), (
        f"{name} documents parameters it does not take: {documented}"
    )
    assert re.search(r"\.\. versionadded:: \d+\.\d+", doc), f"{name}: no '.. versionadded::'"


@pytest.mark.parametrize(("name", "hook"), HOOKS, ids=HOOK_IDS)
def test_hook_signature_is_in_the_plugin_guide(name: str, hook: Callable[..., Any]) -> None:
    text = PLUGINS_DOC.read_text()
    assert _signature(hook) in text, f"docs/plugins.md does not show {_signature(hook)}"


@pytest.mark.parametrize("name", HOOK_IDS)
def test_hook_has_a_test(name: str) -> None:
    """Some test module other than this one names the hook (and so exercises it)."""
    pattern = re.compile(rf"\b{name}\b")
    users = [
        path.relative_to(ROOT)
        for path in TESTS.rglob("test_*.py")
        if path.resolve() != Path(__file__).resolve() and pattern.search(path.read_text())
    ]
    assert users, f"no test under tests/ references the hook {name}"

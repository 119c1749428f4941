"""The hooks police themselves: each is documented in its docstring and in docs/plugins.md,
and each has a test (DESIGN §2, STYLE: the datasette pattern)."""

from __future__ import annotations

import ast
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


def _is_hookimpl(decorator: ast.expr) -> bool:
    """``@hookimpl``, ``@hookimpl(...)``, ``@deploy_core.hookimpl`` or ``@x.hookimpl(...)``."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl"
    )


def _implemented_or_called(tree: ast.AST) -> set[str]:
    """Names of hooks the code implements (a ``@hookimpl`` function of that name, or with
    ``specname=``) or calls (``pm.hook.NAME(...)``, ``anything.NAME(...)``).  Only code counts:
    a hook's name in a comment, a string or an unrelated identifier does not."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if not _is_hookimpl(decorator):
                    continue
                names.add(node.name)
                if isinstance(decorator, ast.Call):
                    names.update(
                        kw.value.value
                        for kw in decorator.keywords
                        if kw.arg == "specname"
                        and isinstance(kw.value, ast.Constant)
                        and isinstance(kw.value.value, str)
                    )
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.add(node.func.attr)
    return names


def _test_sources() -> list[Path]:
    """The test code: tests/ and every plugin's tests/, but not this module."""
    paths = [*TESTS.rglob("*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]
    return sorted(p for p in paths if p.resolve() != Path(__file__).resolve())


def _hooks_exercised() -> dict[str, list[Path]]:
    users: dict[str, list[Path]] = {}
    for path in _test_sources():
        for name in _implemented_or_called(ast.parse(path.read_text(), str(path))):
            users.setdefault(name, []).append(path.relative_to(ROOT))
    return users


HOOKS_EXERCISED = _hooks_exercised()


def test_code_in_comments_and_strings_does_not_count() -> None:
    source = (
        "# deploy_agent_services is tested elsewhere\n"
        "TEXT = 'pm.hook.deploy_status_changed(record=r)'\n"
        "def deploy_register_types(register): ...\n"
        "deploy_cli_commands = None\n"
        "@hookimpl\n"
        "def deploy_server_routes(register): ...\n"
        "@deploy_core.hookimpl(specname='deploy_agent_services')\n"
        "def services(register): ...\n"
        "plugins.pm.hook.deploy_status_changed(record=r, previous=None)\n"
    )
    found = _implemented_or_called(ast.parse(source))
    assert {"deploy_server_routes", "deploy_agent_services", "deploy_status_changed"} <= found
    assert "deploy_register_types" not in found
    assert "deploy_cli_commands" not in found


@pytest.mark.parametrize("name", HOOK_IDS)
def test_hook_has_a_test(name: str) -> None:
    """Test code under tests/ or plugins/*/tests implements the hook with ``@hookimpl`` or
    calls it (``pm.hook.NAME(...)``), and so exercises it."""
    assert HOOKS_EXERCISED.get(name), (
        f"no test under tests/ or plugins/*/tests implements the hook {name} with @hookimpl "
        f"or calls it (pm.hook.{name}(...)); naming it in a comment or a string does not count"
    )

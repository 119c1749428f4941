"""Every member of the plugin contract is documented (as datasette's ``tests/test_docs.py``
checks its ``@documented`` internals): ``docs/plugins.md`` names each member of
``deploy_core.plugin.__all__`` — and of its ``cli``, ``safefs`` and ``bounded`` modules — in
backticks, and each has a docstring."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

import deploy_core.plugin
import deploy_core.plugin.cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def members() -> list[tuple[str, str, object]]:
    """(module, name, object) of every public member of the contract."""
    modules: list[types.ModuleType] = [deploy_core.plugin, deploy_core.plugin.cli]
    for sub in ("safefs", "bounded"):
        module = getattr(deploy_core.plugin, sub, None)
        if isinstance(module, types.ModuleType):
            modules.append(module)
    return [(m.__name__, name, getattr(m, name)) for m in modules for name in m.__all__]


def mentioned(text: str, name: str) -> bool:
    """``name`` appears in backticks, alone or as the start of a call or attribute:
    `` `Stage` ``, `` `Stage(status, …)` ``, `` `safefs.open_dir(parent, …)` ``."""
    return re.search(rf"`(?:[\w.]*\.)?{re.escape(name)}(?:[`(.\[ ])", text) is not None


def test_every_contract_member_is_exported() -> None:
    for module, name, _ in members():
        assert name, module
    assert len({name for _, name, _ in members()}) > 30


PARAMS = [pytest.param(module, name, obj, id=f"{module}.{name}") for module, name, obj in members()]


@pytest.mark.parametrize(("module", "name", "obj"), PARAMS)
def test_docs_mention_every_member(module: str, name: str, obj: object) -> None:
    assert mentioned(DOCS.read_text(), name), (
        f"{module}.{name} is part of the plugin contract but docs/plugins.md does not "
        f"mention `{name}`: document it there"
    )


@pytest.mark.parametrize(("module", "name", "obj"), PARAMS)
def test_every_member_has_a_docstring(module: str, name: str, obj: object) -> None:
    if not (inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType)):
        return  # constants and type aliases are described in the docs only
    assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_the_docs_check_notices_a_missing_member() -> None:
    text = "Use `Stage(status, start, end)` and `safefs.open_dir(path)`."
    assert mentioned(text, "Stage") and mentioned(text, "open_dir")
    assert not mentioned(text, "DeployType") and not mentioned(text, "Sta")

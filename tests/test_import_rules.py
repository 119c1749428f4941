"""The import rules of issue 12 §2, checked by reading the source with ``ast`` (nothing is
imported):

* :mod:`deploy_core.plugin` loads nothing of the server, the agent, the command line or the
  transport (its ``cli`` module, the window onto the command line for plugins' commands, is
  the one exception, and nothing else in the package imports it);
* a plugin's own code (``plugins/*/``, ``examples/*/``, tests left out) imports nothing of
  ``deploy_core`` but :mod:`deploy_core.plugin`;
* the core's modules import each other without cycles, counting the imports inside
  functions too (a lazy import only hides a cycle; it does not break it).

Imports under ``if TYPE_CHECKING:`` never count.  Imports inside functions count for the
cycle rule only: the contract rules are about what loading a module loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "deploy_core"
PLUGIN_CONTRACT = "deploy_core.plugin"
FORBIDDEN_FOR_CONTRACT = tuple(
    f"deploy_core.{part}" for part in ("server", "agent", "cli", "transport")
)
CONTRACT_CLI = "deploy_core.plugin.cli"
CONTRACT_CLI_MAY_IMPORT = ("deploy_core.cli", "deploy_core.client")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module loads: module level, including under
    ``if``/``try``/``with`` blocks, but not under ``if TYPE_CHECKING:`` or in a function."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body)
            pending.extend(node.orelse)
            pending.extend(node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)


def module_name(path: Path, root: Path) -> str:
    """``deploy_core.server.app`` for ``root/deploy_core/server/app.py``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _function_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements inside functions (lazy imports), except those under ``if
    TYPE_CHECKING:``."""
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        pending: list[ast.stmt] = list(func.body)
        while pending:
            node = pending.pop()
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                pending.extend(node.orelse)
            elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                # Nested functions are walked on their own.
                pending.extend(n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt))


def imported_names(path: Path, name: str, known: set[str], *, lazy: bool = False) -> set[str]:
    """The modules ``path`` (module ``name``) imports when it loads (with ``lazy``: also
    inside its functions).  ``from pkg import x`` counts as importing ``pkg.x`` when that is
    a module in ``known``, else ``pkg``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    nodes = list(_load_time_imports(tree))
    if lazy:
        nodes += _function_imports(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            found.add(sub if sub in known else target)
    return found


def core_graph(*, lazy: bool = False) -> dict[str, set[str]]:
    """Each core module and the core modules it imports when it loads (with ``lazy``: also
    inside its functions)."""
    paths = {module_name(p, ROOT): p for p in CORE.rglob("*.py") if "migrations" not in p.parts}
    known = set(paths)
    return {
        name: {m for m in imported_names(path, name, known, lazy=lazy) if m in known and m != name}
        for name, path in paths.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(frozenset(group))
    return groups


def a_cycle(graph: dict[str, set[str]], group: frozenset[str]) -> list[str]:
    """One concrete import loop inside ``group``, for the failure message."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return [*paths[node], start]
                if nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return [start]


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module loading ``start`` loads, with the chain of imports that gets there."""
    chains = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt not in chains:
                chains[nxt] = [*chains[node], nxt]
                frontier.append(nxt)
    return chains


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _loads_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with each module also loading its parent packages (as Python does)."""
    full = {name: set(edges) for name, edges in graph.items()}
    for name, edges in graph.items():
        for target in list(edges):
            parts = target.split(".")
            full[name].update(
                ".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph
            )
    return full


# --------------------------------------------------------------------------- the contract


def test_the_contract_loads_nothing_of_server_agent_cli_or_transport() -> None:
    graph = _loads_parents(core_graph())
    contract = sorted(m for m in graph if _within(m, (PLUGIN_CONTRACT,)) and m != CONTRACT_CLI)
    assert PLUGIN_CONTRACT in contract
    bad = []
    for module in contract:
        for reached, chain in reachable(graph, module).items():
            if reached == CONTRACT_CLI or _within(reached, FORBIDDEN_FOR_CONTRACT):
                bad.append(" -> ".join(chain))
    assert not bad, "deploy_core.plugin must not load these (import under TYPE_CHECKING):\n" + (
        "\n".join(sorted(set(bad)))
    )


def test_a_real_interpreter_importing_the_contract_loads_none_of_them() -> None:
    """The same rule, seen from ``sys.modules`` of a fresh interpreter: nor does the contract
    load the server's or the command line's libraries (an agent imports it)."""
    code = "import sys, deploy_core.plugin; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    heavy = ("sqlalchemy", "starlette", "uvicorn", "httpx", "click", "alembic", "docker")
    bad = [m for m in loaded if _within(m, (*FORBIDDEN_FOR_CONTRACT, CONTRACT_CLI, *heavy))]
    assert not bad, f"importing deploy_core.plugin loaded {bad}"


def test_the_contract_cli_module_imports_only_the_command_line() -> None:
    direct = {m for m in core_graph()[CONTRACT_CLI] if m.startswith("deploy_core")}
    assert direct, "deploy_core.plugin.cli should re-export the command-line helpers"
    allowed = (*CONTRACT_CLI_MAY_IMPORT, PLUGIN_CONTRACT)
    strays = sorted(m for m in direct if not _within(m, allowed))
    assert not strays, f"deploy_core.plugin.cli may import only {CONTRACT_CLI_MAY_IMPORT}: {strays}"


# --------------------------------------------------------------------------- plugins


def plugin_modules() -> list[tuple[Path, str]]:
    """Every non-test module of the in-repo plugins and examples, with its module name."""
    found = []
    for top in ("plugins", "examples"):
        for project in sorted((ROOT / top).iterdir()):
            for path in sorted(project.rglob("*.py")):
                rel = path.relative_to(project).parts
                if rel[0] in ("tests", "build") or any(p.endswith(".egg-info") for p in rel):
                    continue
                found.append((path, module_name(path, project)))
    return found


def test_every_plugin_and_example_is_found() -> None:
    names = {name.split(".")[0] for _, name in plugin_modules()}
    assert {"deploy_shell", "deploy_tar", "deploy_docker", "health_checks"} <= names
    assert {"monitor_docker", "rollback_basic", "deploy_file"} <= names


@pytest.mark.parametrize(
    ("path", "name"),
    plugin_modules(),
    ids=[str(p.relative_to(ROOT)) for p, _ in plugin_modules()],
)
def test_plugin_code_imports_only_the_contract(path: Path, name: str) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):  # every import, lazy and TYPE_CHECKING ones too
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module]
        else:
            continue
        bad += [
            f"line {node.lineno}: {t}"
            for t in targets
            if _within(t, ("deploy_core",)) and not _within(t, (PLUGIN_CONTRACT,))
        ]
    assert not bad, f"{name} imports core internals; import from deploy_core.plugin: {bad}"


# --------------------------------------------------------------------------- core cycles


def test_core_modules_import_each_other_without_cycles() -> None:
    graph = core_graph()
    found = cycles(graph)
    assert not found, "import cycles among core modules (move the shared piece down):\n" + (
        "\n".join(f"{len(g)} modules, e.g. {' -> '.join(a_cycle(graph, g))}" for g in found)
    )


def test_core_modules_import_each_other_without_cycles_even_lazily() -> None:
    """An import inside a function runs later, but the two modules still need each other:
    move the shared piece into a module both import."""
    graph = core_graph(lazy=True)
    found = cycles(graph)
    assert not found, "import cycles among core modules through lazy imports:\n" + (
        "\n".join(f"{len(g)} modules, e.g. {' -> '.join(a_cycle(graph, g))}" for g in found)
    )


def test_the_cycle_finder_finds_a_cycle_and_its_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert a_cycle(graph, frozenset({"a", "b", "c"})) == ["a", "b", "c", "a"]


def test_imports_under_type_checking_and_in_functions_do_not_count(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from pkg import loaded\n"
        "from . import relative\n"
        "if TYPE_CHECKING:\n    from pkg import typing_only\n"
        "def f():\n    from pkg import lazy\n"
    )
    known = {"pkg", "pkg.loaded", "pkg.relative", "pkg.typing_only", "pkg.lazy"}
    found = imported_names(pkg / "m.py", "pkg.m", known)
    assert found == {"typing", "pkg.loaded", "pkg.relative"}


def test_lazy_imports_count_when_asked_and_type_checking_ones_never(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from pkg import loaded\n"
        "def f():\n"
        "    if TYPE_CHECKING:\n        from pkg import typing_only\n"
        "    try:\n        import pkg.lazy\n    except ImportError:\n        pass\n"
        "    def inner():\n        from pkg import nested\n"
        "class C:\n    async def g(self):\n        from . import in_method\n"
    )
    known = {"pkg", "pkg.loaded", "pkg.typing_only", "pkg.lazy", "pkg.nested", "pkg.in_method"}
    found = imported_names(pkg / "m.py", "pkg.m", known, lazy=True)
    assert found == {"typing", "pkg.loaded", "pkg.lazy", "pkg.nested", "pkg.in_method"}


# --------------------------------------------------------------------------- the server's layers

SERVER = "deploy_core.server"
SERVER_HTTP = "deploy_core.server.http"
# app.py wires the HTTP layer in; server/web.py is http.web's old path, kept for plugins.
MAY_LOAD_HTTP = {"deploy_core.server.app", "deploy_core.server.web"}


def test_no_server_service_loads_the_http_layer() -> None:
    """The handlers under ``server/http`` depend on the server's services, never the
    reverse (issue 12 §3)."""
    graph = core_graph()
    assert SERVER_HTTP in graph
    wrong = {
        module: sorted(target for target in targets if _within(target, (SERVER_HTTP,)))
        for module, targets in graph.items()
        if _within(module, (SERVER,))
        and not _within(module, (SERVER_HTTP,))
        and module not in MAY_LOAD_HTTP
    }
    assert {module: found for module, found in wrong.items() if found} == {}

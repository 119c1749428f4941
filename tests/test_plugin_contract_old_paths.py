"""The import paths plugins used before ``deploy_core.plugin`` keep working for one minor
version (issue 12 §7): the modules that moved into the contract import with a
``DeprecationWarning`` naming the new place; the names whose old module is still their home
are the very same objects.  Each import runs in a fresh interpreter, where it really loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

import deploy_core.plugin
from deploy_core.agent.context import DeployFailed as OldDeployFailed
from deploy_core.registry import DeployType as OldDeployType
from deploy_core.server.events import EventRejected as OldEventRejected
from deploy_core.server.web import ApiError as OldApiError


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("deploy_core.agent.safefs", "deploy_core.plugin.safefs", "open_dir"),
        ("deploy_core.agent.bounded", "deploy_core.plugin.bounded", "WorkBudget"),
    ],
)
def test_a_moved_module_imports_with_a_deprecation_warning(old: str, new: str, name: str) -> None:
    code = (
        "import importlib, sys, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        f"from {old} import {name}\n"
        f"assert old is new and {name} is new.{name}, (old, new)\n"
        "print([f'{w.category.__name__}: {w.message}' for w in caught])\n"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert "DeprecationWarning" in done.stdout and new in done.stdout, done.stdout


def test_the_deprecation_is_an_error_where_warnings_are() -> None:
    done = run_python("-W", "error::DeprecationWarning", "-c", "import deploy_core.agent.safefs")
    assert done.returncode != 0
    assert "moved to deploy_core.plugin.safefs" in done.stderr


def test_the_contract_itself_warns_about_nothing() -> None:
    done = run_python("-W", "error::DeprecationWarning", "-c", "import deploy_core.plugin")
    assert done.returncode == 0, done.stderr


def test_names_still_at_home_are_the_contracts_objects() -> None:
    assert OldDeployFailed is deploy_core.plugin.DeployFailed
    assert OldApiError is deploy_core.plugin.ApiError
    assert OldEventRejected is deploy_core.plugin.EventRejected
    assert OldDeployType is deploy_core.plugin.DeployType

"""Deprecated: moved to :mod:`deploy_core.plugin.bounded`, part of the plugin contract.

Importing this name still works, with a :class:`DeprecationWarning`, until the next minor
version; it is the same module object, so every name (and a monkeypatch) behaves as before.
"""

from __future__ import annotations

import sys
import warnings

from deploy_core.plugin import bounded as _moved

warnings.warn(
    "deploy_core.agent.bounded moved to deploy_core.plugin.bounded; import WorkBudget, "
    "WorkStopped, run_bounded and work_step (its step) from deploy_core.plugin; the old name "
    "goes in the next minor version",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

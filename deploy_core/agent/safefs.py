"""Deprecated: moved to :mod:`deploy_core.plugin.safefs`, part of the plugin contract.

Importing this name still works, with a :class:`DeprecationWarning`, until the next minor
version; it is the same module object, so every name (and a monkeypatch) behaves as before.
"""

from __future__ import annotations

import sys
import warnings

from deploy_core.plugin import safefs as _moved

warnings.warn(
    "deploy_core.agent.safefs moved to deploy_core.plugin.safefs; import it from there "
    "(from deploy_core.plugin import safefs); the old name goes in the next minor version",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved

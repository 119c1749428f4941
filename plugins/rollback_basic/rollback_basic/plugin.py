"""The ``rollback_basic`` plugin: registers the ``inline``, ``script`` and ``snapshot``
rollback strategies with Deploy Center."""

from __future__ import annotations

from collections.abc import Callable

from deploy_core.plugin import RollbackStrategy, hookimpl

from rollback_basic.inline import INLINE
from rollback_basic.script import SCRIPT
from rollback_basic.snapshot import SNAPSHOT

STRATEGIES = (INLINE, SCRIPT, SNAPSHOT)


@hookimpl
def deploy_register_rollback_strategies(register: Callable[[RollbackStrategy], None]) -> None:
    """Register the three strategies."""
    for strategy in STRATEGIES:
        register(strategy)

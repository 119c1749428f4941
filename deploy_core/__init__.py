"""Deploy Center core: routing, records, locks, callbacks and transport.

Deploy types, health checks and rollback strategies come from plugins; see
:mod:`deploy_core.hookspecs` for the hooks and ``docs/plugins.md`` for the author's guide.
"""

from deploy_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]

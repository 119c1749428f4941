"""Deploy Center core: routing, records, locks, callbacks and transport.

Deploy types, health checks and rollback strategies come from plugins.  A plugin imports
only :mod:`deploy_core.plugin`, the stable contract; the hooks are in
:mod:`deploy_core.hookspecs` and ``docs/plugins.md`` is the author's guide.
"""

from deploy_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]

"""Deploy Center health checks: ``http``, ``tcp`` and ``script`` (SPEC deploy-16).

Each check is a single-attempt probe registered through
:func:`health_checks.plugin.deploy_register_health_checks`; the core's health loop
(:mod:`deploy_core.agent.health`) owns retries, intervals and timeouts.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

"""Deploy Center rollback strategies: ``inline``, ``script`` and ``snapshot``.

Registered through the ``deploy_core`` entry-point group by :mod:`rollback_basic.plugin`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

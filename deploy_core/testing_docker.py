"""Where the Docker test bed keeps its registry, for tests that push to or pull from it.

``scripts/docker-testbed.sh`` starts a registry of its own on a free loopback port and records
its address (``host:port``) in ``registry.address`` under its state directory
(``/var/lib/deploy-center-testbed``, or ``$DEPLOY_CENTER_TESTBED_STATE``).  Tests read the
address here instead of assuming a port, so they never use a registry the test bed did not
start.  ``DEPLOY_CENTER_TEST_REGISTRY`` names another registry and wins when set.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REGISTRY_ENV", "no_registry_reason", "registry_address", "registry_address_file"]

REGISTRY_ENV = "DEPLOY_CENTER_TEST_REGISTRY"
"""Environment variable naming the tests' registry (``host:port``), over the recorded one."""

_STATE_ENV = "DEPLOY_CENTER_TESTBED_STATE"
_DEFAULT_STATE = "/var/lib/deploy-center-testbed"


def registry_address_file() -> Path:
    """The file in which ``scripts/docker-testbed.sh`` records its registry's address."""
    return Path(os.environ.get(_STATE_ENV) or _DEFAULT_STATE) / "registry.address"


def registry_address() -> str | None:
    """The test registry's ``host:port``: ``$DEPLOY_CENTER_TEST_REGISTRY``, else the address
    the test bed recorded; ``None`` when neither exists (run ``bash
    scripts/docker-testbed.sh``)."""
    named = os.environ.get(REGISTRY_ENV, "").strip()
    if named:
        return named
    try:
        recorded = registry_address_file().read_text().strip()
    except OSError:
        return None
    return recorded or None


def no_registry_reason() -> str:
    """What to tell the user when :func:`registry_address` found no registry."""
    return (
        f"no test registry recorded (${REGISTRY_ENV} or {registry_address_file()});"
        " run `bash scripts/docker-testbed.sh`"
    )

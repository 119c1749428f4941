"""The one exception this plugin raises when a strategy cannot do its work."""

from __future__ import annotations


class RollbackError(RuntimeError):
    """A strategy step (snapshot, rollback, restart) failed; the message says what went wrong
    and what to do.

    Raised from ``rollback``, the core reports the message as the rollback's error and ends
    the deployment ``rollback_failed``.
    """

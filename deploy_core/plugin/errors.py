"""The exceptions a plugin raises to tell the core what went wrong.

They live here, in the contract, and the core imports them from here: the agent catches
:class:`DeployFailed`, the HTTP layer answers :class:`ApiError`, the event router tells the
agent about :class:`EventRejected`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from deploy_core.models import DeployStatus

__all__ = ["ApiError", "DeployFailed", "EventRejected"]


class DeployFailed(Exception):
    """Raised by an executor (or a rollback, or a probe's helper) to fail the deployment,
    optionally with its result attached.

    :param message: one line for the record, saying what failed and, if it can, what to do.
    :param result: the deploy type's result model as far as the work got (shown with the
        failed record).
    :param status: ``failed`` (the default) or ``timeout``.
    """

    def __init__(
        self,
        message: str,
        *,
        result: BaseModel | None = None,
        status: DeployStatus = DeployStatus.FAILED,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.status = status


class ApiError(Exception):
    """Raised by an HTTP handler (a plugin's route too) for an error answer.

    The API answers ``{"error": message, "detail": detail}`` with status ``status``.

    :param status: the HTTP status, e.g. ``404`` or ``422``.
    :param message: what was wrong and what to do, e.g. ``unknown client 'web-9'``.
    :param detail: optional JSON-able detail (field errors).
    """

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class EventRejected(Exception):
    """Raised by an event handler that refuses an event for good (malformed, unknown
    deployment …).

    The agent is told why and drops the event instead of sending it again.  Any other
    exception leaves the event unacknowledged, so the agent sends it again later.
    """

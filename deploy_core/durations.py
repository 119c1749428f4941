"""Durations written for people: ``2 s``, ``15 min``, ``3 days`` (not ``2.31481e-05 days``)."""

from __future__ import annotations

_UNITS = ((86400.0, "day"), (3600.0, "h"), (60.0, "min"), (1.0, "s"))


def human_duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number at least 1 (seconds below one),
    with at most one decimal: ``0.5 s``, ``30 s``, ``1.5 min``, ``12 h``, ``1 day``,
    ``30 days``."""
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {seconds!r}")
    size, unit = next(((s, u) for s, u in _UNITS if seconds >= s), _UNITS[-1])
    number = f"{seconds / size:.1f}".removesuffix(".0")
    if unit == "day" and number != "1":
        unit = "days"
    return f"{number} {unit}"

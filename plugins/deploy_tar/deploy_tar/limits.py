"""The caps on one archive (:class:`ExtractLimits`), apart from :mod:`deploy_tar.rules` so that
the parameter model, which an agent loads with the plugin, does not import :mod:`tarfile`:
an agent imports the extraction code only when a ``deploy.tar`` arrives (issue 12 item 6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["DEFAULT_LIMITS", "ExtractLimits"]


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what one archive may contain; every field must be positive."""

    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3
    max_member_bytes: int = 1 * 1024**3
    max_ratio: float = 200.0  # uncompressed tar stream / archive file size
    max_path_length: int = 4096  # bytes of a member name or symlink target
    max_depth: int = 64  # path components of a member name

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ValueError(f"ExtractLimits.{field.name} must be positive, got {value!r}")


DEFAULT_LIMITS = ExtractLimits()

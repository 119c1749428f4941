"""Parameters of a ``deploy.tar`` deployment and of the ``release`` rollback strategy.

Everything a request can get wrong is refused here, at the API, with the field named: the
artifact is a SHA-256, the target directory an absolute path that is not ``/``, script paths
stay inside the package, limit overrides stay within bounds the agent can afford.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from deploy_core.plugin import DeployParams, RollbackParams
from deploy_tar.rules import DEFAULT_LIMITS, ExtractLimits

__all__ = ["LimitOverrides", "PackagePath", "ReleaseParams", "TarParams"]

GiB = 1024**3
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Variables the plugin sets for the install script; a request may not override them.
RESERVED_ENV = frozenset(
    {"DEPLOY_ACTION", "DEPLOY_ID", "RELEASE_DIR", "PREVIOUS_RELEASE", "TARGET_DIR"}
)


def _package_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    if value.startswith("/"):
        raise ValueError(f"{value!r} must be relative to the package root, not absolute")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{value!r} must stay inside the package ('..' is not allowed)")
    if not parts:
        raise ValueError(f"{value!r} names no file")
    return "/".join(parts)


PackagePath = Annotated[str, Field(max_length=1024), AfterValidator(_package_path)]
"""A file inside the package, relative to its root (``install.sh``, ``bin/start``)."""


def _target_dir(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{value!r} must not contain '..'")
    if not parts:
        raise ValueError("'/' cannot be a target directory; name a directory of its own")
    return "/" + "/".join(parts)


def _env(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 256:
        raise ValueError("at most 256 environment variables")
    for key, val in value.items():
        if not ENV_NAME.fullmatch(key):
            raise ValueError(f"invalid environment variable name {key!r}")
        if key in RESERVED_ENV:
            raise ValueError(f"{key} is set by deploy.tar itself")
        if "\x00" in val or len(val) > 32768:
            raise ValueError(f"environment variable {key} has a NUL byte or is over 32 KiB")
    return value


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class LimitOverrides(BaseModel):
    """Extraction limits a request may change; unset fields keep the defaults
    (:class:`~deploy_tar.rules.ExtractLimits`). The upper bounds keep one package from
    filling the agent's disk or memory whatever the request says."""

    model_config = ConfigDict(extra="forbid")

    max_members: int | None = Field(None, ge=1, le=1_000_000, description="default 100000")
    max_total_bytes: int | None = Field(None, ge=1, le=16 * GiB, description="default 2 GiB")
    max_member_bytes: int | None = Field(None, ge=1, le=16 * GiB, description="default 1 GiB")
    max_ratio: float | None = Field(
        None, ge=1, le=1000, description="uncompressed / compressed size; default 200"
    )
    max_path_length: int | None = Field(None, ge=1, le=4096, description="default 4096 bytes")
    max_depth: int | None = Field(None, ge=1, le=256, description="default 64 path levels")

    def to_limits(self) -> ExtractLimits:
        """The limits to extract with: the defaults, with these overrides."""
        values = {f.name: getattr(DEFAULT_LIMITS, f.name) for f in fields(ExtractLimits)}
        values.update(self.model_dump(exclude_none=True))
        return ExtractLimits(**values)


class TarParams(DeployParams):
    """Parameters of a ``deploy.tar`` deployment."""

    artifact: Annotated[str, BeforeValidator(_lower)] = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the package in the server's artifact store "
        "(upload it first: POST /api/artifacts)",
    )
    target_dir: Annotated[str, AfterValidator(_target_dir)] = Field(
        max_length=4096,
        description="absolute directory holding releases/ and the current symlink; "
        "created if missing",
    )
    install_script: PackagePath | None = Field(
        None,
        description="script inside the package run in the release directory; default "
        "install.sh at the package root if there is one",
    )
    env: Annotated[dict[str, str], AfterValidator(_env)] = Field(
        default_factory=dict, description="extra environment variables for the install script"
    )
    keep_releases: int = Field(
        5, ge=1, le=100, description="releases kept; older ones are removed after a success"
    )
    limits: LimitOverrides = Field(
        default_factory=LimitOverrides, description="extraction limit overrides"
    )
    timeout: float = Field(
        600.0, gt=0, le=86400, description="seconds for fetch, extraction and install together"
    )


class ReleaseParams(RollbackParams):
    """``{"strategy": "release"}``: switch ``current`` back to the release before.

    The previous release is started again by re-running its own install script with
    ``DEPLOY_ACTION=rollback``, or by ``start``, a script inside it, when given.
    """

    strategy: Literal["release"] = "release"
    start: PackagePath | None = Field(
        None,
        description="script inside the previous release that starts it again; default: "
        "its install script, run with DEPLOY_ACTION=rollback",
    )
    timeout: float = Field(300.0, gt=0, le=86400)

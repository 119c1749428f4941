"""Parameters of a ``deploy.tar`` deployment and of the ``release`` rollback strategy.

Everything a request can get wrong is refused here, at the API, with the field named: the
artifact is a SHA-256, the target directory an absolute path that is not ``/``, script paths
stay inside the package, limit overrides stay within bounds the agent can afford.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from deploy_core.plugin import DeployParams, RollbackParams
from deploy_tar.limits import DEFAULT_LIMITS, ExtractLimits
from deploy_tar.url_source import check_url, redact

__all__ = ["LimitOverrides", "PackagePath", "ReleaseParams", "TarParams", "UrlSource"]

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
    (:class:`~deploy_tar.limits.ExtractLimits`). The upper bounds keep one package from
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


def _url(value: str) -> str:
    parts = check_url(value)  # the shape; the server's allow-list is checked by server_check
    if parts.query:
        raise ValueError(
            f"{redact(value)} has a query string, which would be stored with the deployment: "
            "put it (without the '?') in secret_env and name that variable in "
            "source.query_secret (deployctl deploy tar --package-url does this for you)"
        )
    if parts.fragment or value.endswith("#"):
        raise ValueError(f"{redact(value)}: a URL fragment ('#…') is not allowed")
    return value


class UrlSource(BaseModel):
    """A package the agent fetches itself from an HTTP(S) URL (docs/tar.md, "URL sources")."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, AfterValidator(_url)] = Field(
        max_length=8192,
        description="https:// URL of the package (http:// only to loopback or a host in "
        "allow_http_hosts); no user info, no query string (see query_secret)",
    )
    sha256: Annotated[str, BeforeValidator(_lower)] = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 the package must have"
    )
    size: int | None = Field(
        None,
        ge=1,
        le=64 * GiB,
        description="the package's size in bytes: the most the agent reads, and what the "
        "server must announce; default: the agent's max_bytes limit",
    )
    query_secret: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="name of the secret_env variable holding the URL's query string (a "
        "presigned URL's credentials), kept out of records and logs",
    )


class TarParams(DeployParams):
    """Parameters of a ``deploy.tar`` deployment: the package is ``artifact`` (in the
    server's store) or ``source`` (a URL the agent fetches), exactly one."""

    artifact: Annotated[str | None, BeforeValidator(_lower)] = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the package in the server's artifact store "
        "(upload it first: POST /api/artifacts); or give source",
    )
    source: UrlSource | None = Field(
        None,
        description='{"url": "https://…", "sha256": "…", "size": N}: a package the agent '
        "fetches from a URL instead of the server's store",
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

    @model_validator(mode="after")
    def _one_package(self) -> TarParams:
        if (self.artifact is None) == (self.source is None):
            raise ValueError(
                "give exactly one of artifact (a SHA-256 in the server's store) and source "
                '({"url": "https://…", "sha256": "…"})'
            )
        # Validated as part of a deploy request, the request's secret_env is here too.
        secrets: Any = getattr(self, "secret_env", None)
        query = self.source.query_secret if self.source is not None else None
        if query is not None and isinstance(secrets, dict) and query not in secrets:
            raise ValueError(f"source.query_secret names {query}, which is not in secret_env")
        return self

    @property
    def sha256(self) -> str:
        """The package's SHA-256, whichever way it comes."""
        if self.source is not None:
            return self.source.sha256
        assert self.artifact is not None  # _one_package
        return self.artifact


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

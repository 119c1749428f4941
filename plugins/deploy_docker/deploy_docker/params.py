"""Parameters of a ``deploy.docker`` deployment and of the ``previous_container`` strategy.

Ports and volumes accept the short forms operators type for ``docker run``
(``"127.0.0.1:8080:80/tcp"``, ``"/srv/data:/data:ro"``) as well as objects; both become the
same models, so the rest of the plugin sees one shape.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deploy_core.plugin import DeployParams, RollbackParams

# Docker's own rule for container names; the suffix ".prev-<8 hex>" must still fit.
CONTAINER_NAME = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,99}$"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:+-]*(@sha256:[0-9a-f]{64})?$")
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Labels the plugin sets itself (see deploy_docker.containers); requests may not set them.
RESERVED_LABEL_PREFIX = "deploy-center."


class PortBinding(BaseModel):
    """One published port: ``container_port`` inside, ``host_ip:host_port`` outside."""

    model_config = ConfigDict(extra="forbid")

    container_port: int = Field(ge=1, le=65535)
    host_port: int | None = Field(
        None, ge=1, le=65535, description="port on the host; none lets the engine pick one"
    )
    host_ip: str = Field("", description="host address to bind; empty means every address")
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"host_ip {value!r} is not an IP address") from None
        return value

    @classmethod
    def parse(cls, text: str) -> PortBinding:
        """Parse ``docker run -p`` syntax: ``[IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]``."""
        spec, _, proto = text.partition("/")
        parts = spec.split(":")
        if len(parts) > 3 or not all(p.isdigit() for p in parts[-2:] if p) or not parts[-1]:
            raise ValueError(
                f"port {text!r} must look like '8080', '8080:80', '127.0.0.1:8080:80' "
                "or '127.0.0.1::80', optionally followed by '/tcp' or '/udp'"
            )
        fields: dict[str, Any] = {"container_port": int(parts[-1])}
        if len(parts) >= 2 and parts[-2]:
            fields["host_port"] = int(parts[-2])
        if len(parts) == 3:
            fields["host_ip"] = parts[0]
        if proto:
            fields["protocol"] = proto
        return cls.model_validate(fields)

    @property
    def key(self) -> str:
        """The engine's name for the container side: ``80/tcp``."""
        return f"{self.container_port}/{self.protocol}"


class VolumeMount(BaseModel):
    """A bind mount (absolute host path) or a named volume, mounted at ``target``."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=4096, description="host path or volume name")
    target: str = Field(min_length=2, max_length=4096, description="absolute path inside")
    read_only: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value.startswith("/") and not VOLUME_NAME.match(value):
            raise ValueError(f"volume source {value!r} must be an absolute path or a volume name")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if not value.startswith("/") or ":" in value:
            raise ValueError(f"volume target {value!r} must be an absolute path without ':'")
        return value

    @classmethod
    def parse(cls, text: str) -> VolumeMount:
        """Parse ``docker run -v`` syntax: ``SOURCE:TARGET[:ro|rw]``."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"volume {text!r} must look like '/host/dir:/in/container[:ro]'")
        return cls(source=parts[0], target=parts[1], read_only=parts[2:] == ["ro"])


class RegistryAuth(BaseModel):
    """Credentials for a private registry, sent to the engine for this pull only.

    Prefer ``password_secret``: it names a variable of the request's ``secret_env``, whose
    value the core keeps out of the deployment record (``password`` is stored with it).
    That variable is not passed to the container.
    """

    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=256)
    password: str | None = Field(None, min_length=1, max_length=4096)
    password_secret: str | None = Field(
        None, pattern=ENV_NAME.pattern, description="name of a secret_env variable"
    )
    server: str | None = Field(None, max_length=512, description="default: the image's registry")

    @model_validator(mode="after")
    def _one_password(self) -> RegistryAuth:
        if (self.password is None) == (self.password_secret is None):
            raise ValueError("give exactly one of password and password_secret")
        return self


class DockerParams(DeployParams):
    """Parameters of a ``deploy.docker`` deployment."""

    image: str = Field(
        min_length=1, max_length=512, description="image reference: repo[:tag] or repo@sha256:…"
    )
    container_name: str = Field(pattern=CONTAINER_NAME, description="name of the container")
    ports: list[PortBinding] = Field(default_factory=list, max_length=64)
    env: dict[str, str] = Field(default_factory=dict, description="environment variables")
    command: list[str] | None = Field(
        None, max_length=256, description="overrides the image's CMD (a string is split)"
    )
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=64)
    restart_policy: Literal["no", "always", "unless-stopped", "on-failure"] = "unless-stopped"
    restart_max_retries: int = Field(0, ge=0, le=1000, description="for on-failure only")
    network: str | None = Field(
        None, max_length=256, description="'host', 'bridge', 'none' or a network's name"
    )
    labels: dict[str, str] = Field(default_factory=dict)
    init: bool = Field(False, description="run an init process as PID 1 (docker run --init)")
    registry_auth: RegistryAuth | None = None
    pull_policy: Literal["always", "missing", "never"] = "always"
    pull_timeout: float = Field(300.0, gt=0, le=86400, description="seconds the pull may take")
    stop_timeout: int = Field(
        10, ge=0, le=3600, description="grace seconds between SIGTERM and SIGKILL"
    )
    start_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds for the container to run (and be healthy)"
    )
    min_uptime: float = Field(
        2.0, ge=0, le=600, description="seconds it must keep running to count as started"
    )
    start_first: bool = Field(
        False,
        description="start the new container before stopping the old one (zero downtime "
        "behind a proxy); only when their host ports do not clash",
    )
    api_timeout: float = Field(30.0, gt=0, le=600, description="seconds for one engine call")
    timeout: float = Field(600.0, gt=0, le=86400, description="seconds the deployment may take")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not IMAGE_REF.match(value):
            raise ValueError(
                f"image {value!r} is not an image reference (repo[:tag] or repo@sha256:<64 hex>)"
            )
        return value

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [PortBinding.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [VolumeMount.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"command cannot be split into words: {exc}") from None
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 256:
            raise ValueError("at most 256 environment variables")
        for key, val in value.items():
            if not ENV_NAME.match(key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if "\x00" in val or len(val) > 32768:
                raise ValueError(f"environment variable {key} has a NUL byte or is over 32 KiB")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise ValueError(f"label {key!r}: the prefix {RESERVED_LABEL_PREFIX} is reserved")
        return value

    @model_validator(mode="after")
    def _distinct_host_ports(self) -> DockerParams:
        seen: set[tuple[str, int, str]] = set()
        for port in self.ports:
            if port.host_port is None:
                continue
            key = (port.host_ip, port.host_port, port.protocol)
            if key in seen:
                raise ValueError(f"host port {port.host_port}/{port.protocol} is published twice")
            seen.add(key)
        return self


class PreviousContainerParams(RollbackParams):
    """``{"strategy": "previous_container"}``: put back the container the deployment replaced.

    ``timeout`` bounds the whole rollback (remove the new container, restore the old one and
    wait for it to run).
    """

    strategy: Literal["previous_container"] = "previous_container"
    timeout: float = Field(180.0, gt=0, le=86400)

"""What a container is made of, in one JSON-able shape.

A new container's :class:`ContainerSpec` comes from the deployment's parameters; the
container it replaces is captured the same way from the engine's inspect data, so the
``previous_container`` strategy can create it again if it is gone.  Both are created by the
same call (:meth:`deploy_docker.engine.Engine.create`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deploy_docker.params import DockerParams

# Labels on every container this plugin creates.  The Docker monitor plugin reports the
# containers carrying MANAGED_LABEL=1 (a convention between the two distributions).
MANAGED_LABEL = "deploy-center.managed"
NAME_LABEL = "deploy-center.name"
DEPLOY_LABEL = "deploy-center.deploy-id"
# Names of the environment variables that came from the request's secret_env: their values
# are never copied into a spec captured from the engine (it travels to the server).
SECRETS_LABEL = "deploy-center.secret-env"

# Host addresses that mean "every address": a binding on one clashes with any other.
ANY_ADDRESS = {"", "0.0.0.0", "::"}


def previous_name(name: str, deploy_id: str) -> str:
    """The name the replaced container is kept under while a deployment runs."""
    return f"{name}.prev-{deploy_id[:8]}"


class ContainerSpec(BaseModel):
    """Everything the plugin sets when it creates a container."""

    model_config = ConfigDict(extra="forbid")

    image: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    env: list[str] = Field(default_factory=list, description="KEY=VALUE")
    labels: dict[str, str] = Field(default_factory=dict)
    exposed: list[str] = Field(default_factory=list, description="'80/tcp' …")
    port_bindings: dict[str, list[dict[str, str]]] = Field(
        default_factory=dict, description="the engine's form: {'80/tcp': [{HostIp, HostPort}]}"
    )
    binds: list[str] = Field(default_factory=list, description="'source:target:ro|rw'")
    restart_policy: dict[str, Any] = Field(default_factory=dict)
    network_mode: str | None = None
    init: bool | None = None
    working_dir: str | None = None
    user: str | None = None
    secret_names: list[str] = Field(
        default_factory=list, description="secret variables left out of ``env``"
    )

    @classmethod
    def from_params(
        cls, params: DockerParams, deploy_id: str, secrets: Mapping[str, str] | None = None
    ) -> ContainerSpec:
        """The spec of the container a deployment creates; ``secrets`` join its environment
        (their names are labelled, see :data:`SECRETS_LABEL`)."""
        bindings: dict[str, list[dict[str, str]]] = {}
        for port in params.ports:
            bindings.setdefault(port.key, []).append(
                {
                    "HostIp": port.host_ip,
                    "HostPort": "" if port.host_port is None else str(port.host_port),
                }
            )
        restart: dict[str, Any] = {"Name": params.restart_policy}
        if params.restart_policy == "on-failure":
            restart["MaximumRetryCount"] = params.restart_max_retries
        env = {**params.env, **(secrets or {})}
        labels = {
            **params.labels,
            MANAGED_LABEL: "1",
            NAME_LABEL: params.container_name,
            DEPLOY_LABEL: deploy_id,
        }
        if secrets:
            labels[SECRETS_LABEL] = ",".join(sorted(secrets))
        return cls(
            image=params.image,
            command=params.command,
            env=[f"{k}={v}" for k, v in env.items()],
            labels=labels,
            exposed=list(bindings),
            port_bindings=bindings,
            binds=[
                f"{v.source}:{v.target}:{'ro' if v.read_only else 'rw'}" for v in params.volumes
            ],
            restart_policy=restart,
            network_mode=params.network,
            init=params.init or None,
        )

    @classmethod
    def from_inspect(cls, attrs: dict[str, Any]) -> ContainerSpec:
        """The spec of an existing container, pinned to its image id, without the values of
        its secret variables (see :meth:`secret_values`)."""
        config = attrs.get("Config") or {}
        host = attrs.get("HostConfig") or {}
        labels = config.get("Labels") or {}
        secret_names = [n for n in labels.get(SECRETS_LABEL, "").split(",") if n]
        bindings = {
            key: [
                {"HostIp": b.get("HostIp", ""), "HostPort": b.get("HostPort", "")}
                for b in (values or [])
            ]
            for key, values in (host.get("PortBindings") or {}).items()
        }
        return cls(
            image=attrs.get("Image") or config.get("Image", ""),
            command=config.get("Cmd"),
            entrypoint=config.get("Entrypoint"),
            env=[e for e in config.get("Env") or [] if e.split("=", 1)[0] not in secret_names],
            labels=labels,
            exposed=sorted(set(config.get("ExposedPorts") or {}) | set(bindings)),
            port_bindings=bindings,
            binds=host.get("Binds") or [],
            restart_policy=host.get("RestartPolicy") or {},
            network_mode=host.get("NetworkMode") or None,
            init=host.get("Init"),
            working_dir=config.get("WorkingDir") or None,
            user=config.get("User") or None,
            secret_names=secret_names,
        )

    @staticmethod
    def secret_values(attrs: dict[str, Any]) -> dict[str, str]:
        """The values of an existing container's secret variables (kept on the agent only)."""
        config = attrs.get("Config") or {}
        names = set((config.get("Labels") or {}).get(SECRETS_LABEL, "").split(",")) - {""}
        pairs = (e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
        return {k: v for k, v in pairs if k in names}

    def with_secrets(self, values: Mapping[str, str]) -> ContainerSpec:
        """This spec with secret variables put back into its environment."""
        return self.model_copy(
            update={"env": [*self.env, *(f"{k}={v}" for k, v in values.items())]}
        )

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the SDK's ``create_container`` (but name and host config)."""
        ports = [(int(p.split("/")[0]), p.split("/")[1]) for p in self.exposed]
        return {
            "image": self.image,
            "command": self.command,
            "entrypoint": self.entrypoint,
            "environment": self.env,
            "labels": self.labels,
            "ports": ports,
            "working_dir": self.working_dir,
            "user": self.user,
        }

    def host_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the SDK's ``create_host_config``."""
        kwargs: dict[str, Any] = {
            "port_bindings": self.port_bindings,
            "binds": self.binds,
            "restart_policy": self.restart_policy or None,
        }
        if self.network_mode:
            kwargs["network_mode"] = self.network_mode
        if self.init is not None:
            kwargs["init"] = self.init
        return kwargs

    def host_ports(self) -> set[tuple[str, str, str]]:
        """``(host_ip, host_port, protocol)`` of every fixed host port it publishes."""
        out = set()
        for key, bindings in self.port_bindings.items():
            protocol = key.split("/")[1] if "/" in key else "tcp"
            for binding in bindings:
                if binding.get("HostPort"):
                    out.add((binding.get("HostIp", ""), binding["HostPort"], protocol))
        return out

    def clashes_with(self, other: ContainerSpec) -> list[str]:
        """Host ports both would publish (``8080/tcp``): they cannot run side by side."""
        clashes = set()
        if self.network_mode == "host" and other.network_mode == "host":
            clashes |= set(self.exposed) & set(other.exposed)
        for ip, port, proto in self.host_ports():
            for other_ip, other_port, other_proto in other.host_ports():
                same_address = ip == other_ip or ip in ANY_ADDRESS or other_ip in ANY_ADDRESS
                if port == other_port and proto == other_proto and same_address:
                    clashes.add(f"{port}/{proto}")
        return sorted(clashes)

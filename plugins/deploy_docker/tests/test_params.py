"""Parameters and container specs: the short forms operators type, what is refused, and
what the engine is asked for."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deploy_docker.params import DockerParams, PortBinding, VolumeMount
from deploy_docker.spec import MANAGED_LABEL, NAME_LABEL, ContainerSpec, previous_name

BASE = {"image": "127.0.0.1:5000/web:v1", "container_name": "web"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80", PortBinding(container_port=80)),
        ("8080:80", PortBinding(container_port=80, host_port=8080)),
        (
            "127.0.0.1:8080:80/udp",
            PortBinding(container_port=80, host_port=8080, host_ip="127.0.0.1", protocol="udp"),
        ),
        ("127.0.0.1::80", PortBinding(container_port=80, host_ip="127.0.0.1")),
    ],
)
def test_ports_take_docker_run_syntax(text: str, expected: PortBinding) -> None:
    assert DockerParams.model_validate({**BASE, "ports": [text]}).ports == [expected]


def test_volumes_take_docker_run_syntax() -> None:
    params = DockerParams.model_validate(
        {
            **BASE,
            "volumes": ["/srv/data:/data:ro", "cache:/cache", {"source": "/a", "target": "/b"}],
        }
    )
    assert params.volumes == [
        VolumeMount(source="/srv/data", target="/data", read_only=True),
        VolumeMount(source="cache", target="/cache"),
        VolumeMount(source="/a", target="/b"),
    ]


def test_a_command_string_is_split_like_a_shell() -> None:
    params = DockerParams.model_validate({**BASE, "command": "httpd -f -h '/my www'"})
    assert params.command == ["httpd", "-f", "-h", "/my www"]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"image": "has space:v1"}, "image"),
        ({"image": "web@sha256:short"}, "image"),
        ({"container_name": "-web"}, "container_name"),
        ({"container_name": "web/1"}, "container_name"),
        ({"ports": ["http"]}, "ports"),
        ({"ports": ["1.2.3.4:80:80:80"]}, "ports"),
        ({"ports": ["70000:80"]}, "ports"),
        ({"ports": ["nothost:8080:80"]}, "ports"),
        ({"ports": ["8080:80", "8080:81"]}, "published twice"),
        ({"volumes": ["relative/dir:/data"]}, "volumes"),
        ({"volumes": ["/a:relative"]}, "volumes"),
        ({"volumes": ["/a:/b:rx"]}, "volumes"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"labels": {"deploy-center.managed": "0"}}, "reserved"),
        ({"restart_policy": "sometimes"}, "restart_policy"),
        ({"pull_policy": "maybe"}, "pull_policy"),
        ({"stop_timeout": -1}, "stop_timeout"),
        ({"command": "unbalanced 'quote"}, "command"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_parameters_name_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as err:
        DockerParams.model_validate({**BASE, **fields})
    assert where in str(err.value)


def test_spec_from_params_is_what_the_engine_is_asked_for() -> None:
    params = DockerParams.model_validate(
        {
            **BASE,
            "ports": ["127.0.0.1:8080:80", "9000/udp"],
            "env": {"A": "1"},
            "volumes": ["/srv:/srv:ro"],
            "restart_policy": "on-failure",
            "restart_max_retries": 3,
            "labels": {"team": "web"},
            "init": True,
        }
    )
    spec = ContainerSpec.from_params(params, "0123456789abcdef")
    assert spec.create_kwargs()["ports"] == [(80, "tcp"), (9000, "udp")]
    assert spec.create_kwargs()["environment"] == ["A=1"]
    assert spec.labels == {
        "team": "web",
        MANAGED_LABEL: "1",
        NAME_LABEL: "web",
        "deploy-center.deploy-id": "0123456789abcdef",
    }
    host = spec.host_config_kwargs()
    assert host["port_bindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
        "9000/udp": [{"HostIp": "", "HostPort": ""}],
    }
    assert host["binds"] == ["/srv:/srv:ro"]
    assert host["restart_policy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert host["init"] is True
    assert previous_name("web", "0123456789abcdef") == "web.prev-01234567"


def test_spec_from_inspect_pins_the_image_id() -> None:
    attrs = {
        "Image": "sha256:abc",
        "Config": {
            "Image": "web:v1",
            "Cmd": ["httpd"],
            "Env": ["PATH=/bin", "A=1"],
            "Labels": {NAME_LABEL: "web"},
            "ExposedPorts": {"8080/tcp": {}},
        },
        "HostConfig": {
            "PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18080"}]},
            "Binds": None,
            "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
            "NetworkMode": "default",
        },
    }
    spec = ContainerSpec.from_inspect(attrs)
    assert spec.image == "sha256:abc"
    assert spec.command == ["httpd"] and spec.env == ["PATH=/bin", "A=1"]
    assert spec.host_ports() == {("127.0.0.1", "18080", "tcp")}
    assert ContainerSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("old", "new", "clash"),
    [
        (["127.0.0.1:8080:80"], ["127.0.0.1:8081:80"], []),
        (["127.0.0.1:8080:80"], ["127.0.0.1:8080:80"], ["8080/tcp"]),
        (["8080:80"], ["127.0.0.2:8080:80"], ["8080/tcp"]),
        (["127.0.0.1:8080:80"], ["127.0.0.2:8080:80"], []),
        (["8080:80/udp"], ["8080:80/tcp"], []),
        (["80"], ["80"], []),
    ],
)
def test_port_clashes_decide_start_first(old: list[str], new: list[str], clash: list[str]) -> None:
    def spec(ports: list[str]) -> ContainerSpec:
        return ContainerSpec.from_params(DockerParams.model_validate({**BASE, "ports": ports}), "d")

    assert spec(new).clashes_with(spec(old)) == clash

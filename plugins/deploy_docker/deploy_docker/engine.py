"""The Docker engine as the plugin uses it: every call in a thread, every call with a timeout,
every failure turned into an :class:`EngineError` that carries the engine's own reason.

The docker SDK blocks.  Calls run in daemon threads (:func:`in_thread`): the event loop never
waits on the engine, and a call the engine never answers cannot keep the agent from exiting.
The SDK's own socket timeout (``timeout``) bounds each request; :meth:`Engine.call` adds an
overall bound on top, because a streamed pull has no socket timeout of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, NotFound
from docker.utils import parse_repository_tag

from deploy_docker.spec import ContainerSpec

T = TypeVar("T")

DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineError(Exception):
    """A Docker engine call failed; the message says what was attempted and why."""


class EngineUnreachable(EngineError):
    """The engine does not answer at all."""


class EngineTimeout(EngineError):
    """The engine did not finish a call within its timeout."""


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run ``fn`` in a new daemon thread; a future for its result on the running loop.

    Cancelling the future (e.g. by :func:`asyncio.wait_for`) stops waiting, not the thread:
    the thread ends when the SDK call returns or its socket times out.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if future.done():
            return
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value: Any = fn(*args, **kwargs)
            failed = False
        except BaseException as exc:
            value, failed = exc, True
        # The loop may be gone when a call outlives its deployment: nobody is waiting then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, failed)

    threading.Thread(
        target=run, name=f"docker-{getattr(fn, '__name__', 'call')}", daemon=True
    ).start()
    return future


def engine_address() -> str:
    """Where the engine is expected: ``DOCKER_HOST``, else the default socket."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def _reason(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        explanation = exc.explanation
        if isinstance(explanation, bytes):
            explanation = explanation.decode(errors="replace")
        return str(explanation or exc).strip()
    return str(exc).strip() or type(exc).__name__


class Engine:
    """A connection to one Docker engine.  Build it with :meth:`connect`."""

    def __init__(self, api: docker.APIClient, *, address: str, timeout: float) -> None:
        self.api = api
        self.address = address
        self.timeout = timeout

    @classmethod
    async def connect(cls, *, timeout: float = 30.0, address: str | None = None) -> Engine:
        """Connect and agree on an API version (one round trip).

        :raises EngineUnreachable: nothing answers at the address within ``timeout``.
        """
        where = address or engine_address()

        def make() -> docker.APIClient:
            kwargs: dict[str, Any] = docker.utils.kwargs_from_env()
            if address is not None:
                kwargs["base_url"] = address
            kwargs.setdefault("base_url", DEFAULT_HOST)
            return docker.APIClient(version="auto", timeout=timeout, **kwargs)

        try:
            api = await asyncio.wait_for(in_thread(make), timeout + 1)
        except TimeoutError:
            raise EngineUnreachable(
                f"the Docker engine at {where} did not answer within {timeout:g}s"
            ) from None
        except (DockerException, requests.RequestException, OSError) as exc:
            raise EngineUnreachable(
                f"the Docker engine at {where} is not reachable ({_reason(exc)}); is dockerd "
                "running, and is DOCKER_HOST right for the agent?"
            ) from None
        return cls(api, address=where, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self.api.close()

    async def call(
        self, what: str, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kw: Any
    ) -> T:
        """Run one SDK call in a thread within ``timeout`` (default: the engine timeout plus a
        little, so the SDK's own socket timeout speaks first).

        :raises EngineError: with ``what`` and the engine's reason.
        """
        limit = timeout if timeout is not None else self.timeout + 5
        try:
            return await asyncio.wait_for(in_thread(fn, *args, **kw), limit)
        except TimeoutError:
            raise EngineTimeout(
                f"{what}: no answer from the Docker engine within {limit:g}s"
            ) from None
        except EngineError:
            raise
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise EngineUnreachable(
                f"{what}: lost the Docker engine at {self.address} ({_reason(exc)})"
            ) from None
        except (DockerException, requests.RequestException) as exc:
            raise EngineError(f"{what}: {_reason(exc)}") from None

    # ------------------------------------------------------------------ images

    async def image(self, ref: str) -> dict[str, Any] | None:
        """The image's inspect data, or ``None`` when the engine does not have it."""

        def inspect() -> dict[str, Any] | None:
            try:
                data: dict[str, Any] = self.api.inspect_image(ref)
            except NotFound:
                return None
            return data

        return await self.call(f"inspecting image {ref}", inspect)

    async def pull(
        self,
        ref: str,
        *,
        timeout: float,
        auth: dict[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Pull ``ref``, handing every progress event to ``on_event`` on the loop's thread.

        :raises EngineError: the engine's reason (unknown manifest, registry unreachable …).
        :raises EngineTimeout: the pull did not finish within ``timeout``.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        repo, tag = parse_repository_tag(ref)

        def pull() -> None:
            events = self.api.pull(
                repo, tag=tag or "latest", stream=True, decode=True, auth_config=auth
            )
            try:
                for event in events:
                    if stop.is_set():
                        return
                    if "error" in event:
                        raise EngineError(f"pulling {ref}: {str(event['error']).strip()}")
                    if on_event is not None:
                        loop.call_soon_threadsafe(on_event, event)
            finally:
                with contextlib.suppress(Exception):
                    events.close()

        try:
            await self.call(f"pulling {ref}", pull, timeout=timeout)
        except EngineTimeout:
            raise EngineTimeout(f"pulling {ref} did not finish within {timeout:g}s") from None
        finally:
            stop.set()

    # ------------------------------------------------------------------ containers

    async def container(self, name_or_id: str) -> dict[str, Any] | None:
        """A container's inspect data, or ``None``.  Only a full id or the exact name
        matches (the engine alone would also accept an id prefix)."""

        def inspect() -> dict[str, Any] | None:
            try:
                data: dict[str, Any] = self.api.inspect_container(name_or_id)
            except NotFound:
                return None
            if name_or_id in (data["Id"], data["Name"].lstrip("/")):
                return data
            return None

        return await self.call(f"inspecting container {name_or_id}", inspect)

    async def containers(self, label: str) -> list[dict[str, Any]]:
        """Summaries (``docker ps -a``) of the containers carrying ``label`` (``key=value``)."""
        found: list[dict[str, Any]] = await self.call(
            f"listing containers labelled {label}",
            self.api.containers,
            all=True,
            filters={"label": label},
        )
        return found

    async def create(self, spec: ContainerSpec, name: str) -> str:
        """Create a container called ``name`` from ``spec``; its id."""
        api = self.api

        def create() -> str:
            host_config = api.create_host_config(**spec.host_config_kwargs())
            created: dict[str, Any] = api.create_container(
                name=name, host_config=host_config, **spec.create_kwargs()
            )
            return str(created["Id"])

        return await self.call(f"creating container {name} from {spec.image}", create)

    async def start(self, container_id: str) -> None:
        """Start a created (or stopped) container."""
        await self.call(f"starting container {container_id[:12]}", self.api.start, container_id)

    async def stop(self, container_id: str, grace: int) -> None:
        """Stop with SIGTERM, then SIGKILL after ``grace`` seconds."""
        # The SDK adds the grace period to its socket timeout; so does this bound.
        await self.call(
            f"stopping container {container_id[:12]}",
            lambda: self.api.stop(container_id, timeout=grace),
            timeout=self.timeout + grace + 5,
        )

    async def rename(self, container_id: str, name: str) -> None:
        """Give a container another name."""
        await self.call(
            f"renaming container {container_id[:12]} to {name}",
            self.api.rename,
            container_id,
            name,
        )

    async def remove(self, container_id: str, *, force: bool = False) -> None:
        """Remove a container (``force`` kills it first if it runs); gone already is fine."""

        def remove() -> None:
            with contextlib.suppress(NotFound):
                self.api.remove_container(container_id, force=force)

        await self.call(f"removing container {container_id[:12]}", remove)

    async def logs_tail(self, container_id: str, lines: int = 20) -> list[str]:
        """The last ``lines`` lines the container wrote (stdout and stderr)."""
        raw: bytes = await self.call(
            f"reading the logs of {container_id[:12]}",
            lambda: self.api.logs(container_id, tail=lines, stdout=True, stderr=True),
        )
        return raw.decode(errors="replace").splitlines()[-lines:]

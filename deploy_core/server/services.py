"""What a server-side plugin is handed instead of the server itself.

:class:`PluginServices` implements :class:`deploy_core.plugin.ServerServices` over a running
:class:`~deploy_core.server.app.DeployServer`: the database for the plugin's own tables, the
plugin's settings, and the questions plugins ask of the core (does this client, this
artifact exist).  Event handlers get it as ``ctx.services``, routes through
:func:`deploy_core.plugin.server_services`, a deploy type's ``server_check`` as its first
argument.  Nothing else of the server is reachable from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.engine import Engine

    from deploy_core.server.app import DeployServer

P = ParamSpec("P")
R = TypeVar("R")


class PluginServices:
    """The :class:`~deploy_core.plugin.ServerServices` of one server."""

    __slots__ = ("_server",)

    def __init__(self, server: DeployServer) -> None:
        self._server = server

    @property
    def engine(self) -> Engine:
        """The server's database engine."""
        return self._server.engine

    @property
    def metadata(self) -> MetaData:
        """The metadata plugins defined their tables on."""
        return self._server.plugin_metadata

    async def db(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a blocking call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def plugin_config(self, name: str) -> dict[str, Any]:
        """The settings an operator gave plugin ``name`` (empty when none)."""
        return self._server.plugin_config(name)

    async def client_exists(self, client_id: str) -> bool:
        """Whether an agent with this client id is enrolled."""
        return await asyncio.to_thread(self._server.records.get_client, client_id) is not None

    async def artifact_exists(self, sha256: str) -> bool:
        """Whether a complete copy of ``sha256`` is in this replica's store or any other's
        (an agent connected here gets it fetched from a replica holding it)."""
        return await self._server.artifact_source.exists(sha256)

"""Plugin loading and the registries filled from the registration hooks.

Plugins are found through the ``deploy_core`` entry-point group, once per process.
``DEPLOY_CORE_PLUGINS=a,b`` loads only the named entry points; ``DEPLOY_CORE_DISABLE_PLUGINS=a,b``
blocks some.  A plugin that fails to import is skipped with a warning naming it; a plugin that
registers a name already taken stops start-up with :class:`PluginError`.

An agent loads the plugins *agent side* (:func:`get_agent_plugins`): only the hooks it runs
(deploy types, health checks, rollback strategies, agent services) are called, so a plugin's
server-side modules (routes, tables, event handlers, ``deployctl`` commands), imported inside
those hooks, never load in an agent process (issue 12: an agent is not a server).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import click
import pluggy
from pydantic import ValidationError

from deploy_core import hookspecs
from deploy_core.registry import (
    AgentService,
    DeployType,
    EventHandler,
    HealthCheckType,
    RegistrationError,
    RollbackStrategy,
    RouteSet,
)

if TYPE_CHECKING:
    from sqlalchemy import MetaData

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "deploy_core"
ENV_ONLY = "DEPLOY_CORE_PLUGINS"
ENV_DISABLE = "DEPLOY_CORE_DISABLE_PLUGINS"

# Core ``deployctl`` groups a plugin may add commands to (None: the top level).
CLI_GROUPS = (None, "deploy")

# The core's own behaviour, registered through the same hooks as third-party plugins
# (server side: an agent-side load leaves them out).
DEFAULT_PLUGINS = ("deploy_core.server.handlers",)


class PluginError(RuntimeError):
    """Plugins could not be loaded as configured (a duplicate name, a bad registration)."""


T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Named entries of one kind, each remembered with the plugin that registered it."""

    kind: str
    entries: dict[str, T] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, entry: T, owner: str) -> None:
        """Add ``entry``; a name that is taken raises :class:`PluginError` naming both owners."""
        if name in self.entries:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {self.owners[name]!r} "
                f"and by plugin {owner!r}; uninstall or disable one of them "
                f"({ENV_DISABLE}={owner})"
            )
        self.entries[name] = entry
        self.owners[name] = owner

    def get(self, name: str) -> T | None:
        """The entry called ``name``, if any."""
        return self.entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.entries)

    def by_owner(self, owner: str) -> list[str]:
        """Names registered by plugin ``owner``."""
        return sorted(n for n, o in self.owners.items() if o == owner)


def _split_env(value: str | None) -> set[str] | None:
    if value is None or not value.strip():
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class DeployPlugins:
    """The loaded plugins and everything they registered.

    Build one with :func:`load_plugins` (or :func:`get_plugins` for the process-wide one).
    With ``agent_only``, :meth:`collect` calls only the hooks an agent runs; the server-side
    registries (event handlers, routes, ``deployctl`` commands) stay empty.
    """

    def __init__(self, *, agent_only: bool = False) -> None:
        self.agent_only = agent_only
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.deploy_types: Registry[DeployType] = Registry("deploy type")
        self.health_checks: Registry[HealthCheckType] = Registry("health check")
        self.rollback_strategies: Registry[RollbackStrategy] = Registry("rollback strategy")
        self.event_handlers: Registry[EventHandler] = Registry("event handler")
        self.route_sets: Registry[RouteSet] = Registry("route set")
        self.agent_services: Registry[AgentService] = Registry("agent service")
        self.cli_commands: Registry[click.Command] = Registry("deployctl command")
        self.versions: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    # ----------------------------------------------------------------- loading

    def register_module(self, module: ModuleType | object, name: str, version: str = "") -> None:
        """Register one plugin object under ``name`` (used for built-ins and in tests)."""
        self.pm.register(module, name=name)
        self.versions[name] = version

    def load_entry_points(self, env: Mapping[str, str] | None = None) -> None:
        """Load plugins from the ``deploy_core`` entry-point group, honouring the env lists."""
        env = os.environ if env is None else env
        only = _split_env(env.get(ENV_ONLY))
        disabled = _split_env(env.get(ENV_DISABLE)) or set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (only is not None and ep.name not in only) or ep.name in disabled:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the host down
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning("plugin %s failed to load and is skipped: %s", ep.name, exc)
                continue
            version = ep.dist.version if ep.dist is not None else ""
            self.register_module(plugin, ep.name, version)

    def collect(self) -> None:
        """Call the registration hooks and fill the registries."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            raise PluginError(
                f"plugin {name!r} implements a hook that does not exist (a misspelling?): {exc}"
            ) from None
        self._collect("deploy_register_deploy_types", self.deploy_types, lambda e: e.name)
        self._collect("deploy_register_health_checks", self.health_checks, lambda e: e.name)
        self._collect(
            "deploy_register_rollback_strategies", self.rollback_strategies, lambda e: e.name
        )
        if not self.agent_only:
            self._collect("deploy_register_event_handlers", self.event_handlers, lambda e: e.name)
            self._collect("deploy_register_routes", self.route_sets, lambda e: e.name)
        self._collect("deploy_agent_services", self.agent_services, lambda e: e.name)
        if not self.agent_only:
            self._collect_cli_commands()
        kinds: dict[str, str] = {}
        for name in self.deploy_types.entries:
            kind = self.deploy_types.entries[name].kind
            if kind in kinds:
                owners = self.deploy_types.owners
                raise PluginError(
                    f"deploy types {kinds[kind]!r} (plugin {owners[kinds[kind]]!r}) and "
                    f"{name!r} (plugin {owners[name]!r}) would share the API route "
                    f"/api/deploy/{kind}; disable one of them"
                )
            kinds[kind] = name
        for name, dt in self.deploy_types.entries.items():
            if dt.default_rollback and dt.default_rollback not in self.rollback_strategies:
                log.info(
                    "deploy type %s names default rollback %r, which no installed plugin has",
                    name,
                    dt.default_rollback,
                )
            elif dt.default_rollback:
                try:
                    self.parse_rollback({**dt.default_rollback_params}, dt.default_rollback)
                except ValidationError as exc:
                    raise PluginError(
                        f"deploy type {name} (plugin {self.deploy_types.owners[name]!r}): its "
                        f"default_rollback_params do not fit strategy {dt.default_rollback}: {exc}"
                    ) from None

    def _collect(self, hook_name: str, registry: Registry[Any], key: Callable[[Any], str]) -> None:
        expected = _REGISTRY_TYPES[hook_name]
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            owner = impl.plugin_name

            def register(entry: Any, _owner: str = owner) -> None:
                if not isinstance(entry, expected):
                    raise PluginError(
                        f"plugin {_owner!r} passed {type(entry).__name__} to {hook_name}; "
                        f"expected {expected.__name__}"
                    )
                registry.add(key(entry), entry, _owner)

            try:
                impl.function(register=register)
            except (PluginError, RegistrationError):
                raise
            except Exception as exc:
                raise PluginError(f"plugin {owner!r} failed in {hook_name}: {exc}") from exc

    def _collect_cli_commands(self) -> None:
        """Like :meth:`_collect`, but ``register(command, group="deploy")`` places a command
        under a core group; such entries are keyed ``"deploy <name>"``."""
        for impl in self.pm.hook.deploy_register_cli_commands.get_hookimpls():
            owner = impl.plugin_name

            def register(command: Any, group: str | None = None, _owner: str = owner) -> None:
                if not isinstance(command, click.Command) or not command.name:
                    raise PluginError(
                        f"plugin {_owner!r} passed {type(command).__name__} to "
                        "deploy_register_cli_commands; expected a named click.Command"
                    )
                if group not in CLI_GROUPS:
                    raise PluginError(
                        f"plugin {_owner!r}: command group {group!r} is not one of "
                        f"{', '.join(repr(g) for g in CLI_GROUPS)}"
                    )
                key = f"{group} {command.name}" if group else command.name
                self.cli_commands.add(key, command, _owner)

            try:
                impl.function(register=register)
            except (PluginError, RegistrationError):
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {owner!r} failed in deploy_register_cli_commands: {exc}"
                ) from exc

    def create_tables(self, metadata_: MetaData) -> None:
        """Let plugins define their tables on ``metadata_``; a failure names the plugin."""
        if self.agent_only:
            raise PluginError("plugins loaded agent side define no tables; load them in full")
        for impl in self.pm.hook.deploy_register_tables.get_hookimpls():
            try:
                impl.function(metadata=metadata_)
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in deploy_register_tables: {exc}"
                ) from exc

    # ----------------------------------------------------------------- parsing options

    def parse_health_check(self, spec: Mapping[str, Any]) -> tuple[HealthCheckType, Any]:
        """Resolve a health check's ``type`` and validate its parameters.

        :raises LookupError: no loaded plugin provides that check type.
        :raises pydantic.ValidationError: the parameters do not fit the check's model.
        """
        name = str(spec.get("type", ""))
        check = self.health_checks.get(name)
        if check is None:
            known = ", ".join(self.health_checks.names()) or "none installed"
            raise LookupError(f"unknown health check type {name!r} (known: {known})")
        return check, check.params.model_validate(dict(spec))

    def parse_rollback(
        self, spec: Mapping[str, Any], default: str | None = None
    ) -> tuple[RollbackStrategy, Any]:
        """Resolve a rollback option's ``strategy`` (``default`` when it names none) and
        validate its parameters.

        :raises LookupError: no loaded plugin provides that strategy.
        :raises pydantic.ValidationError: the parameters do not fit the strategy's model.
        """
        data = dict(spec)
        if not data.get("strategy") and default:
            data["strategy"] = default
        name = str(data.get("strategy") or "")
        strategy = self.rollback_strategies.get(name)
        if strategy is None:
            known = ", ".join(self.rollback_strategies.names()) or "none installed"
            raise LookupError(f"unknown rollback strategy {name!r} (known: {known})")
        return strategy, strategy.params.model_validate(data)

    # ----------------------------------------------------------------- notifications

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook impl by impl; one that raises is logged and skipped."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception:
                log.exception("plugin %s failed in %s", impl.plugin_name, hook_name)

    # ----------------------------------------------------------------- description

    def describe(self) -> list[dict[str, Any]]:
        """What ``deployctl plugins`` and ``GET /api/plugins`` show."""
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            out.append(
                {
                    "name": name,
                    "version": self.versions.get(name, ""),
                    "builtin": name in DEFAULT_PLUGINS,
                    "hooks": hooks,
                    "deploy_types": self.deploy_types.by_owner(name),
                    "health_checks": self.health_checks.by_owner(name),
                    "rollback_strategies": self.rollback_strategies.by_owner(name),
                    "event_handlers": self.event_handlers.by_owner(name),
                    "routes": self.route_sets.by_owner(name),
                    "agent_services": self.agent_services.by_owner(name),
                    "cli_commands": self.cli_commands.by_owner(name),
                }
            )
        for name, reason in sorted(self.failed.items()):
            out.append({"name": name, "error": reason})
        return out

    def capabilities(self) -> dict[str, Any]:
        """What an agent announces to the server when it connects."""
        return {
            "plugins": {
                name: self.versions.get(name, "")
                for name, plugin in self.pm.list_name_plugin()
                if plugin is not None and name not in DEFAULT_PLUGINS
            },
            "deploy_types": self.deploy_types.names(),
            "health_checks": self.health_checks.names(),
            "rollback_strategies": self.rollback_strategies.names(),
        }


_REGISTRY_TYPES: dict[str, type] = {
    "deploy_register_deploy_types": DeployType,
    "deploy_register_health_checks": HealthCheckType,
    "deploy_register_rollback_strategies": RollbackStrategy,
    "deploy_register_event_handlers": EventHandler,
    "deploy_register_routes": RouteSet,
    "deploy_agent_services": AgentService,
}


def load_plugins(
    *,
    extra: Iterable[tuple[str, object]] = (),
    entry_points: bool = True,
    env: Mapping[str, str] | None = None,
    agent_only: bool = False,
) -> DeployPlugins:
    """Build a fresh :class:`DeployPlugins`: built-ins, entry points, then ``extra`` plugins.

    ``agent_only``: as an agent needs them, without the built-in server handlers and without
    calling the server-side hooks (see :class:`DeployPlugins`).
    """
    plugins = DeployPlugins(agent_only=agent_only)
    from deploy_core import __version__

    for module_name in () if agent_only else DEFAULT_PLUGINS:
        __import__(module_name)
        plugins.register_module(sys.modules[module_name], module_name, __version__)
    if entry_points:
        plugins.load_entry_points(env)
    for name, plugin in extra:
        plugins.register_module(plugin, name)
    plugins.collect()
    return plugins


_loaded: DeployPlugins | None = None
_agent_side: DeployPlugins | None = None


def get_plugins() -> DeployPlugins:
    """The process-wide plugins, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded


def get_agent_plugins() -> DeployPlugins:
    """The process-wide plugins as an agent needs them: those of :func:`get_plugins` when this
    process has loaded them (a server with its agent, ``deployctl up``), else loaded agent
    side (``agent_only``) on first use."""
    global _agent_side
    if _loaded is not None:
        return _loaded
    if _agent_side is None:
        _agent_side = load_plugins(agent_only=True)
    return _agent_side

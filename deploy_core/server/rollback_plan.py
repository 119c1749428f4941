"""Which rollback a deployment gets, decided once when the server accepts it (issue 10 §2).

A failed deployment rolls back by default wherever something knows how to undo it.  The
strategy comes from the first of:

1. the request's own ``rollback`` (``{"strategy": NAME, …}``); ``false`` or
   ``{"strategy": "none"}`` opts out; ``true`` or options without a ``strategy`` ask for the
   default below, refined by those options;
2. the server configuration's ``[defaults.rollback."<deploy type>"]`` table (see
   :class:`RollbackDefaults`);
3. the deploy type's registered ``default_rollback`` (tar → ``release``, Docker →
   ``previous_container``);
4. none: the record says so plainly, and why.

The outcome, a :class:`RollbackPlan`, goes into the deployment's record (``request.rollback``
and ``request.rollback_plan``) so the record shows what will happen before anything runs, and
to the agent with the command.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from deploy_core.registry import DeployType

if TYPE_CHECKING:
    from deploy_core.plugins import DeployPlugins

NO_STRATEGY = "none"
# A default's option whose whole value is "{name}" takes the deploy parameter ``name`` of each
# request, e.g. path = "{workdir}".  Only whole values: scripts are full of "${VAR}".
PLACEHOLDER = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")

SOURCE_REQUEST = "request"
SOURCE_SERVER = "server defaults"
SOURCE_TYPE = "deploy type default"
SOURCE_OPTED_OUT = "opted out"
SOURCE_NONE = "none"


class RollbackPlanError(ValueError):
    """A request's rollback (or the default it asked for) is unusable; ``loc`` points at it."""

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or [{"loc": ["rollback"]}]


class RollbackDefaultsError(ValueError):
    """The server configuration's ``[defaults]`` section is wrong; the message says where."""


@dataclass(frozen=True)
class RollbackPlan:
    """What a failed deployment will do.

    :param spec: the strategy and its validated options as the agent gets them; ``None``
        for no rollback.
    :param source: where it came from (``request``, ``server defaults``, ``deploy type
        default``, ``opted out``, ``none``).
    :param note: one line for people: what happens on failure and, for none, why.
    """

    spec: dict[str, Any] | None
    source: str
    note: str

    @property
    def no_rollback_reason(self) -> str | None:
        """Why nothing will be undone (``None`` when a strategy is set)."""
        return None if self.spec is not None else self.note

    def record(self) -> dict[str, Any]:
        """The plan as kept in the deployment's request (``request.rollback_plan``)."""
        return {
            "strategy": (self.spec or {}).get("strategy"),
            "source": self.source,
            "note": self.note,
        }


class RollbackDefaults:
    """The ``[defaults.rollback]`` tables of ``deployctl server --config``, checked against
    the loaded plugins when the server starts.

    .. code-block:: toml

        [defaults.rollback."deploy.shell"]   # every shell deployment snapshots its workdir
        strategy = "snapshot"
        path = "{workdir}"                   # the request's own workdir
        keep = 5

        [defaults.rollback."deploy.docker"]
        strategy = "none"                    # Docker deployments do not roll back by default
    """

    def __init__(self, tables: Mapping[str, Any], plugins: DeployPlugins) -> None:
        self.plugins = plugins
        self.tables: dict[str, dict[str, Any]] = {}
        for type_name, table in tables.items():
            where = f'[defaults.rollback."{type_name}"]'
            deploy_type = plugins.deploy_types.get(type_name)
            if deploy_type is None:
                known = ", ".join(plugins.deploy_types.names()) or "none"
                raise RollbackDefaultsError(
                    f"{where}: no deploy type {type_name!r} is installed (known: {known})"
                )
            if not isinstance(table, Mapping):
                raise RollbackDefaultsError(
                    f'{where} must be a table, e.g. {{strategy = "snapshot", path = "..."}}'
                )
            options = dict(table)
            strategy = options.get("strategy")
            if not isinstance(strategy, str) or not strategy:
                raise RollbackDefaultsError(
                    f'{where}: give strategy = NAME (or "{NO_STRATEGY}" for no rollback)'
                )
            if strategy == NO_STRATEGY:
                if len(options) > 1:
                    raise RollbackDefaultsError(f'{where}: strategy "none" takes no options')
            else:
                self._check(where, deploy_type, options)
            self.tables[type_name] = options

    def _check(self, where: str, deploy_type: DeployType, options: dict[str, Any]) -> None:
        fields = deploy_type.params.model_fields
        placeheld = set()
        for key, value in options.items():
            match = PLACEHOLDER.match(value) if isinstance(value, str) else None
            if match is None:
                continue
            if match.group(1) not in fields:
                raise RollbackDefaultsError(
                    f"{where}: {key} = {value!r} names no parameter of {deploy_type.name} "
                    f"(it has: {', '.join(sorted(fields))})"
                )
            placeheld.add(key)
        try:
            self.plugins.parse_rollback({k: v for k, v in options.items() if k not in placeheld})
        except LookupError as exc:
            raise RollbackDefaultsError(f"{where}: {exc}") from None
        except ValidationError as exc:
            # An option filled in from each request is checked with the request.
            problems = [e for e in exc.errors() if not e["loc"] or e["loc"][0] not in placeheld]
            if problems:
                text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in problems)
                raise RollbackDefaultsError(f"{where}: {text}") from None

    def for_type(self, type_name: str) -> dict[str, Any] | None:
        """The configured default of ``type_name`` (``None`` when the config has none)."""
        table = self.tables.get(type_name)
        return dict(table) if table is not None else None


def _fill(options: dict[str, Any], params: BaseModel) -> tuple[dict[str, Any], str | None]:
    """Options with every "{param}" value taken from the request's deploy parameters; the
    name of a parameter the request leaves unset, if any."""
    filled = {}
    for key, value in options.items():
        match = PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match is not None:
            value = getattr(params, match.group(1), None)
            if value is None:
                return options, match.group(1)
        filled[key] = value
    return filled, None


def plan_rollback(
    plugins: DeployPlugins,
    defaults: RollbackDefaults | None,
    deploy_type: DeployType,
    requested: dict[str, Any] | bool | None,
    params: BaseModel,
) -> RollbackPlan:
    """Resolve a request's rollback (see the module docstring) and validate it.

    :param requested: the request's ``rollback`` field as sent (absent is ``None``).
    :param params: the request's validated deploy parameters (for "{param}" values).
    :raises RollbackPlanError: unknown strategy, bad options, or a default asked for where
        there is none (the API answers 422).
    """
    name = deploy_type.name
    if requested is False:
        return RollbackPlan(None, SOURCE_OPTED_OUT, "rollback disabled by the request")
    explicit = dict(requested) if isinstance(requested, dict) else {}
    if explicit.get("strategy") == NO_STRATEGY:
        if len(explicit) > 1:
            raise RollbackPlanError(
                'rollback {"strategy": "none"} takes no options; drop '
                + ", ".join(sorted(k for k in explicit if k != "strategy")),
            )
        return RollbackPlan(None, SOURCE_OPTED_OUT, "rollback disabled by the request")
    if explicit.get("strategy"):
        spec = _validated(plugins, explicit, "the request's rollback")
        return RollbackPlan(spec, SOURCE_REQUEST, f"{spec['strategy']}, named by the request")

    # Nothing named: the server's default for the type, else the type's own.
    wanted = requested is True or isinstance(requested, dict)
    configured = defaults.for_type(name) if defaults is not None else None
    skipped = ""
    if configured is not None and configured["strategy"] == NO_STRATEGY:
        if wanted:
            raise RollbackPlanError(
                f"the request asks for the default rollback, but the server config sets "
                f'[defaults.rollback."{name}"] strategy = "none"; name a strategy'
            )
        return RollbackPlan(
            None,
            SOURCE_OPTED_OUT,
            f'rollback disabled by the server config ([defaults.rollback."{name}"])',
        )
    if configured is not None:
        options, missing = _fill(configured, params)
        if missing is None:
            spec = _validated(
                plugins, {**options, **explicit}, f'[defaults.rollback."{name}"] of the server'
            )
            return RollbackPlan(
                spec,
                SOURCE_SERVER,
                f"{spec['strategy']}, the server's default for {name} "
                f'([defaults.rollback."{name}"])',
            )
        skipped = (
            f"; the server's default ({configured['strategy']}) takes {missing}, which the "
            "request does not set"
        )
    if deploy_type.default_rollback is not None:
        if deploy_type.default_rollback not in plugins.rollback_strategies:
            skipped += f"; its default strategy {deploy_type.default_rollback} is not installed"
        else:
            options = {**deploy_type.default_rollback_params, **explicit}
            options["strategy"] = deploy_type.default_rollback
            spec = _validated(plugins, options, f"the default rollback of {name}")
            return RollbackPlan(spec, SOURCE_TYPE, f"{spec['strategy']}, the default of {name}")
    if wanted:
        raise RollbackPlanError(
            f"{name} has no default rollback strategy{skipped}; name one in the request "
            f'("rollback": {{"strategy": ...}}; installed: '
            f"{', '.join(plugins.rollback_strategies.names()) or 'none'})",
            [{"loc": ["rollback", "strategy"]}],
        )
    own = "no default rollback" if deploy_type.default_rollback is None else "no usable default"
    return RollbackPlan(
        None,
        SOURCE_NONE,
        f"{name} has {own}{skipped} and the request named none "
        f'(add "rollback": {{"strategy": ...}} to the request, or set '
        f'[defaults.rollback."{name}"] in the server config)',
    )


def _validated(plugins: DeployPlugins, options: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        _strategy, params = plugins.parse_rollback(options)
    except LookupError as exc:
        raise RollbackPlanError(f"{what}: {exc}", [{"loc": ["rollback", "strategy"]}]) from None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        text = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in errors)
        raise RollbackPlanError(
            f"{what} is invalid: {text}",
            [{"loc": ["rollback", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors],
        ) from None
    dumped: dict[str, Any] = params.model_dump(mode="json")
    return dumped


def describe_defaults(plugins: DeployPlugins, defaults: RollbackDefaults | None) -> dict[str, Any]:
    """What a request without a ``rollback`` field gets, per deploy type (``GET /api/info``,
    the web page's form): ``{"strategy", "source", "note", "options"}``; options the server
    fills in from each request keep their ``"{param}"`` form."""
    out: dict[str, Any] = {}
    for name, deploy_type in sorted(plugins.deploy_types.entries.items()):
        configured = defaults.for_type(name) if defaults is not None else None
        if configured is not None and configured["strategy"] == NO_STRATEGY:
            view = {
                "strategy": None,
                "source": SOURCE_OPTED_OUT,
                "note": f'rollback disabled by the server config ([defaults.rollback."{name}"])',
            }
        elif configured is not None:
            filled = [
                f"{key} from the request's {m.group(1)}"
                for key, value in configured.items()
                if isinstance(value, str) and (m := PLACEHOLDER.match(value))
            ]
            view = {
                "strategy": configured["strategy"],
                "source": SOURCE_SERVER,
                "note": f"{configured['strategy']}, the server's default for {name}"
                + (f" ({', '.join(filled)})" if filled else ""),
            }
        elif deploy_type.default_rollback in plugins.rollback_strategies:
            view = {
                "strategy": deploy_type.default_rollback,
                "source": SOURCE_TYPE,
                "note": f"{deploy_type.default_rollback}, the default of {name}",
            }
        else:
            view = {
                "strategy": None,
                "source": SOURCE_NONE,
                "note": f"{name} has no default rollback: a failure is not undone unless the "
                "request names a strategy",
            }
        options = {k: v for k, v in (configured or {}).items() if k != "strategy"}
        out[name] = {**view, "options": options}
    return out

"""What ``deployctl``'s commands share, and plugins' commands may use: finding the API
(:func:`with_api`), parsing options, following a deployment live, uploading with progress."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from deploy_core.cli.terminal import terminal_safe
from deploy_core.client import DEFAULT_STATE_DIR, ApiError, ConfigError, DeployClient

TERMINAL_OK = {"success"}


# Path options are made absolute at start-up (resolve_path): a relative path typed by a
# person would break as soon as a script runs in another working directory.
state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, resolve_path=True),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="where the server keeps its certificates, tokens and database",
)


api_options = [
    click.option("--url", envvar="DEPLOY_CENTER_URL", default=None, help="API base URL"),
    click.option("--token", envvar="DEPLOY_CENTER_TOKEN", default=None, help="API token"),
    state_dir_option,
    click.option(
        "--ca",
        envvar="DEPLOY_CENTER_CA",
        type=click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True),
        default=None,
        help="CA certificate an https:// API is verified with (default: the state "
        "directory's for the server it names, else the system's trust store)",
    ),
    click.option(
        "--insecure-http",
        envvar="DEPLOY_CENTER_INSECURE_HTTP",
        is_flag=True,
        help="send the token over plain http:// to a host that is not loopback (refused "
        "without it)",
    ),
]


def api_option_set(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options :func:`with_api` adds (``url``, ``token``, ``state_dir``, ``ca``,
    ``insecure_http``), for a command that passes them on to a :func:`with_api` one."""
    for option in reversed(api_options):
        fn = option(fn)
    return fn


def with_api(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --url/--token/--state-dir/--ca/--insecure-http and pass a ready
    :class:`DeployClient` as ``api``."""
    import functools

    @functools.wraps(fn)
    def wrapper(
        url: str | None,
        token: str | None,
        state_dir: Path,
        ca: Path | None,
        insecure_http: bool,
        **kwargs: Any,
    ) -> Any:
        try:
            api = DeployClient.from_env(url, token, state_dir, ca=ca, insecure_http=insecure_http)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            return fn(api=api, **kwargs)
        except ApiError as exc:
            raise click.ClickException(terminal_safe(exc)) from None
        finally:
            api.close()

    return api_option_set(wrapper)


def database_url(db_url: str | None, state_dir: Path) -> str:
    """The database a ``--db`` option names, ready to open: the state directory's SQLite
    file when none is given, a relative SQLite path made absolute.  A URL SQLAlchemy cannot
    use, or whose driver is not installed, is refused with what to do."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from deploy_core.server import db as dbm

    if db_url is None:
        return dbm.sqlite_url(state_dir.absolute() / "deploy-center.db")
    try:
        url = make_url(dbm.normalise_url(db_url))
        dialect = url.get_dialect()
    except ArgumentError as exc:
        raise click.BadParameter(
            f"{db_url!r} is not a database URL deploy-core can use ({exc}); "
            f"e.g. postgresql://user@host/dbname or sqlite:////var/lib/deploy-center/db.sqlite",
            param_hint="--db",
        ) from None
    backend = url.get_backend_name()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        how = (
            "pip install 'deploy-core[postgres]'"
            if backend == "postgresql"
            else f"install the Python module {exc.name}"
        )
        raise click.ClickException(
            f"--db {make_url(db_url).render_as_string(hide_password=True)} needs the {backend} "
            f"driver {exc.name}, which is not installed here: {how} (in the environment "
            f"deployctl runs from), then run the command again"
        ) from None
    path = url.database
    if backend == "sqlite" and path not in (None, "", ":memory:") and not Path(path).is_absolute():
        # SQLAlchemy opens a relative SQLite path from the working directory of the moment.
        return url.set(database=str(Path(path).absolute())).render_as_string(hide_password=False)
    return db_url


def page_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--limit`` (1-500, default 20) and ``--offset`` of a listing command, as the API's
    paginated lists take them."""
    fn = click.option("--offset", type=click.IntRange(0), default=0)(fn)
    return click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--json`` flag of every command that reads something (passed as ``as_json``):
    print the answer with :func:`echo_json` (or :func:`echo_json_line`, a line per item)
    instead of text for people.  The contract is docs/user-guide.md, "Scripting with
    --json"; ``tests/test_cli_json.py`` fails for a read command without it."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="print the answer as JSON (docs/user-guide.md, 'Scripting with --json')",
    )(fn)


def echo_json(data: Any) -> None:
    """``data`` as one JSON document on stdout (indented; non-ASCII and control characters
    escaped, so it is safe on a terminal too)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def echo_json_line(data: Any) -> None:
    """``data`` as one line of JSON Lines on stdout, flushed at once (for a stream such as
    ``deployctl logs --json --follow``)."""
    click.echo(json.dumps(data, separators=(",", ":")))


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    """``--env KEY=VALUE`` options as a dict (for plugins' commands too)."""
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--env")
        env[key] = value
    return env


def parse_health(spec: str) -> dict[str, Any]:
    """A ``--health TYPE:TEXT`` option as a health check's options, parsed by the shorthand
    the check type registered (``HealthCheckType.shorthand``; with the ``health_checks``
    plugin: ``http:8080/healthz``, ``http://host:8080/path``, ``tcp:5432``,
    ``tcp:host:5432``)."""
    from deploy_core.plugins import PluginError, get_plugins

    try:
        checks = get_plugins().health_checks.entries
    except PluginError as exc:
        raise click.ClickException(f"--health {spec}: plugins could not be loaded: {exc}") from None
    shorthands = {name: c for name, c in sorted(checks.items()) if c.shorthand is not None}
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in shorthands:
        known = ", ".join(f"{n}:{c.shorthand_usage}" for n, c in shorthands.items())
        raise click.BadParameter(
            f"expected TYPE:SPEC, one of {known or 'nothing: no loaded check has a shorthand'};"
            f" got {spec!r}",
            param_hint="--health",
        )
    try:
        return shorthands[kind].parse_shorthand(rest)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--health") from None


def health_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--health`` (repeatable), ``--health-retries`` and ``--health-interval`` options
    of every ``deployctl deploy`` command (plugins' too); pair them with
    :func:`health_checks_field`."""
    options = [
        click.option(
            "--health",
            multiple=True,
            help="a health check as TYPE:SPEC, e.g. http:PORT[/PATH] or tcp:[HOST:]PORT (a "
            "check type's registered shorthand), repeatable",
        ),
        click.option(
            "--health-retries",
            type=click.IntRange(0, 100),
            default=None,
            help="attempts after a check's first failure (default: the check's)",
        ),
        click.option(
            "--health-interval",
            type=click.FloatRange(min=0),
            default=None,
            help="seconds between a check's attempts (default: the check's)",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def health_checks_field(
    health: tuple[str, ...],
    health_retries: int | None,
    health_interval: float | None,
    extra: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The ``health_checks`` part of a deploy request body from :func:`health_options`:
    each ``--health`` parsed (:func:`parse_health`), then the command's own ``extra``
    checks (e.g. a script from a file), each given the retries and interval when set;
    nothing when there is no check."""
    checks = [parse_health(h) for h in health] + [dict(check) for check in extra]
    for check in checks:
        if health_retries is not None:
            check["retries"] = health_retries
        if health_interval is not None:
            check["interval"] = health_interval
    return {"health_checks": checks} if checks else {}


def no_rollback_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--no-rollback`` flag of every ``deployctl deploy`` command (plugins' too); pair
    it with :func:`rollback_field`."""
    return click.option(
        "--no-rollback",
        is_flag=True,
        help='on failure, leave things as they are (sends "rollback": false); without it the '
        "rollback named by the command's options applies, else the server's default for the "
        "deploy type, else the type's own (tar: previous release, Docker: previous container)",
    )(fn)


def rollback_field(no_rollback: bool, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``rollback`` part of a deploy request body: ``{"rollback": false}`` for
    ``--no-rollback``, ``{"rollback": spec}`` when the command's options name one, else
    nothing, so that the server picks the default (see docs/api.md, "Rollback")."""
    if no_rollback:
        if spec:
            raise click.UsageError(
                f"--no-rollback and a {spec.get('strategy', 'rollback')} rollback option "
                "contradict each other; drop one"
            )
        return {"rollback": False}
    return {"rollback": spec} if spec else {}


# ``ctx.meta`` key of a function that takes over :func:`submit_and_follow`'s arguments: set
# by ``deployctl rollout KIND`` (cli/rollouts.py), which runs ``deployctl deploy KIND``'s own
# code to build the body, then sends that body to many hosts instead of one.
SUBMITTER = "deploy_core.cli.submitter"


def check_wait_timeout(seconds: float) -> None:
    """Refuse a ``--wait-timeout`` that would not end a wait: ``nan`` and ``inf`` pass a
    ``float`` option (and ``nan`` every range check), and would follow for ever."""
    if not 0 < seconds < float("inf"):
        raise click.BadParameter(
            f"must be a positive, finite number of seconds, got {seconds}",
            param_hint="--wait-timeout",
        )


def submit_and_follow(
    api: DeployClient, kind: str, body: dict[str, Any], wait: bool, wait_timeout: float
) -> None:
    """``POST /api/deploy/{kind}``; print the answer, or with ``wait`` follow it live and
    exit 0 only on success (for plugins' ``deploy`` commands too).

    When the command runs as ``deployctl rollout KIND`` (derived from ``deploy KIND``), the
    body goes to ``POST /api/rollouts`` instead, with the rollout's targets and strategy."""
    ctx = click.get_current_context(silent=True)
    submitter = ctx.meta.get(SUBMITTER) if ctx is not None else None
    if submitter is not None:
        submitter(api, kind, body, wait, wait_timeout)
        return
    if wait:
        check_wait_timeout(wait_timeout)
    accepted = api.deploy(kind, body)
    deploy_id = accepted["deploy_id"]
    if not wait:
        echo_json(accepted)
        return
    click.echo(
        f"deployment {deploy_id} accepted"
        + (
            ""
            if accepted.get("client_connected")
            else " (client not connected: it runs when the agent connects)"
        ),
        err=True,
    )
    final = follow(api, deploy_id, wait_timeout)
    sys.exit(0 if final["status"] in TERMINAL_OK else 1)


def progress_bar(progress: int, width: int = 24) -> str:
    done = width * progress // 100
    return "[" + "#" * done + "." * (width - done) + "]"


def follow(api: DeployClient, deploy_id: str, timeout: float) -> dict[str, Any]:
    """Show stage and progress live until the deployment ends; print the outcome."""
    tty = sys.stderr.isatty()
    record: dict[str, Any] = {}
    last_line = ""
    try:
        for record in api.watch(deploy_id, timeout=timeout):
            line = f"{progress_bar(record['progress'])} {record['progress']:3d}% {record['status']}"
            if record["stage"] and record["stage"] != record["status"]:
                line += f" ({record['stage']})"
            line = terminal_safe(line)
            if line == last_line:
                continue
            last_line = line
            if tty:
                click.echo("\r\033[K" + line, nl=False, err=True)
            else:
                click.echo(line, err=True)
    except TimeoutError as exc:
        if tty:
            click.echo(err=True)
        raise click.ClickException(str(exc)) from None
    if tty:
        click.echo(err=True)
    print_outcome(record)
    return record


def print_outcome(record: dict[str, Any]) -> None:
    """The end of a deployment for a person: status, error, the result's fields (any deploy
    type's), output tails, health checks and rollback.  What came from the deployment is
    printed through :func:`terminal_safe`."""
    click.echo(terminal_safe(f"deployment {record['deploy_id']}: {record['status']}"))
    if record.get("error"):
        click.echo(terminal_safe(f"  error: {record['error']}"))
    result = record.get("result") or {}
    fields = [
        f"{key.replace('_', ' ')}: {value:.2f}s"
        if key == "duration"
        else f"{key.replace('_', ' ')}: {value}"
        for key, value in result.items()
        if key != "v"
        and not key.endswith("_tail")
        and value not in (None, "", [], {})
        and value is not False
        and not isinstance(value, (dict, list))
    ]
    for line in fields:
        click.echo(terminal_safe(f"  {line}"))
    for key, text in result.items():
        if key.endswith("_tail") and isinstance(text, str) and text.strip():
            click.echo(terminal_safe(f"  {key.removesuffix('_tail').replace('_', ' ')} (tail):"))
            for line in text.rstrip().split("\n")[-20:]:
                click.echo(terminal_safe(f"    {line}"))
    for check in record.get("health") or []:
        mark = "ok" if check["success"] else "FAILED"
        click.echo(
            terminal_safe(
                f"  health {check['check_type']}: {mark} after {check.get('attempts', 1)} "
                f"attempt(s){' - ' + check['error'] if check.get('error') else ''}"
            )
        )
    rollback = record.get("rollback")
    if rollback:
        # The error of a failed one; else what it did ("nothing to roll back to: …").
        said = rollback.get("error") or rollback.get("message") or ""
        click.echo(
            terminal_safe(
                f"  rollback ({rollback.get('strategy')}): "
                f"{'ok' if rollback['success'] else 'FAILED'}" + (f" - {said}" if said else "")
            )
        )


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value[-1:] in units else (value, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(
            f"expected a duration like 90s, 15m, 1h, 7d; got {value!r}"
        ) from None
    if not 0 < seconds < float("inf"):  # also refuses nan and inf
        raise click.BadParameter(f"a duration must be positive and finite, got {value!r}")
    return seconds


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str, option: str = "size") -> int:
    """``512K``, ``2G``, ``1048576`` → bytes (binary units; a trailing ``B``/``iB`` is fine)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", value.upper())
    if match is None:
        raise click.BadParameter(
            f"expected a size such as 500M or 2G, got {value!r}", param_hint=option
        )
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size < 1:
        raise click.BadParameter("must be at least 1 byte", param_hint=option)
    return size


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def upload_with_progress(api: DeployClient, path: Path) -> dict[str, Any]:
    """Stream ``path`` to the artifact store with a progress bar on stderr (redrawn in place
    on a terminal, a line per 10 % otherwise); the store's answer (for plugins' commands
    too)."""
    import time

    tty = sys.stderr.isatty()
    started = time.monotonic()
    shown = [-1]

    def progress(sent: int, total: int) -> None:
        percent = 100 * sent // total if total else 100
        if percent == shown[0] or (not tty and percent % 10 and sent != total):
            return
        shown[0] = percent
        rate = sent / max(time.monotonic() - started, 1e-6)
        line = f"{progress_bar(percent)} {percent:3d}% {human_size(sent)} of {human_size(total)}"
        line += f" {human_size(rate)}/s"
        click.echo("\r\033[K" + line if tty else line, nl=not tty, err=True)

    try:
        result: dict[str, Any] = api.upload_artifact(path, progress=progress)
    finally:
        if tty and shown[0] >= 0:
            click.echo(err=True)
    return result

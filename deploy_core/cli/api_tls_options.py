"""The API's TLS options of ``deployctl server`` and ``deployctl up`` (docs/security.md,
"The API over HTTPS").  Importing this module imports nothing of the server: ``deployctl
agent`` lives in the same module as ``up`` (issue 12)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path, resolve_path=True)


def api_tls_options(*, network: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--api-tls/--no-api-tls``, ``--api-cert``, ``--api-key`` and, with ``network`` (a
    command whose API may listen on a network address), ``--api-insecure-http``."""
    options = [
        click.option(
            "--api-tls/--no-api-tls",
            "api_tls",
            default=None,
            help="serve the API over HTTPS (default: on unless --api-host is a loopback "
            "address), with the server's own certificate (signed by the CA in the state "
            "directory) unless --api-cert/--api-key are given"
            if network
            else "serve the API over HTTPS (default: off; it listens on loopback only)",
        ),
        click.option(
            "--api-cert",
            type=_FILE,
            default=None,
            help="a certificate (PEM, full chain, e.g. from ACME) for the API instead of the "
            "server's own; with --api-key; checked at start",
        ),
        click.option(
            "--api-key",
            type=_FILE,
            default=None,
            help="the private key of --api-cert (PEM, unencrypted)",
        ),
    ]
    if network:
        options.append(
            click.option(
                "--api-insecure-http",
                is_flag=True,
                help="serve plain HTTP on a non-loopback --api-host (refused without it): "
                "tokens cross the network in clear, so only behind a TLS proxy or on a "
                "private network",
            )
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def api_tls_settings(
    api_host: str,
    api_tls: bool | None,
    api_cert: Path | None,
    api_key: Path | None,
    api_insecure_http: bool = False,
) -> dict[str, Any]:
    """The options as :class:`~deploy_core.server.app.ServerConfig` keyword arguments,
    checked before anything starts (a bad certificate stops the command with why)."""
    from deploy_core.server.http.tls import ApiTlsChoice, ApiTlsError

    try:
        ApiTlsChoice.choose(
            api_host, tls=api_tls, cert=api_cert, key=api_key, insecure_http=api_insecure_http
        )
    except ApiTlsError as exc:
        raise click.ClickException(str(exc)) from None
    return {
        "api_tls": api_tls,
        "api_cert": api_cert,
        "api_key": api_key,
        "api_insecure_http": api_insecure_http,
    }

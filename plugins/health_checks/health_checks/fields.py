"""Validated field types the check parameter models share: host, port, HTTP status code."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field

# RFC 1123 labels, plus "_" because container and compose service names use it.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def check_host(value: str) -> str:
    """Accept a hostname or an IP address (v4 or bare v6), nothing around it.

    :raises ValueError: with what is wrong, e.g. a scheme or a port glued to the host.
    """
    if "://" in value:
        raise ValueError(f"host {value!r} must not include a scheme; give only the name or IP")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return value
    if value.startswith("[") or value.count(":") == 1:
        raise ValueError(
            f"host {value!r} must be a bare hostname or IP; put the port in 'port' "
            "and write IPv6 addresses without brackets"
        )
    name = value.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            f"host {value!r} is not a valid hostname or IP address "
            "(letters, digits, '-', '_' and dots; no path, port or spaces)"
        )
    return value


Host = Annotated[str, Field(min_length=1, max_length=253), AfterValidator(check_host)]
"""A hostname or an IP address, without scheme, port or path."""

Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
"""A TCP port, 1-65535 (an integer: ``"8080"`` and ``true`` are refused)."""

StatusCode = Annotated[int, Field(strict=True, ge=100, le=599)]
"""An HTTP status code, 100-599."""


def format_address(host: str, port: int) -> str:
    """``host:port`` as people write it: ``127.0.0.1:8080``, ``[::1]:8080``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

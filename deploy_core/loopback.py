"""Whether a host name or address stays on this machine: the one test the API's TLS rules
use, on both sides (the server's ``--api-host``, ``deployctl``'s ``--url``).

No name is resolved: only ``localhost`` and literal loopback addresses (``127.0.0.0/8``,
``::1``, and ``::ffff:127.x.y.z``) count, so a name that merely resolves to loopback (or an
``/etc/hosts`` entry an attacker wrote) is treated as a network host.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host", "is_wildcard_host"]


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and literal loopback addresses (``[::1]`` too)."""
    if host.strip().rstrip(".").lower() == "localhost":
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def is_wildcard_host(host: str) -> bool:
    """True for an address that listens on every interface (``0.0.0.0``, ``::``) or none
    given."""
    address = _address(host)
    return not host.strip() or (address is not None and address.is_unspecified)

"""
Values with a syntax of their own: Twisted endpoint strings (checked without building anything),
``ws://`` and ``http://`` URLs, route path prefixes, HTTP header names, IP networks.  Pure
converters that raise ValueError with the reason; they read no file and open no socket.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import urlsplit

from wsgate.config.units import strings

__all__ = [
    "HEADER_NAME",
    "check_backend_url",
    "check_endpoint",
    "header_names",
    "http_url",
    "networks",
    "route_path",
]


def check_endpoint(value: object) -> str:
    """A Twisted server endpoint string, checked for syntax without building anything."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a Twisted endpoint string such as tcp:8020")
    inner = value[len("haproxy:") :] if value.lower().startswith("haproxy:") else value
    kind = inner.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "unix", "ssl", "systemd"):
        raise ValueError(f"{value!r}: unknown endpoint type {kind!r} (tcp, tcp6, unix, ...)")
    if kind in ("tcp", "tcp6", "ssl"):
        port = inner.split(":")[1] if ":" in inner else ""
        if "=" in port:
            port = port.split("=", 1)[1]
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return value


def check_backend_url(value: object) -> str:
    """A ``ws://`` or ``wss://`` URL with a host (path and query are not allowed: the client's are used)."""
    if not isinstance(value, str):
        raise ValueError("not a ws:// or wss:// URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{value!r}: not a ws:// or wss:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"{value!r}: a server URL has no path or query (the client's are forwarded)"
        )
    return value.rstrip("/")


def networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    """A list of IP networks (``10.0.0.0/8``, ``::1``; host bits ignored)."""
    if not isinstance(value, list):
        raise ValueError("expected a list of networks such as 10.0.0.0/8")
    try:
        return tuple(ip_network(v, strict=False) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a network: {e}") from None


def route_path(value: object) -> str:
    """A path prefix starting with ``/``."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected a path prefix starting with /")
    return value


HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def http_url(value: object) -> str:
    """An ``http://`` or ``https://`` URL with a host, in ASCII (it goes on the wire as is)."""
    if not isinstance(value, str) or not value.isascii():
        raise ValueError("expected an http:// or https:// URL (ASCII)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise ValueError(f"{value!r}: not an http:// or https:// URL")
    if any(c in value for c in " \r\n\t"):
        raise ValueError(f"{value!r}: a URL has no spaces")
    return value


def header_names(value: object) -> tuple[str, ...]:
    """A list of HTTP header names, lower-cased."""
    names = strings(value)
    for name in names:
        if not HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
    return tuple(name.lower() for name in names)

"""
Preflight: what ``wsgate check`` finds in a parsed config beyond the schema (``wsgate.config``), so
that a config that passes ``check`` also starts.

Owns the checks that need more than the TOML itself: every endpoint string parsed by Twisted's own
parser (``serverFromString``, which builds an endpoint object but never listens), listening
endpoints that would collide (the same endpoint twice, or one TCP port on overlapping
interfaces: a wildcard and any address, IPv4 inside a dual-stack ``::``), the console's files
judged by the very function the console's start uses (``console_problems``: an empty keys or
users file lets no one in, a host key that is not a usable private key), its host key's directory
writable when the key is still to be made, a control API on TCP beyond loopback
(refused: it acts on the gate); and one warning: an admin listener bound beyond
loopback (it has no authentication).

It must not listen, connect or change anything on disk (the host key is not made here).  Problems
and warnings are ``FILE: key.path: reason`` lines, as ``wsgate.config``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from twisted.internet.endpoints import serverFromString

from wsgate.config import Config

__all__ = ["binds_at", "problems", "warnings"]


@dataclass(frozen=True)
class _Bound:
    """Where one listening endpoint binds: ``tcp`` (port, address) or ``unix`` (path)."""

    key: str
    endpoint: str
    kind: str
    port: int = 0
    address: IPv4Address | IPv6Address | str = ""
    path: str = ""


def _fields(endpoint: str) -> list[str]:
    """An endpoint string split at unescaped colons, backslash escapes removed (as Twisted does)."""
    fields, current, escaped = [], "", False
    for char in endpoint:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields


def _socket(endpoint: str) -> str:
    return endpoint[len("haproxy:") :] if endpoint.lower().startswith("haproxy:") else endpoint


def _bound(key: str, endpoint: str) -> _Bound | None:
    """Where ``endpoint`` binds; None when not known before start (``systemd:``) or unparsable."""
    kind, *args = _fields(_socket(endpoint))
    kind = kind.lower()
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        if kind in ("tcp", "tcp6", "ssl"):
            port = int(named.get("port", positional[0] if positional else ""))
            text = named.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
            address: IPv4Address | IPv6Address | str
            try:
                address = ip_address(text or ("::" if kind == "tcp6" else "0.0.0.0"))
            except ValueError:
                address = text.lower()  # a host name: compared as written
            return _Bound(key, endpoint, "tcp", port=port, address=address)
        if kind == "unix":
            path = named.get("address", positional[0] if positional else "")
            return _Bound(key, endpoint, "unix", path=os.path.abspath(path) if path else "")
    except (ValueError, IndexError):
        return None
    return None


def binds_at(endpoint: str) -> tuple[str, str, int] | None:
    """Where a server ``endpoint`` binds: ``("unix", path, 0)`` or ``("tcp", address, port)``;
    None when that is not known before start or the string does not parse."""
    here = _bound("", endpoint)
    if here is None:
        return None
    if here.kind == "unix":
        return "unix", here.path, 0
    return "tcp", str(here.address), here.port


def _overlap(a: _Bound, b: _Bound) -> bool:
    """Whether two listening sockets cannot both bind."""
    if a.kind != b.kind:
        return False
    if a.kind == "unix":
        return bool(a.path) and a.path == b.path
    if a.port == 0 or a.port != b.port:
        return False
    x, y = a.address, b.address
    if x == y:
        return True
    if isinstance(x, str) or isinstance(y, str):
        return False
    for one, other in ((x, y), (y, x)):
        if one.is_unspecified:
            # "::" is dual-stack (Twisted does not set IPV6_V6ONLY): it takes IPv4 too.
            if one.version == 6 or other.version == 4:
                return True
    return False


def _listening(config: Config) -> list[tuple[str, str]]:
    """(key path, endpoint) of every socket the gate listens on."""
    found = [(f"listen[{i}].endpoint", li.endpoint) for i, li in enumerate(config.listeners)]
    found += [(f"redirect[{i}].endpoint", r.endpoint) for i, r in enumerate(config.redirects)]
    if config.console is not None:
        found.append(("console.endpoint", config.console.endpoint))
    if config.admin is not None:
        found.append(("admin.endpoint", config.admin.endpoint))
    if config.control is not None:
        found.append(("control.endpoint", config.control.endpoint))
    return found


def _endpoint_problems(config: Config) -> list[str]:
    problems = []
    bound: list[_Bound] = []
    for key, endpoint in _listening(config):
        socket_endpoint = _socket(endpoint)
        if socket_endpoint.lower().startswith("systemd:"):
            continue  # its socket is handed over by systemd at start: nothing to check before
        no_reactor: Any = None  # parsing only: the endpoint is never asked to listen
        try:
            serverFromString(no_reactor, socket_endpoint)
        except Exception as e:  # Twisted's parsers raise ValueError, TypeError, KeyError, ...
            problems.append(f"{config.source}: {key}: {endpoint!r}: {_reason(e)}")
            continue
        here = _bound(key, endpoint)
        if here is None:
            continue
        for earlier in bound:
            if _overlap(earlier, here):
                what = "is the same endpoint as" if earlier.endpoint == endpoint else "overlaps"
                problems.append(
                    f"{config.source}: {key}: {endpoint!r} {what} {earlier.key} "
                    f"({earlier.endpoint!r}): both cannot listen"
                )
                break
        bound.append(here)
    return problems


def _reason(e: Exception) -> str:
    text = str(e).replace("_parseTCP() got an ", "").replace("_parseUNIX() got an ", "")
    return f"not a valid endpoint: {text or type(e).__name__}"


def _console_problems(config: Config) -> list[str]:
    from wsgate.ops.console import console_problems

    spec = config.console
    if spec is None:
        return []
    problems = [f"{config.source}: {key}: {reason}" for key, reason in console_problems(spec)]
    host_key = spec.host_key
    if not os.path.exists(host_key):
        parent = os.path.dirname(host_key)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(
                f"{config.source}: console.host_key: {host_key}: missing, and it cannot be made "
                f"({parent} is not writable)"
            )
    return problems


def problems(config: Config) -> list[str]:
    """Why ``config`` (already valid by ``config.parse``) would not start; empty when it would."""
    return _endpoint_problems(config) + _console_problems(config) + _control_problems(config)


def _beyond_loopback(key: str, endpoint: str) -> str | None:
    """Where a TCP ``endpoint`` listens when that is beyond loopback ("every address" or the
    address); None for loopback, Unix sockets and what cannot be parsed."""
    here = _bound(key, endpoint)
    if here is None or here.kind != "tcp":
        return None
    address = here.address
    if isinstance(address, str) and address == "localhost":
        return None
    if not isinstance(address, str) and address.is_loopback:
        return None
    if not isinstance(address, str) and address.is_unspecified:
        return "every address"
    return str(address)


def _control_problems(config: Config) -> list[str]:
    """The control API acts on the gate: on TCP, loopback only (wsgate.config asks for a token)."""
    if config.control is None:
        return []
    endpoint = config.control.endpoint
    where = _beyond_loopback("control.endpoint", endpoint)
    if where is None:
        return []
    return [
        f"{config.source}: control.endpoint: {endpoint!r} listens on {where}: the control API "
        "acts on the gate, so it listens on a Unix socket or on loopback only (interface=127.0.0.1)"
    ]


def warnings(config: Config) -> list[str]:
    """What starts but is risky: an admin listener without a token beyond loopback."""
    if config.admin is None or config.admin.token_file is not None:
        return []
    endpoint = config.admin.endpoint
    where = _beyond_loopback("admin.endpoint", endpoint)
    if where is None:
        return []
    return [
        f"{config.source}: admin.endpoint: {endpoint!r} listens on {where}, beyond loopback, and "
        "the admin listener has no authentication: give it a token_file, or bind it to 127.0.0.1 "
        "or a management network only"
    ]

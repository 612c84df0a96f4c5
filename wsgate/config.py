"""
Configuration: TOML in, frozen dataclasses out.

This module owns the config schema, its defaults, unit conversion ("30s" -> 30.0, "16MiB" -> int) and
validation.  Every problem is reported as ``FILE: key.path: reason`` and all problems are reported at
once, like ``nginx -t``.  It must not build Twisted objects: endpoint strings are only checked for
syntax here (``service.py`` turns them into listeners).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "BALANCE_METHODS",
    "Config",
    "ConfigError",
    "Listener",
    "Route",
    "ServerSpec",
    "UpstreamSpec",
    "from_arguments",
    "load",
    "parse",
]

BALANCE_METHODS = ("round_robin",)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


class ConfigError(Exception):
    """
    A configuration was refused.  ``problems`` holds one ``FILE: key.path: reason`` line per problem.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Listener:
    """Where the gate accepts clients: a Twisted server endpoint string."""

    endpoint: str


@dataclass(frozen=True)
class ServerSpec:
    """One backend server of an upstream."""

    url: str
    weight: int = 1

    @property
    def secure(self) -> bool:
        return self.url.startswith("wss://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "wss" else 80)


@dataclass(frozen=True)
class UpstreamSpec:
    """A named group of backend servers and how sessions are spread over them."""

    name: str
    servers: tuple[ServerSpec, ...]
    balance: str = "round_robin"
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    tries: int = 3
    try_timeout: float = 15.0


@dataclass(frozen=True)
class Route:
    """Which client requests go to which upstream, and the session options for them."""

    path: str
    upstream: str
    host: str | None = None
    idle_timeout: float = 0.0
    ping_interval: float = 0.0
    ping_timeout: float = 10.0
    max_message_size: int = 16 * 1024**2

    def matches(self, host: str, path: str) -> bool:
        """
        Whether a request for ``host`` and ``path`` belongs to this route: ``path`` starts with the
        route's prefix at a segment boundary (``/chat`` matches ``/chat`` and ``/chat/x``, not
        ``/chatter``), and the host matches when the route names one (case-insensitive).
        """
        if self.host is not None and host.lower() != self.host.lower():
            return False
        prefix = self.path
        if not path.startswith(prefix):
            return False
        return prefix.endswith("/") or len(path) == len(prefix) or path[len(prefix)] in "/?"


@dataclass(frozen=True)
class Config:
    """A whole, validated gateway configuration."""

    source: str
    listeners: tuple[Listener, ...]
    routes: tuple[Route, ...]
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)


def parse_duration(value: object) -> float:
    """``"30s"``, ``"250ms"``, ``"2m"``, ``"1h"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 250ms, 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration such as 30s, 250ms, 2m")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """``"16MiB"``, ``"64KiB"``, ``"100"`` or an integer number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 16MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a size such as 64KiB or 16MiB")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def check_endpoint(value: object) -> str:
    """A Twisted server endpoint string, checked for syntax without building anything."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a Twisted endpoint string such as tcp:8020")
    kind = value.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "unix", "ssl", "systemd", "haproxy"):
        raise ValueError(f"{value!r}: unknown endpoint type {kind!r} (tcp, tcp6, unix, ...)")
    if kind in ("tcp", "tcp6", "ssl"):
        port = value.split(":")[1] if ":" in value else ""
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


T = TypeVar("T")


class _Table:
    """
    One TOML table being read: typed look-ups that record problems under their key path instead of
    raising, and a final check for keys nobody asked for.
    """

    def __init__(self, reader: _Reader, path: str, data: object) -> None:
        self._reader = reader
        self._path = path
        self._data: dict[str, Any] = data if isinstance(data, dict) else {}
        self._seen: set[str] = set()
        if not isinstance(data, dict):
            reader.problem(path, "expected a table")

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(
        self,
        name: str,
        default: T,
        convert: Callable[[object], T],
        required: bool = False,
    ) -> T:
        self._seen.add(name)
        if name not in self._data:
            if required:
                self._reader.problem(self.key(name), "required")
            return default
        try:
            return convert(self._data[name])
        except ValueError as e:
            self._reader.problem(self.key(name), str(e))
            return default

    def tables(self, name: str) -> Iterator[_Table]:
        """The items of an array of tables (``[[name]]``)."""
        self._seen.add(name)
        items = self._data.get(name, [])
        if not isinstance(items, list):
            self._reader.problem(self.key(name), "expected an array of tables")
            return
        for i, item in enumerate(items):
            yield _Table(self._reader, f"{self.key(name)}[{i}]", item)

    def subtables(self, name: str) -> Iterator[tuple[str, _Table]]:
        """The named sub-tables of a table (``[name.x]``, ``[name.y]``)."""
        self._seen.add(name)
        items = self._data.get(name, {})
        if not isinstance(items, dict):
            self._reader.problem(self.key(name), "expected a table")
            return
        for sub, item in items.items():
            yield sub, _Table(self._reader, f"{self.key(name)}.{sub}", item)

    def done(self) -> None:
        for name in self._data:
            if name not in self._seen:
                self._reader.problem(self.key(name), "unknown key")


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {key}: {reason}")


def _typed(kind: type[T], description: str) -> Callable[[object], T]:
    def convert(value: object) -> T:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"expected {description}")
        return value

    return convert


def _positive_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return convert


def _route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected a path prefix starting with /")
    return value


def _server(table: _Table) -> ServerSpec:
    spec = ServerSpec(
        url=table.get("url", "", check_backend_url, required=True),
        weight=table.get("weight", 1, _positive_int),
    )
    table.done()
    return spec


def _upstream(name: str, table: _Table) -> UpstreamSpec:
    servers = tuple(_server(t) for t in table.tables("servers"))
    if not servers:
        table._reader.problem(table.key("servers"), "an upstream needs at least one server")
    spec = UpstreamSpec(
        name=name,
        servers=servers,
        balance=table.get("balance", "round_robin", _choice(*BALANCE_METHODS)),
        connect_timeout=table.get("connect_timeout", 5.0, parse_duration),
        handshake_timeout=table.get("handshake_timeout", 10.0, parse_duration),
        tries=table.get("tries", 3, _positive_int),
        try_timeout=table.get("try_timeout", 15.0, parse_duration),
    )
    table.done()
    return spec


def _route(table: _Table, upstreams: Mapping[str, UpstreamSpec]) -> Route:
    upstream = table.get("upstream", "", _typed(str, "an upstream name"), required=True)
    if upstream and upstream not in upstreams:
        table._reader.problem(table.key("upstream"), f"no upstream named {upstream!r}")
    route = Route(
        path=table.get("path", "/", _route_path),
        upstream=upstream,
        host=table.get("host", None, _typed(str, "a host name")),
        idle_timeout=table.get("idle_timeout", 0.0, parse_duration),
        ping_interval=table.get("ping_interval", 0.0, parse_duration),
        ping_timeout=table.get("ping_timeout", 10.0, parse_duration),
        max_message_size=table.get("max_message_size", 16 * 1024**2, parse_size),
    )
    table.done()
    return route


def parse(data: Mapping[str, Any], source: str) -> Config:
    """
    Validate a parsed TOML document.  Raises :class:`ConfigError` listing every problem.
    """
    reader = _Reader(source)
    top = _Table(reader, "", dict(data))
    listeners = []
    for t in top.tables("listen"):
        listeners.append(Listener(endpoint=t.get("endpoint", "", check_endpoint, required=True)))
        t.done()
    if not listeners:
        reader.problem("listen", "at least one [[listen]] table is required")
    upstreams = {name: _upstream(name, t) for name, t in top.subtables("upstream")}
    routes = tuple(_route(t, upstreams) for t in top.tables("route"))
    if not routes:
        reader.problem("route", "at least one [[route]] table is required")
    top.done()
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(source=source, listeners=tuple(listeners), routes=routes, upstreams=upstreams)


def load(path: str) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse(data, path)


def from_arguments(listen: list[str], backends: list[str]) -> Config:
    """
    The config for ``--listen ENDPOINT --backend URL ...``: one route ``/`` to one round-robin
    upstream named ``default``.  Problems are reported against ``--listen`` and ``--backend``.
    """
    data = {
        "listen": [{"endpoint": e} for e in listen],
        "route": [{"path": "/", "upstream": "default"}],
        "upstream": {"default": {"servers": [{"url": u} for u in backends]}},
    }
    try:
        return parse(data, "command line")
    except ConfigError as e:
        renamed = [
            re.sub(r"listen\[\d+\]\.endpoint", "--listen", p).replace(
                "upstream.default.servers", "--backend"
            )
            for p in e.problems
        ]
        raise ConfigError(renamed) from None

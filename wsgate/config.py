"""
Configuration: TOML in, frozen dataclasses out.

This module owns the config schema, its defaults, unit conversion ("30s" -> 30.0, "16MiB" -> int) and
validation.  Every problem is reported as ``FILE: key.path: reason`` and all problems are reported at
once, like ``nginx -t``.  It must not build Twisted objects: endpoint strings are only checked for
syntax here (``service.py`` turns them into listeners).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = [
    "AUTH_TYPES",
    "JWT_ALGORITHMS",
    "AuthSpec",
    "BALANCE_METHODS",
    "TLS_VERSIONS",
    "CertificateFiles",
    "ClusterSpec",
    "Config",
    "ConfigError",
    "ConnectHook",
    "DisconnectHook",
    "ConsoleSpec",
    "AdminSpec",
    "ControlSpec",
    "DEFAULT_CIPHERS",
    "HealthSpec",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Limits",
    "Listener",
    "LogSpec",
    "ListenerTLS",
    "Redirect",
    "Route",
    "ServerSpec",
    "UpstreamSpec",
    "certificate_problems",
    "from_arguments",
    "load",
    "parse",
    "default_control_endpoint",
    "read_token",
    "server_spec",
]

BALANCE_METHODS = ("round_robin", "least_conn", "hash", "random_two")
HEALTH_TYPES = ("tcp", "websocket", "http")
TLS_VERSIONS = ("1.2", "1.3")
# TLS 1.2 cipher suites of a listener by default (an OpenSSL cipher string): forward secrecy
# (ECDHE or DHE key exchange) and AEAD (AES-GCM or ChaCha20-Poly1305) only, so no static-RSA key
# exchange, no CBC and no SHA-1 MACs (Mozilla's "intermediate" set).  TLS 1.3 suites are all AEAD
# with forward secrecy and are not affected by this string.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!DSS"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
AUTH_TYPES = ("jwt", "forward")
# Signature algorithms a route may allow (never "none"); which key types each may use is decided
# in wsgate/core/auth.py, so an HMAC secret never verifies an RSA token nor the other way round.
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip

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


LISTEN_BACKLOG = 1024


class ConfigError(Exception):
    """
    A configuration was refused.  ``problems`` holds one ``FILE: key.path: reason`` line per problem.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CertificateFiles:
    """
    A certificate (PEM; may be followed by its intermediates), its private key (PEM, unencrypted)
    and optionally a separate file of intermediate certificates, as checked absolute paths.
    """

    cert: str
    key: str
    chain: str | None = None


@dataclass(frozen=True)
class ListenerTLS:
    """
    TLS on a listener: the default certificate (clients without SNI, or with a name not in
    ``sni``), the lowest TLS version accepted, the TLS 1.2 cipher suites (an OpenSSL cipher
    string) and certificates chosen by SNI name (exact lower-case names and ``*.example.com``
    wildcards).
    """

    default: CertificateFiles
    min_version: str = "1.2"
    ciphers: str = DEFAULT_CIPHERS
    sni: Mapping[str, CertificateFiles] = field(default_factory=dict)


@dataclass(frozen=True)
class Listener:
    """Where the gate accepts clients: a Twisted server endpoint string, optionally with TLS."""

    endpoint: str
    tls: ListenerTLS | None = None
    proxy_protocol: bool = False

    @property
    def behind_proxy(self) -> bool:
        """Whether connections start with a PROXY protocol header."""
        return self.proxy_protocol or self.endpoint.lower().startswith("haproxy:")

    @property
    def socket_endpoint(self) -> str:
        """
        The endpoint string of the listening socket itself: without a ``haproxy:`` wrapper, and
        for TCP with ``backlog=1024`` unless the string sets one (Twisted's default of 50
        overflows in bursts of new clients, who then wait for SYN retransmits; NGINX uses 511).
        """
        endpoint = self.endpoint
        if endpoint.lower().startswith("haproxy:"):
            endpoint = endpoint[len("haproxy:") :]
        if endpoint.split(":", 1)[0].lower() in ("tcp", "tcp6") and "backlog=" not in endpoint:
            endpoint += f":backlog={LISTEN_BACKLOG}"
        return endpoint


@dataclass(frozen=True)
class Redirect:
    """A plain-HTTP listener that answers every request with a 301 to the same URL over https."""

    endpoint: str
    https_port: int = 443


@dataclass(frozen=True)
class ServerSpec:
    """One backend server of an upstream."""

    url: str
    weight: int = 1
    ca: str | None = None
    verify: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    # 0: no limit.  A server with max_conns active sessions is skipped.
    max_conns: int = 0
    # Used only when every primary (non-backup) server is down, full or draining.
    backup: bool = False
    # The URL's host name is resolved (A/AAAA) every resolve_interval; each address is a server.
    resolve: bool = False

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
class HealthSpec:
    """
    Active health checks of an upstream's servers: every ``interval`` a probe of ``type`` (``tcp``
    connect, ``websocket`` handshake to ``path``, ``http`` GET of ``path`` expecting 2xx) that must
    succeed within ``timeout``; ``rise`` successes in a row bring a server up, ``fall`` failures in a
    row take it down.
    """

    type: str = "tcp"
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


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
    # What ``hash`` hashes: "ip", "header:NAME", "cookie:NAME" or "query:NAME".
    key: str = "ip"
    # Passive health (NGINX semantics): max_fails failed attempts within fail_timeout mark a server
    # down for fail_timeout.  max_fails = 0 turns passive health off.
    max_fails: int = 1
    fail_timeout: float = 10.0
    health: HealthSpec | None = None
    resolve_interval: float = 30.0
    # Automatic rebalance: when the most loaded server holds more than rebalance_threshold times
    # its fair share (0: off), checked every rebalance_interval, closes spread over rebalance_window.
    rebalance_threshold: float = 0.0
    rebalance_interval: float = 30.0
    rebalance_window: float = 10.0


@dataclass(frozen=True)
class ConnectHook:
    """
    ``[route.on_connect]``: the HTTP call made during a client's handshake, before any backend is
    contacted, that allows it (2xx, optionally adding headers to the backend request) or denies it
    (4xx); see :mod:`wsgate.core.webhooks`.
    """

    url: str
    timeout: float = 2.0
    # The client request headers sent along (lower-case names), and whether the query string is.
    headers: tuple[str, ...] = ()
    query: bool = False
    # No usable answer (5xx, timeout, unreachable): "deny" refuses the client with 503, "allow"
    # lets it through without added headers.
    on_failure: str = "deny"


@dataclass(frozen=True)
class DisconnectHook:
    """
    ``[route.on_disconnect]``: where the audit record of each finished session is POSTed, through a
    queue of at most ``queue_size`` records with ``concurrency`` calls in flight and ``tries`` tries
    each, ``backoff`` doubling between them.
    """

    url: str
    timeout: float = 5.0
    queue_size: int = 1000
    concurrency: int = 4
    tries: int = 4
    backoff: float = 1.0


@dataclass(frozen=True)
class AuthSpec:
    """
    Authentication of a route's handshakes (``[route.auth]``), checked before any backend is
    contacted.  ``type = "jwt"``: a token from ``token`` (``"header"``: ``Authorization: Bearer``,
    ``"cookie:NAME"``, ``"query:NAME"``; the first found counts) verified against ``keys`` (a PEM
    or JWKS file, absolute) or ``jwks_url``.  ``type = "forward"``: a ``method`` request to ``url``
    with the client's ``send_headers``; a 2xx answer's ``copy_headers`` go to the backend.
    Hashable (tuples only): the authenticator keys its caches on it.
    """

    type: str
    realm: str = "wsgate"
    # jwt
    token: tuple[str, ...] = ("header",)
    keys: str | None = None
    jwks_url: str | None = None
    keys_refresh: float = 300.0
    algorithms: tuple[str, ...] = ("RS256",)
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    leeway: float = 0.0
    required_claims: tuple[str, ...] = ("exp",)
    scopes: tuple[str, ...] = ()
    claim_headers: tuple[tuple[str, str], ...] = ()
    forward_token: bool = True
    expiry_warning: float = 0.0
    # forward
    url: str | None = None
    method: str = "GET"
    send_headers: tuple[str, ...] = ("authorization", "cookie")
    copy_headers: tuple[str, ...] = ()
    cache: float = 0.0
    cache_size: int = 10000
    # both: the JWKS fetch or the auth service's answer
    timeout: float = 5.0


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
    max_frame_size: int = 0
    max_messages_per_second: float = 0.0
    max_bytes_per_second: int = 0
    throttle: bool = False
    allowed_origins: tuple[str, ...] = ()
    required_subprotocol: str | None = None
    # How the frame engine (wsgate/core/frames.py) checks what it relays: "message" checks all an
    # endpoint checks, UTF-8 of text included; "tunnel" checks framing and Close frames only.
    mode: str = "message"
    # "pass": the client's permessage-deflate offer goes to the backend and its answer back;
    # "off": the offer is not forwarded, so the session is uncompressed.
    compression: str = "pass"
    # Reverse-proxy plain HTTP requests (not WebSocket upgrades) to the upstream; else 426.
    http: bool = False
    # Lifecycle webhooks (wsgate/dataplane/webhooks.py).
    on_connect: ConnectHook | None = None
    on_disconnect: DisconnectHook | None = None
    auth: AuthSpec | None = None
    # Sessions older than max_session_age (0: no limit) are closed 1001, each at a random moment
    # up to max_session_age_spread later.
    max_session_age: float = 0.0
    max_session_age_spread: float = 0.0

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
class Limits:
    """Gateway-wide limits and lifecycle settings (``[limits]``); 0 means no limit."""

    max_sessions: int = 0
    max_sessions_per_ip: int = 0
    handshake_rate: float = 0.0
    handshake_burst: int = 20
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    # A peer whose send buffer stays full this long is closed 1013 (0: never).
    send_timeout: float = 60.0
    max_header_size: int = 16 * 1024
    max_headers: int = 100
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    shutdown_grace: float = 10.0
    shutdown_spread: float = 0.0
    retry_after: int = 5


@dataclass(frozen=True)
class ConsoleSpec:
    """
    The SSH console (``[console]``): where it listens, its persisted host key (made on first start
    when missing) and how operators log in: an OpenSSH ``authorized_keys`` file and/or an
    htpasswd-style ``users`` file of bcrypt hashes.  Paths are absolute.
    """

    endpoint: str
    host_key: str
    authorized_keys: str | None = None
    users: str | None = None


@dataclass(frozen=True)
class AdminSpec:
    """The admin HTTP listener (``[admin]``): ``/metrics``, ``/status.json`` and the status page."""

    endpoint: str


@dataclass(frozen=True)
class ControlSpec:
    """
    The control API (``[control]``): JSON over HTTP on a Unix socket (by default
    :func:`default_control_endpoint`) or a loopback TCP port, which needs ``token_file``: a file
    holding the bearer token callers must send (on a Unix socket too, when given).
    """

    endpoint: str
    token_file: str | None = None


def default_control_endpoint(env: Mapping[str, str] | None = None) -> str:
    """
    Where the control socket is when ``[control]`` names no endpoint: ``control.sock`` in
    systemd's ``RuntimeDirectory`` (``$RUNTIME_DIRECTORY``, or ``/run/wsgate`` when it exists, so
    an operator's shell finds it too), else in ``$XDG_RUNTIME_DIR/wsgate/``, else in
    ``/tmp/wsgate-UID/``.  Mode 0600: only the gate's user (and root) may connect.
    """
    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not runtime and os.path.isdir("/run/wsgate"):
        runtime = "/run/wsgate"
    if not runtime:
        xdg = env.get("XDG_RUNTIME_DIR")
        runtime = os.path.join(xdg, "wsgate") if xdg else f"/tmp/wsgate-{os.getuid()}"
    return f"unix:{os.path.join(runtime, 'control.sock')}:mode=600"


def server_spec(url: str, weight: int = 1, backup: bool = False) -> ServerSpec:
    """A server added at run time (the control API's ``add``); a ValueError when it is bad."""
    return ServerSpec(
        url=check_backend_url(url), weight=_positive_int(weight), backup=backup is True
    )


@dataclass(frozen=True)
class LogSpec:
    """
    The gate's log (``[log]``): the lowest level written, the line format (``text``: Twisted's
    lines with logfmt-safe values; ``json``: one object per line), and whether query strings are
    redacted in logs, ``/status.json``, the status page and the console (the values of the
    parameters named in ``redact_query_keep`` stay).
    """

    level: str = "info"
    format: str = "text"
    redact_query: bool = True
    redact_query_keep: tuple[str, ...] = ()
    # Query parameters that carry a route's credential (``[route.auth] token = "query:NAME"``):
    # hidden whatever redact_query and redact_query_keep say.  Set from the routes, not a key.
    redact_always: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterSpec:
    """
    A fleet of gates sharing one Redis (``[cluster]``): where Redis is (``redis://host:port/db``;
    its password read from ``password_file`` at start), this gate's name in the fleet (None: the
    host name and process id), the prefix of every key and channel, how often the gate refreshes
    its keys (``heartbeat``) and how long they outlive a silent gate (``ttl``), how often per-IP
    figures are exchanged (``sync_interval``), how long a request to another gate waits for its
    answer (``request_timeout``) and whether ``[limits]`` per address hold fleet-wide.
    """

    host: str
    port: int = 6379
    db: int = 0
    password_file: str | None = None
    name: str | None = None
    prefix: str = "wsgate:"
    heartbeat: float = 2.0
    ttl: float = 10.0
    sync_interval: float = 0.5
    request_timeout: float = 5.0
    fleet_limits: bool = False


@dataclass(frozen=True)
class Config:
    """A whole, validated gateway configuration."""

    source: str
    listeners: tuple[Listener, ...]
    routes: tuple[Route, ...]
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)
    redirects: tuple[Redirect, ...] = ()
    limits: Limits = field(default_factory=lambda: Limits())
    console: ConsoleSpec | None = None
    admin: AdminSpec | None = None
    control: ControlSpec | None = None
    # Worker processes sharing the listeners (``workers``; "auto" is resolved to the core count).
    workers: int = 1
    # A log line when a session opens, besides the access-log line when it ends.
    log_session_opened: bool = False
    log: LogSpec = field(default_factory=lambda: LogSpec())
    cluster: ClusterSpec | None = None


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

    def subtable(self, name: str) -> _Table | None:
        """An optional (inline) sub-table, or None when the key is absent."""
        self._seen.add(name)
        if name not in self._data:
            return None
        return _Table(self._reader, self.key(name), self._data[name])

    def done(self) -> None:
        for name in self._data:
            if name not in self._seen:
                self._reader.problem(self.key(name), "unknown key")


class _Reader:
    def __init__(self, source: str, base_dir: str | None = None) -> None:
        self.source = source
        self.base_dir = os.path.dirname(source) if base_dir is None else base_dir
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


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise ValueError('expected a whole number of at least 1 or "auto"')
    return _positive_int(value)


# Endpoint kinds a parent can bind and hand to its workers (``workers`` > 1).
_SHAREABLE = ("tcp", "tcp6", "unix")


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return convert


def _non_negative(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a number of at least 0")
    return float(value)


def _non_negative_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a whole number of at least 0 (0: no limit)")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of networks such as 10.0.0.0/8")
    try:
        return tuple(ip_network(v, strict=False) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a network: {e}") from None


def _route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError("expected a path prefix starting with /")
    return value


# -- TLS files ------------------------------------------------------------------------------------
# Certificates and keys are read and checked here with ``cryptography`` (no Twisted objects): the file
# exists and is PEM, the key matches the certificate, the certificate is within its validity period.


def _file(reader: _Reader) -> Callable[[object], str]:
    """A path to a readable file, relative to the config file's directory; -> absolute path."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path")
        path = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(value)))
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror or e}") from None
        return path

    return convert


def _read_certificates(path: str) -> list[x509.Certificate]:
    """The PEM certificates in a file; ValueError naming the file when there are none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        certificates = x509.load_pem_x509_certificates(data)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"{path}: no PEM certificate in this file") from None
    return certificates


def _read_key(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{path}: not an unencrypted PEM private key") from None


def _public(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_problems(cert: str, key: str, chain: str | None = None) -> list[tuple[str, str]]:
    """
    Check a certificate, its key and optional chain file: ``[(key_name, reason), ...]`` where
    ``key_name`` is ``"cert"``, ``"key"`` or ``"chain"`` and the reason starts with the file name.
    Empty when all is well.
    """
    problems: list[tuple[str, str]] = []
    leaf = private = None
    try:
        leaf = _read_certificates(cert)[0]
    except ValueError as e:
        problems.append(("cert", str(e)))
    try:
        private = _read_key(key)
    except ValueError as e:
        problems.append(("key", str(e)))
    if chain is not None:
        try:
            _read_certificates(chain)
        except ValueError as e:
            problems.append(("chain", str(e)))
    if leaf is not None:
        now = datetime.datetime.now(datetime.UTC)
        if leaf.not_valid_after_utc < now:
            problems.append(("cert", f"{cert}: certificate expired on {leaf.not_valid_after_utc}"))
        elif leaf.not_valid_before_utc > now:
            problems.append(
                ("cert", f"{cert}: certificate not valid before {leaf.not_valid_before_utc}")
            )
        if private is not None and _public(leaf.public_key()) != _public(private.public_key()):
            problems.append(("key", f"{key}: private key does not match the certificate {cert}"))
    return problems


def _certificate_files(table: _Table) -> CertificateFiles | None:
    """``cert``, ``key`` and optional ``chain`` of a table, checked; None when unusable."""
    path = _file(table._reader)
    files = CertificateFiles(
        cert=table.get("cert", "", path, required=True),
        key=table.get("key", "", path, required=True),
        chain=table.get("chain", None, path),
    )
    if not files.cert or not files.key:
        return None
    problems = certificate_problems(files.cert, files.key, files.chain)
    for name, reason in problems:
        table._reader.problem(table.key(name), reason)
    return None if problems else files


def _sni_name(value: str) -> str | None:
    name = value.lower().rstrip(".")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return None
    if not all(re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?", label) for label in labels):
        return None
    return name


def _listener_tls(table: _Table) -> ListenerTLS | None:
    default = _certificate_files(table)
    min_version = table.get("min_version", "1.2", _choice(*TLS_VERSIONS))
    ciphers = table.get("ciphers", DEFAULT_CIPHERS, _cipher_string)
    sni: dict[str, CertificateFiles] = {}
    for name, sub in table.subtables("sni"):
        normal = _sni_name(name)
        if normal is None:
            table._reader.problem(
                sub._path, "not a host name or *.wildcard name (like *.example.com)"
            )
        files = _certificate_files(sub)
        sub.done()
        if normal is not None and files is not None:
            sni[normal] = files
    table.done()
    if default is None:
        return None
    return ListenerTLS(default=default, min_version=min_version, ciphers=ciphers, sni=sni)


def _cipher_string(value: object) -> str:
    """An OpenSSL cipher string that selects at least one TLS 1.2 cipher suite."""
    from OpenSSL import SSL

    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an OpenSSL cipher string such as ECDHE+AESGCM")
    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(value.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError(f"{value!r}: selects no TLS 1.2 cipher suite OpenSSL knows") from None
    return value


def _listener(table: _Table) -> Listener:
    endpoint = table.get("endpoint", "", check_endpoint, required=True)
    tls_table = table.subtable("tls")
    tls = _listener_tls(tls_table) if tls_table is not None else None
    if tls is not None and endpoint.lower().startswith("ssl:"):
        table._reader.problem(table.key("tls"), "give tls = {...} with a tcp: endpoint, not ssl:")
    proxy_protocol = table.get("proxy_protocol", False, _typed(bool, "true or false"))
    table.done()
    return Listener(endpoint=endpoint, tls=tls, proxy_protocol=proxy_protocol)


def _redirect(table: _Table) -> Redirect:
    redirect = Redirect(
        endpoint=table.get("endpoint", "", check_endpoint, required=True),
        https_port=table.get("https_port", 443, _port),
    )
    table.done()
    return redirect


def _console(table: _Table) -> ConsoleSpec:
    path = _file(table._reader)
    spec = ConsoleSpec(
        endpoint=table.get("endpoint", "", check_endpoint, required=True),
        host_key=table.get("host_key", "", _host_key_path(table._reader), required=True),
        authorized_keys=table.get("authorized_keys", None, path),
        users=table.get("users", None, path),
    )
    if "authorized_keys" not in table._data and "users" not in table._data:
        table._reader.problem(
            table._path, "give authorized_keys or users (or both): no way to log in otherwise"
        )
    table.done()
    return spec


def _host_key_path(reader: _Reader) -> Callable[[object], str]:
    """A host key file; it (and its directory) may not exist yet: both are made on first start."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a file path")
        path = os.path.abspath(os.path.join(reader.base_dir, os.path.expanduser(value)))
        if os.path.isdir(path):
            raise ValueError(f"{path}: a directory, not a key file")
        return path

    return convert


def _admin(table: _Table) -> AdminSpec:
    spec = AdminSpec(endpoint=table.get("endpoint", "", check_endpoint, required=True))
    table.done()
    return spec


def _control(table: _Table) -> ControlSpec:
    spec = ControlSpec(
        endpoint=table.get("endpoint", "", check_endpoint) or default_control_endpoint(),
        token_file=table.get("token_file", None, _token_file(table._reader)),
    )
    kind = spec.endpoint.split(":", 1)[0].lower()
    if kind == "unix" and ":mode=" not in spec.endpoint:
        # Twisted makes Unix sockets 0666: only the gate's user (and root) may act on it.
        spec = replace(spec, endpoint=spec.endpoint + ":mode=600")
    if kind not in ("unix", "tcp", "tcp6"):
        table._reader.problem(table.key("endpoint"), "a unix: socket or a loopback tcp: port")
    elif kind != "unix" and spec.token_file is None:
        table._reader.problem(
            table.key("token_file"),
            "required with a tcp: endpoint (anyone who can connect could act on the gate)",
        )
    table.done()
    return spec


def _token_file(reader: _Reader) -> Callable[[object], str]:
    """A readable file whose content (surrounding blanks stripped) is a bearer token."""
    readable = _file(reader)

    def convert(value: object) -> str:
        path = readable(value)
        if read_token(path) == "":
            raise ValueError(f"{path}: empty: it must hold the token")
        return path

    return convert


def read_token(path: str) -> str:
    """The bearer token in ``path`` (surrounding blanks stripped); OSError when unreadable."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").strip()


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError("expected a port number from 1 to 65535")
    return value


def _server(table: _Table) -> ServerSpec:
    path = _file(table._reader)
    spec = ServerSpec(
        url=table.get("url", "", check_backend_url, required=True),
        weight=table.get("weight", 1, _positive_int),
        ca=table.get("ca", None, path),
        verify=table.get("verify", True, _typed(bool, "true or false")),
        client_cert=table.get("client_cert", None, path),
        client_key=table.get("client_key", None, path),
        max_conns=table.get("max_conns", 0, _count),
        backup=table.get("backup", False, _typed(bool, "true or false")),
        resolve=table.get("resolve", False, _typed(bool, "true or false")),
    )
    if spec.resolve and spec.secure:
        table._reader.problem(
            table.key("resolve"),
            "only for ws:// servers (a wss:// certificate is checked against the URL's host name)",
        )
    if spec.url and not spec.secure:
        for name in ("ca", "verify", "client_cert", "client_key"):
            if name in table._data:
                table._reader.problem(table.key(name), "only for wss:// servers")
    if spec.ca is not None:
        try:
            _read_certificates(spec.ca)
        except ValueError as e:
            table._reader.problem(table.key("ca"), str(e))
    if spec.ca is not None and not spec.verify:
        table._reader.problem(table.key("ca"), "a ca bundle is pointless with verify = false")
    if (spec.client_cert is None) != (spec.client_key is None):
        if "client_cert" in table._data or "client_key" in table._data:
            table._reader.problem(
                table.key("client_key" if spec.client_key is None else "client_cert"),
                "client_cert and client_key go together",
            )
    elif spec.client_cert is not None and spec.client_key is not None:
        for name, reason in certificate_problems(spec.client_cert, spec.client_key):
            table._reader.problem(table.key(f"client_{name}"), reason)
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
        key=table.get("key", "ip", _hash_key),
        max_fails=table.get("max_fails", 1, _count),
        fail_timeout=table.get("fail_timeout", 10.0, parse_duration),
        health=_health(health) if (health := table.subtable("health")) is not None else None,
        resolve_interval=table.get("resolve_interval", 30.0, _positive_duration),
        rebalance_threshold=table.get("rebalance_threshold", 0.0, _threshold),
        rebalance_interval=table.get("rebalance_interval", 30.0, _positive_duration),
        rebalance_window=table.get("rebalance_window", 10.0, parse_duration),
    )
    if "key" in table._data and spec.balance != "hash":
        table._reader.problem(table.key("key"), 'only with balance = "hash"')
    if servers and all(s.backup for s in servers):
        table._reader.problem(table.key("servers"), "every server is a backup: mark one primary")
    table.done()
    return spec


def _health(table: _Table) -> HealthSpec:
    spec = HealthSpec(
        type=table.get("type", "tcp", _choice(*HEALTH_TYPES)),
        path=table.get("path", "/", _route_path),
        interval=table.get("interval", 5.0, _positive_duration),
        timeout=table.get("timeout", 2.0, _positive_duration),
        rise=table.get("rise", 2, _positive_int),
        fall=table.get("fall", 3, _positive_int),
    )
    if "path" in table._data and spec.type == "tcp":
        table._reader.problem(table.key("path"), 'not used by type = "tcp"')
    table.done()
    return spec


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a whole number of at least 0 (0: no limit)")
    return value


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def _threshold(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("expected a number such as 1.25 (0: off)")
    if value != 0 and value <= 1:
        raise ValueError("expected more than 1 (a multiple of the fair share), or 0 for off")
    return float(value)


def _hash_key(value: object) -> str:
    if value == "ip":
        return "ip"
    if isinstance(value, str):
        kind, _, name = value.partition(":")
        if kind in ("header", "cookie", "query") and name.strip():
            return f"{kind}:{name.strip()}"
    raise ValueError(f'{value!r} is not "ip", "header:NAME", "cookie:NAME" or "query:NAME"')


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
        max_frame_size=table.get("max_frame_size", 0, parse_size),
        mode=table.get("mode", "message", _choice("message", "tunnel")),
        compression=table.get("compression", "pass", _choice("pass", "off")),
        max_messages_per_second=table.get("max_messages_per_second", 0.0, _non_negative),
        max_bytes_per_second=table.get("max_bytes_per_second", 0, parse_size),
        throttle=table.get("throttle", False, _typed(bool, "true or false")),
        allowed_origins=table.get("allowed_origins", (), _strings),
        required_subprotocol=table.get(
            "required_subprotocol", None, _typed(str, "a subprotocol name")
        ),
        http=table.get("http", False, _typed(bool, "true or false")),
        on_connect=_connect_hook(t) if (t := table.subtable("on_connect")) is not None else None,
        on_disconnect=(
            _disconnect_hook(t) if (t := table.subtable("on_disconnect")) is not None else None
        ),
        auth=_auth(auth) if (auth := table.subtable("auth")) is not None else None,
        max_session_age=table.get("max_session_age", 0.0, parse_duration),
        max_session_age_spread=table.get("max_session_age_spread", 0.0, parse_duration),
    )
    if "max_session_age_spread" in table._data and not route.max_session_age:
        table._reader.problem(table.key("max_session_age_spread"), "only with max_session_age")
    table.done()
    return route


_AUTH_KEYS = {
    "jwt": {
        "token", "keys", "jwks_url", "keys_refresh", "algorithms", "issuer", "audience",
        "leeway", "required_claims", "scopes", "claim_headers", "forward_token",
        "expiry_warning",
    },
    "forward": {"url", "method", "send_headers", "copy_headers", "cache", "cache_size"},
}  # fmt: skip
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _auth(table: _Table) -> AuthSpec:
    kind = table.get("type", "", _choice(*AUTH_TYPES), required=True)
    spec = AuthSpec(
        type=kind,
        realm=table.get("realm", "wsgate", _quotable),
        token=table.get("token", ("header",), _token_sources),
        keys=table.get("keys", None, _key_file(table._reader)),
        jwks_url=table.get("jwks_url", None, _http_url),
        keys_refresh=table.get("keys_refresh", 300.0, _positive_duration),
        algorithms=table.get("algorithms", ("RS256",), _algorithms),
        issuer=table.get("issuer", None, _typed(str, "a string")),
        audience=table.get("audience", (), _one_or_more),
        leeway=table.get("leeway", 0.0, parse_duration),
        required_claims=table.get("required_claims", ("exp",), _strings),
        scopes=table.get("scopes", (), _strings),
        claim_headers=table.get("claim_headers", (), _claim_headers),
        forward_token=table.get("forward_token", True, _typed(bool, "true or false")),
        expiry_warning=table.get("expiry_warning", 0.0, parse_duration),
        url=table.get("url", None, _http_url),
        method=table.get("method", "GET", _choice("GET", "POST", "HEAD")),
        send_headers=table.get("send_headers", ("authorization", "cookie"), _header_names),
        copy_headers=table.get("copy_headers", (), _header_names),
        cache=table.get("cache", 0.0, parse_duration),
        cache_size=table.get("cache_size", 10000, _positive_int),
        timeout=table.get("timeout", 5.0, _positive_duration),
    )
    other = "forward" if kind == "jwt" else "jwt"
    for name in sorted(_AUTH_KEYS[other] & table._data.keys()):
        table._reader.problem(table.key(name), f'only with type = "{other}"')
    if kind == "jwt" and ("keys" in table._data) == ("jwks_url" in table._data):
        table._reader.problem(table._path, "give keys (a PEM or JWKS file) or jwks_url, not both")
    if kind == "forward" and "url" not in table._data:
        table._reader.problem(table.key("url"), 'required with type = "forward"')
    table.done()
    return spec


def _key_file(reader: _Reader) -> Callable[[object], str]:
    """A readable JWKS file (a JSON object with a ``keys`` list) or PEM file of public keys or
    certificates; the keys themselves are read by wsgate/core/auth.py."""
    readable = _file(reader)

    def convert(value: object) -> str:
        path = readable(value)
        with open(path, "rb") as f:
            data = f.read()
        if data.lstrip().startswith(b"{"):
            try:
                keys = json.loads(data).get("keys")
            except (ValueError, AttributeError):
                keys = None
            if not isinstance(keys, list):
                raise ValueError(f"{path}: not a JWKS file (a JSON object with a keys list)")
        elif (
            b"-----BEGIN PUBLIC KEY-----" not in data and b"-----BEGIN CERTIFICATE-----" not in data
        ):
            raise ValueError(f"{path}: neither a JWKS file nor PEM public keys or certificates")
        return path

    return convert


def _quotable(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[ -~]*", value) or '"' in value:
        raise ValueError("expected printable ASCII text without double quotes")
    return value


def _token_sources(value: object) -> tuple[str, ...]:
    sources = (value,) if isinstance(value, str) else _strings(value)
    for source in sources:
        kind, _, name = source.partition(":")
        if not (source == "header" or (kind in ("cookie", "query") and name.strip())):
            raise ValueError(f'{source!r} is not "header", "cookie:NAME" or "query:NAME"')
    if not sources:
        raise ValueError("name at least one place to look for the token")
    return sources


def _http_url(value: object) -> str:
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


def _algorithms(value: object) -> tuple[str, ...]:
    names = _strings(value)
    for name in names:
        if name not in JWT_ALGORITHMS:
            raise ValueError(f"{name!r} is not one of {', '.join(JWT_ALGORITHMS)}")
    if not names:
        raise ValueError("allow at least one algorithm")
    return names


def _one_or_more(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else _strings(value)


def _header_names(value: object) -> tuple[str, ...]:
    names = _strings(value)
    for name in names:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
    return tuple(name.lower() for name in names)


def _claim_headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('expected a table of claim = "Header-Name"')
    for header in value.values():
        if not _HEADER_NAME.match(header):
            raise ValueError(f"{header!r} is not an HTTP header name")
    return tuple(sorted(value.items()))


def _connect_hook(table: _Table) -> ConnectHook:
    spec = ConnectHook(
        url=table.get("url", "", _http_url, required=True),
        timeout=table.get("timeout", 2.0, _positive_duration),
        headers=table.get("headers", (), _header_names),
        query=table.get("query", False, _typed(bool, "true or false")),
        on_failure=table.get("on_failure", "deny", _choice("deny", "allow")),
    )
    table.done()
    return spec


def _disconnect_hook(table: _Table) -> DisconnectHook:
    spec = DisconnectHook(
        url=table.get("url", "", _http_url, required=True),
        timeout=table.get("timeout", 5.0, _positive_duration),
        queue_size=table.get("queue_size", 1000, _positive_int),
        concurrency=table.get("concurrency", 4, _positive_int),
        tries=table.get("tries", 4, _positive_int),
        backoff=table.get("backoff", 1.0, _positive_duration),
    )
    table.done()
    return spec


def _limits(table: _Table) -> Limits:
    limits = Limits(
        max_sessions=table.get("max_sessions", 0, _non_negative_int),
        max_sessions_per_ip=table.get("max_sessions_per_ip", 0, _non_negative_int),
        handshake_rate=table.get("handshake_rate", 0.0, _non_negative),
        handshake_burst=table.get("handshake_burst", 20, _positive_int),
        handshake_timeout=table.get("handshake_timeout", 10.0, parse_duration),
        close_timeout=table.get("close_timeout", 5.0, _positive_duration),
        send_timeout=table.get("send_timeout", 60.0, parse_duration),
        max_header_size=table.get("max_header_size", 16 * 1024, parse_size),
        max_headers=table.get("max_headers", 100, _positive_int),
        trusted_proxies=table.get("trusted_proxies", (), _networks),
        shutdown_grace=table.get("shutdown_grace", 10.0, parse_duration),
        shutdown_spread=table.get("shutdown_spread", 0.0, parse_duration),
        retry_after=table.get("retry_after", 5, _positive_int),
    )
    table.done()
    return limits


def _log(table: _Table) -> LogSpec:
    spec = LogSpec(
        level=table.get("level", "info", _choice(*LOG_LEVELS)),
        format=table.get("format", "text", _choice(*LOG_FORMATS)),
        redact_query=table.get("redact_query", True, _typed(bool, "true or false")),
        redact_query_keep=table.get("redact_query_keep", (), _strings),
    )
    table.done()
    return spec


def _redis_url(value: object) -> tuple[str, int, int]:
    """``redis://host[:port][/db]`` -> (host, port, db); no user or password in the URL."""
    if not isinstance(value, str):
        raise ValueError("expected a URL such as redis://127.0.0.1:6379/0")
    parts = urlsplit(value)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"{value!r}: not a redis://host:port/db URL")
    if parts.username or parts.password:
        raise ValueError("no credentials in the URL: give the password in password_file")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: no query or fragment allowed")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{value!r}: bad port") from None
    db = parts.path.strip("/") or "0"
    if not db.isdigit() or int(db) > 15:
        raise ValueError(f"{value!r}: the database is a number from 0 to 15")
    return parts.hostname, port, int(db)


_GATE_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def _gate_name(value: object) -> str:
    if not isinstance(value, str) or not _GATE_NAME.match(value):
        raise ValueError("expected 1 to 100 characters of A-Z a-z 0-9 . _ : -")
    return value


def _key_prefix(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable():
        raise ValueError("expected 1 to 64 printable characters, e.g. wsgate:")
    if any(c in value for c in " *?[]"):
        raise ValueError("no spaces or glob characters (* ? [ ]) in the prefix")
    return value


def _cluster(table: _Table) -> ClusterSpec:
    host, port, db = table.get("redis", ("", 0, 0), _redis_url, required=True)
    spec = ClusterSpec(
        host=host,
        port=port,
        db=db,
        password_file=table.get("password_file", None, _file(table._reader)),
        name=table.get("name", None, _gate_name),
        prefix=table.get("prefix", "wsgate:", _key_prefix),
        heartbeat=table.get("heartbeat", 2.0, _positive_duration),
        ttl=table.get("ttl", 10.0, _positive_duration),
        sync_interval=table.get("sync_interval", 0.5, _positive_duration),
        request_timeout=table.get("request_timeout", 5.0, _positive_duration),
        fleet_limits=table.get("fleet_limits", False, _typed(bool, "true or false")),
    )
    if spec.ttl < 2 * spec.heartbeat:
        table._reader.problem(
            table.key("ttl"), "at least twice the heartbeat, or live gates' keys expire"
        )
    table.done()
    return spec


def parse(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> Config:
    """
    Validate a parsed TOML document.  Raises :class:`ConfigError` listing every problem.
    Relative file paths (certificates, keys) are relative to ``base_dir``, by default the
    directory of ``source``.
    """
    reader = _Reader(source, base_dir)
    top = _Table(reader, "", dict(data))
    listeners = [_listener(t) for t in top.tables("listen")]
    redirects = tuple(_redirect(t) for t in top.tables("redirect"))
    if not listeners:
        reader.problem("listen", "at least one [[listen]] table is required")
    upstreams = {name: _upstream(name, t) for name, t in top.subtables("upstream")}
    routes = tuple(_route(t, upstreams) for t in top.tables("route"))
    if not routes:
        reader.problem("route", "at least one [[route]] table is required")
    limits_table = top.subtable("limits")
    limits = _limits(limits_table) if limits_table is not None else Limits()
    console_table = top.subtable("console")
    console = _console(console_table) if console_table is not None else None
    admin_table = top.subtable("admin")
    admin = _admin(admin_table) if admin_table is not None else None
    control_table = top.subtable("control")
    control = _control(control_table) if control_table is not None else None
    log_table = top.subtable("log")
    log = _log(log_table) if log_table is not None else LogSpec()
    cluster_table = top.subtable("cluster")
    cluster = _cluster(cluster_table) if cluster_table is not None else None
    log = _with_token_parameters(log, routes)
    workers = top.get("workers", 1, _workers)
    log_session_opened = top.get("log_session_opened", False, _typed(bool, "true or false"))
    if workers > 1 and cluster is not None:
        reader.problem(
            "cluster",
            "not available with workers > 1 yet: run several single-process gates in the fleet",
        )
    if workers > 1:
        for i, listener in enumerate(listeners):
            kind = listener.endpoint.lower().removeprefix("haproxy:").split(":", 1)[0]
            if kind not in _SHAREABLE:
                reader.problem(
                    f"listen[{i}].endpoint",
                    f"with workers > 1 a listener is tcp:, tcp6: or unix: ({kind}: cannot be shared)",
                )
    top.done()
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        source=source,
        listeners=tuple(listeners),
        routes=routes,
        upstreams=upstreams,
        redirects=redirects,
        limits=limits,
        console=console,
        admin=admin,
        control=control,
        workers=workers,
        log_session_opened=log_session_opened,
        log=log,
        cluster=cluster,
    )


def _with_token_parameters(log: LogSpec, routes: tuple[Route, ...]) -> LogSpec:
    """``log`` hiding every query parameter a route takes its credential from."""
    names = sorted(
        {
            source.partition(":")[2]
            for route in routes
            if route.auth is not None
            for source in route.auth.token
            if source.startswith("query:")
        }
    )
    return dataclasses.replace(log, redact_always=tuple(names)) if names else log


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

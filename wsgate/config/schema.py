"""
The config schema: frozen dataclasses, one per table of the file, and the value sets keys may
take.  Each default is declared here and only here (the reader takes it from the field with
:meth:`wsgate.config.table.Table.field`; ``tests/config/test_schema.py`` fails on a second copy).
Values are already converted ("30s" -> 30.0, "16MiB" -> int) and checked when a record is made
by the reader; this module reads no file, converts nothing and imports nothing else of wsgate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Network, IPv6Network
from urllib.parse import urlsplit

__all__ = [
    "AUTH_TYPES",
    "BALANCE_METHODS",
    "DEFAULT_CIPHERS",
    "HEALTH_TYPES",
    "JWT_ALGORITHMS",
    "LISTEN_BACKLOG",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "TLS_VERSIONS",
    "AdminSpec",
    "AuthSpec",
    "CertificateFiles",
    "ClusterSpec",
    "Config",
    "ConnectHook",
    "ConsoleSpec",
    "ControlSpec",
    "DisconnectHook",
    "HealthSpec",
    "Limits",
    "Listener",
    "ListenerTLS",
    "LogSpec",
    "Redirect",
    "Route",
    "ServerSpec",
    "UpstreamSpec",
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


LISTEN_BACKLOG = 1024


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

    # Read for every backend connection: the URL is parsed once.
    @cached_property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @cached_property
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

    path: str = "/"
    # Required; keyword-only so that ``path``, first in the record, can keep its default.
    upstream: str = field(kw_only=True)
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
    """
    The admin HTTP listener (``[admin]``): ``/metrics``, ``/status.json`` and the status page;
    with ``token_file``, every path but ``/ready`` asks for that bearer token.
    """

    endpoint: str
    token_file: str | None = None


@dataclass(frozen=True)
class ControlSpec:
    """
    The control API (``[control]``): JSON over HTTP on a Unix socket (by default
    :func:`default_control_endpoint`) or a loopback TCP port, which needs ``token_file``: a file
    holding the bearer token callers must send (on a Unix socket too, when given).
    """

    endpoint: str
    token_file: str | None = None


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

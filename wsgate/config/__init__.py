"""
Configuration: TOML in, frozen dataclasses out.

This package owns the config schema, its defaults, unit conversion ("30s" -> 30.0, "16MiB" -> int)
and validation.  Every problem is reported as ``FILE: key.path: reason`` and all problems are
reported at once, like ``nginx -t``.  It must not build Twisted objects: endpoint strings are only
checked for syntax here (``service.py`` turns them into listeners); and it imports nothing else of
wsgate (it is the bottom layer every other one reads).

- ``schema.py``: the frozen dataclasses, each default declared once, and the value sets;
- ``table.py``: reading one table: typed look-ups, defaults taken from the schema, problems
  collected with file, key and reason;
- ``units.py`` (durations, sizes, counts, choices) and ``syntax.py`` (endpoint strings, URLs,
  header names, networks): single values;
- ``files.py``: files a config names (certificates and keys, host keys, tokens, JWT keys);
- one module per group of tables: ``listeners.py``, ``upstreams.py``, ``routes.py``,
  ``hooks.py``, ``auth.py``, ``limits.py``, ``ops.py`` (console, admin, control, log),
  ``cluster.py``;
- ``reader.py``: the whole document (``load``, ``parse``, ``from_arguments``).

Import from ``wsgate.config``; the modules' layout may change.
"""

from wsgate.config.files import certificate_problems, read_token
from wsgate.config.ops import default_control_endpoint
from wsgate.config.reader import from_arguments, load, parse
from wsgate.config.schema import (
    AUTH_TYPES,
    BALANCE_METHODS,
    DEFAULT_CIPHERS,
    HEALTH_TYPES,
    JWT_ALGORITHMS,
    LISTEN_BACKLOG,
    LOG_FORMATS,
    LOG_LEVELS,
    TLS_VERSIONS,
    AdminSpec,
    AuthSpec,
    CertificateFiles,
    ClusterSpec,
    Config,
    ConnectHook,
    ConsoleSpec,
    ControlSpec,
    DisconnectHook,
    HealthSpec,
    Limits,
    Listener,
    ListenerTLS,
    LogSpec,
    Redirect,
    Route,
    ServerSpec,
    UpstreamSpec,
)
from wsgate.config.syntax import check_backend_url, check_endpoint
from wsgate.config.table import ConfigError
from wsgate.config.units import parse_duration, parse_size
from wsgate.config.upstreams import server_spec

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
    "ConfigError",
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
    "certificate_problems",
    "check_backend_url",
    "check_endpoint",
    "default_control_endpoint",
    "from_arguments",
    "load",
    "parse",
    "parse_duration",
    "parse_size",
    "read_token",
    "server_spec",
]

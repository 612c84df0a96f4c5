"""
The ``[cluster]`` table: the Redis a fleet of gates shares (``redis://host:port/db``, the password
file), this gate's name, the key prefix and the fleet's timings.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from wsgate.config.files import readable_file
from wsgate.config.schema import ClusterSpec
from wsgate.config.table import Table, default_of
from wsgate.config.units import positive_duration, typed

__all__ = ["read_cluster"]


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
        port = parts.port or default_of(ClusterSpec, "port")
    except ValueError:
        raise ValueError(f"{value!r}: bad port") from None
    db = parts.path.strip("/") or str(default_of(ClusterSpec, "db"))
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


def read_cluster(table: Table) -> ClusterSpec:
    """The ``[cluster]`` table."""
    host, port, db = table.required("redis", _redis_url, ("", 0, 0))
    spec = ClusterSpec(
        host=host,
        port=port,
        db=db,
        password_file=table.field(ClusterSpec, "password_file", readable_file(table.reader)),
        name=table.field(ClusterSpec, "name", _gate_name),
        prefix=table.field(ClusterSpec, "prefix", _key_prefix),
        heartbeat=table.field(ClusterSpec, "heartbeat", positive_duration),
        ttl=table.field(ClusterSpec, "ttl", positive_duration),
        sync_interval=table.field(ClusterSpec, "sync_interval", positive_duration),
        request_timeout=table.field(ClusterSpec, "request_timeout", positive_duration),
        fleet_limits=table.field(ClusterSpec, "fleet_limits", typed(bool, "true or false")),
    )
    if spec.ttl < 2 * spec.heartbeat:
        table.reader.problem(
            table.key("ttl"), "at least twice the heartbeat, or live gates' keys expire"
        )
    table.done()
    return spec

"""
The ``[upstream.NAME]`` tables: servers (URL, weight, backend TLS files), balancing, timeouts and
tries, passive and active health, DNS resolution, automatic rebalance; and :func:`server_spec`, a
server added at run time, checked like one read from the file.
"""

from __future__ import annotations

from wsgate.config.files import certificate_problems, read_certificates, readable_file
from wsgate.config.schema import BALANCE_METHODS, HEALTH_TYPES, HealthSpec, ServerSpec, UpstreamSpec
from wsgate.config.syntax import check_backend_url, route_path
from wsgate.config.table import Table
from wsgate.config.units import (
    choice,
    count,
    parse_duration,
    positive_duration,
    positive_int,
    typed,
)

__all__ = ["read_upstream", "server_spec"]


def server_spec(url: str, weight: int, backup: bool) -> ServerSpec:
    """A server added at run time (the control API's ``add``); a ValueError when it is bad."""
    return ServerSpec(
        url=check_backend_url(url), weight=positive_int(weight), backup=backup is True
    )


def _server(table: Table) -> ServerSpec:
    path = readable_file(table.reader)
    spec = ServerSpec(
        url=table.required("url", check_backend_url, ""),
        weight=table.field(ServerSpec, "weight", positive_int),
        ca=table.field(ServerSpec, "ca", path),
        verify=table.field(ServerSpec, "verify", typed(bool, "true or false")),
        client_cert=table.field(ServerSpec, "client_cert", path),
        client_key=table.field(ServerSpec, "client_key", path),
        max_conns=table.field(ServerSpec, "max_conns", count),
        backup=table.field(ServerSpec, "backup", typed(bool, "true or false")),
        resolve=table.field(ServerSpec, "resolve", typed(bool, "true or false")),
    )
    if spec.resolve and spec.secure:
        table.reader.problem(
            table.key("resolve"),
            "only for ws:// servers (a wss:// certificate is checked against the URL's host name)",
        )
    if spec.url and not spec.secure:
        for name in ("ca", "verify", "client_cert", "client_key"):
            if table.given(name):
                table.reader.problem(table.key(name), "only for wss:// servers")
    if spec.ca is not None:
        try:
            read_certificates(spec.ca)
        except ValueError as e:
            table.reader.problem(table.key("ca"), str(e))
    if spec.ca is not None and not spec.verify:
        table.reader.problem(table.key("ca"), "a ca bundle is pointless with verify = false")
    if (spec.client_cert is None) != (spec.client_key is None):
        if table.given("client_cert") or table.given("client_key"):
            table.reader.problem(
                table.key("client_key" if spec.client_key is None else "client_cert"),
                "client_cert and client_key go together",
            )
    elif spec.client_cert is not None and spec.client_key is not None:
        for name, reason in certificate_problems(spec.client_cert, spec.client_key):
            table.reader.problem(table.key(f"client_{name}"), reason)
    table.done()
    return spec


def read_upstream(name: str, table: Table) -> UpstreamSpec:
    """The ``[upstream.NAME]`` table of upstream ``name``."""
    servers = tuple(_server(t) for t in table.tables("servers"))
    if not servers:
        table.reader.problem(table.key("servers"), "an upstream needs at least one server")
    spec = UpstreamSpec(
        name=name,
        servers=servers,
        balance=table.field(UpstreamSpec, "balance", choice(*BALANCE_METHODS)),
        connect_timeout=table.field(UpstreamSpec, "connect_timeout", parse_duration),
        handshake_timeout=table.field(UpstreamSpec, "handshake_timeout", parse_duration),
        tries=table.field(UpstreamSpec, "tries", positive_int),
        try_timeout=table.field(UpstreamSpec, "try_timeout", parse_duration),
        key=table.field(UpstreamSpec, "key", _hash_key),
        max_fails=table.field(UpstreamSpec, "max_fails", count),
        fail_timeout=table.field(UpstreamSpec, "fail_timeout", parse_duration),
        health=_health(health) if (health := table.subtable("health")) is not None else None,
        resolve_interval=table.field(UpstreamSpec, "resolve_interval", positive_duration),
        rebalance_threshold=table.field(UpstreamSpec, "rebalance_threshold", _threshold),
        rebalance_interval=table.field(UpstreamSpec, "rebalance_interval", positive_duration),
        rebalance_window=table.field(UpstreamSpec, "rebalance_window", parse_duration),
    )
    if table.given("key") and spec.balance != "hash":
        table.reader.problem(table.key("key"), 'only with balance = "hash"')
    if servers and all(s.backup for s in servers):
        table.reader.problem(table.key("servers"), "every server is a backup: mark one primary")
    table.done()
    return spec


def _health(table: Table) -> HealthSpec:
    spec = HealthSpec(
        type=table.field(HealthSpec, "type", choice(*HEALTH_TYPES)),
        path=table.field(HealthSpec, "path", route_path),
        interval=table.field(HealthSpec, "interval", positive_duration),
        timeout=table.field(HealthSpec, "timeout", positive_duration),
        rise=table.field(HealthSpec, "rise", positive_int),
        fall=table.field(HealthSpec, "fall", positive_int),
    )
    if table.given("path") and spec.type == "tcp":
        table.reader.problem(table.key("path"), 'not used by type = "tcp"')
    table.done()
    return spec


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

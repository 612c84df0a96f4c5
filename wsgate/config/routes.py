"""
The ``[[route]]`` tables: which requests go to which upstream and the session options for them
(timeouts, sizes, rates, origins, mode, compression, plain HTTP, session age), with the route's
webhooks (:mod:`wsgate.config.hooks`) and authentication (:mod:`wsgate.config.auth`).
"""

from __future__ import annotations

from collections.abc import Mapping

from wsgate.config.auth import read_auth
from wsgate.config.hooks import read_connect_hook, read_disconnect_hook
from wsgate.config.schema import Route, UpstreamSpec
from wsgate.config.syntax import route_path
from wsgate.config.table import Table
from wsgate.config.units import choice, non_negative, parse_duration, parse_size, strings, typed

__all__ = ["read_route"]


def read_route(table: Table, upstreams: Mapping[str, UpstreamSpec]) -> Route:
    """One ``[[route]]`` table; its ``upstream`` must be one of ``upstreams``."""
    upstream = table.required("upstream", typed(str, "an upstream name"), "")
    if upstream and upstream not in upstreams:
        table.reader.problem(table.key("upstream"), f"no upstream named {upstream!r}")
    route = Route(
        path=table.field(Route, "path", route_path),
        upstream=upstream,
        host=table.field(Route, "host", typed(str, "a host name")),
        idle_timeout=table.field(Route, "idle_timeout", parse_duration),
        ping_interval=table.field(Route, "ping_interval", parse_duration),
        ping_timeout=table.field(Route, "ping_timeout", parse_duration),
        max_message_size=table.field(Route, "max_message_size", parse_size),
        max_frame_size=table.field(Route, "max_frame_size", parse_size),
        mode=table.field(Route, "mode", choice("message", "tunnel")),
        compression=table.field(Route, "compression", choice("pass", "off")),
        max_messages_per_second=table.field(Route, "max_messages_per_second", non_negative),
        max_bytes_per_second=table.field(Route, "max_bytes_per_second", parse_size),
        throttle=table.field(Route, "throttle", typed(bool, "true or false")),
        allowed_origins=table.field(Route, "allowed_origins", strings),
        required_subprotocol=table.field(
            Route, "required_subprotocol", typed(str, "a subprotocol name")
        ),
        http=table.field(Route, "http", typed(bool, "true or false")),
        on_connect=read_connect_hook(t)
        if (t := table.subtable("on_connect")) is not None
        else None,
        on_disconnect=(
            read_disconnect_hook(t) if (t := table.subtable("on_disconnect")) is not None else None
        ),
        auth=read_auth(auth) if (auth := table.subtable("auth")) is not None else None,
        max_session_age=table.field(Route, "max_session_age", parse_duration),
        max_session_age_spread=table.field(Route, "max_session_age_spread", parse_duration),
    )
    if table.given("max_session_age_spread") and not route.max_session_age:
        table.reader.problem(table.key("max_session_age_spread"), "only with max_session_age")
    table.done()
    return route

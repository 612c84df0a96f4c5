"""
A route's lifecycle webhooks: ``[route.on_connect]`` (the call that allows or denies a handshake)
and ``[route.on_disconnect]`` (where each finished session's audit record goes).
"""

from __future__ import annotations

from wsgate.config.schema import ConnectHook, DisconnectHook
from wsgate.config.syntax import header_names, http_url
from wsgate.config.table import Table
from wsgate.config.units import choice, positive_duration, positive_int, typed

__all__ = ["read_connect_hook", "read_disconnect_hook"]


def read_connect_hook(table: Table) -> ConnectHook:
    """A route's ``on_connect`` table."""
    spec = ConnectHook(
        url=table.required("url", http_url, ""),
        timeout=table.field(ConnectHook, "timeout", positive_duration),
        headers=table.field(ConnectHook, "headers", header_names),
        query=table.field(ConnectHook, "query", typed(bool, "true or false")),
        on_failure=table.field(ConnectHook, "on_failure", choice("deny", "allow")),
    )
    table.done()
    return spec


def read_disconnect_hook(table: Table) -> DisconnectHook:
    """A route's ``on_disconnect`` table."""
    spec = DisconnectHook(
        url=table.required("url", http_url, ""),
        timeout=table.field(DisconnectHook, "timeout", positive_duration),
        queue_size=table.field(DisconnectHook, "queue_size", positive_int),
        concurrency=table.field(DisconnectHook, "concurrency", positive_int),
        tries=table.field(DisconnectHook, "tries", positive_int),
        backoff=table.field(DisconnectHook, "backoff", positive_duration),
    )
    table.done()
    return spec

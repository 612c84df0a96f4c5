"""The ``[limits]`` table: gateway-wide limits and lifecycle settings."""

from __future__ import annotations

from wsgate.config.schema import Limits
from wsgate.config.syntax import networks
from wsgate.config.table import Table
from wsgate.config.units import (
    count,
    non_negative,
    parse_duration,
    parse_size,
    positive_duration,
    positive_int,
)

__all__ = ["read_limits"]


def read_limits(table: Table) -> Limits:
    """The ``[limits]`` table."""
    limits = Limits(
        max_sessions=table.field(Limits, "max_sessions", count),
        max_sessions_per_ip=table.field(Limits, "max_sessions_per_ip", count),
        handshake_rate=table.field(Limits, "handshake_rate", non_negative),
        handshake_burst=table.field(Limits, "handshake_burst", positive_int),
        handshake_timeout=table.field(Limits, "handshake_timeout", parse_duration),
        close_timeout=table.field(Limits, "close_timeout", positive_duration),
        send_timeout=table.field(Limits, "send_timeout", parse_duration),
        max_header_size=table.field(Limits, "max_header_size", parse_size),
        max_headers=table.field(Limits, "max_headers", positive_int),
        trusted_proxies=table.field(Limits, "trusted_proxies", networks),
        shutdown_grace=table.field(Limits, "shutdown_grace", parse_duration),
        shutdown_spread=table.field(Limits, "shutdown_spread", parse_duration),
        retry_after=table.field(Limits, "retry_after", positive_int),
    )
    table.done()
    return limits

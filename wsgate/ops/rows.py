"""
The rows every operations surface shows: one live session (:func:`session_row`, and everything
about it, :func:`session_detail`), one server of an upstream (:func:`server_row`), the live totals'
names, and the session ids the workers' parent shows (``"2:17"``).

Owns the shape of a row, so that the console, ``/status.json``, ``/metrics`` and the control API
always agree.  Rows show what :mod:`wsgate.core.redact` lets through (redacted query strings and
secret headers), never the raw request.  Must not read the gate as a whole (that is
:mod:`wsgate.ops.view`, which builds its rows here) or change anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsgate.core.redact import redact_headers
from wsgate.dataplane.auth import auth_detail

if TYPE_CHECKING:
    from wsgate.dataplane.session import Session

__all__ = [
    "TOTALS",
    "qualified_id",
    "server_row",
    "session_detail",
    "session_row",
    "split_id",
]

# The live totals of a gate: messages and bytes each way.
TOTALS = ("messages_up", "bytes_up", "messages_down", "bytes_down")


def session_row(session: Session) -> dict[str, Any]:
    """One live session: who, where to, how old, how busy."""
    row = session.describe()
    upstream = getattr(session, "upstream", None)
    return {
        "id": row["session_id"],
        "client": f"{row['client']}:{session.client_port}"
        if session.client_port
        else row["client"],
        "route": row["route"],
        "upstream": upstream.name if upstream is not None else None,
        "server": row["server"],
        "path": row["path"],
        "request_id": row["request_id"],
        "age": row["duration"],
        "idle": row["idle"],
        "messages_up": row["messages_up"],
        "bytes_up": row["bytes_up"],
        "messages_down": row["messages_down"],
        "bytes_down": row["bytes_down"],
        "subprotocol": row["subprotocol"],
        "tls": row["tls"],
        "state": str(session.state),
    }


def session_detail(session: Session) -> dict[str, Any]:
    """
    Everything known about one session: its row, the request, the forwarded headers, ping RTTs.
    Credentials and the handshake key in the headers are shown as ``<redacted>``.
    """
    detail = session_row(session)
    detail.update(
        started=session.started,
        connect_time=(session.opened_at - session.started)
        if session.opened_at is not None
        else None,
        host=session.request.host,
        request_headers=redact_headers(session.request.headers),
        forwarded_headers=redact_headers(session.forwarded_headers()),
        ping_interval=getattr(getattr(session, "route", None), "ping_interval", 0.0),
        client_ping_rtt=getattr(session.client, "ping_rtt", None),
        backend_ping_rtt=getattr(session.backend, "ping_rtt", None),
        client_close=session.client_close,
        backend_close=session.backend_close,
        closed_by=session.closed_by,
    )
    detail.update(auth_detail(session, session.gateway.clock.seconds()))
    return detail


def server_row(upstream: str, server: Any, now: float) -> dict[str, Any]:
    """One server of one upstream: state, weight, load, health."""
    last = getattr(server, "last_check", None)
    return {
        "upstream": upstream,
        "server": server.url,
        "state": getattr(server, "state", "up"),
        "backup": bool(getattr(server, "backup", False)),
        "weight": server.weight,
        "active": server.active,
        "sessions_total": server.sessions_total,
        "fails": server.fails,
        "last_check": None if last is None else now - last,
    }


# -- session ids with workers ---------------------------------------------------------------


def qualified_id(worker: int, session_id: int) -> str:
    """Worker 2's session 17 is ``"2:17"`` in the parent."""
    return f"{worker}:{session_id}"


def split_id(text: object) -> tuple[int, int]:
    """``"2:17"`` -> (2, 17); a LookupError for anything else."""
    worker, sep, number = str(text).partition(":")
    if not sep or not worker.isdigit() or not number.isdigit():
        raise LookupError(
            f"no live session {text!r}: with workers, session ids are WORKER:ID, e.g. '2:17'"
        )
    return int(worker), int(number)

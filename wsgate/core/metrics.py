"""
Metrics: histograms the Gateway fills, and the Prometheus text exposition of a status snapshot.

Owns the metric names, their help texts and the text format (version 0.0.4: ``# HELP``, ``# TYPE``,
one ``name{label="value"} number`` line per sample, label values escaped).  Must not keep state of
its own: histograms live on the Gateway, figures come from :mod:`wsgate.ops.status`.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CONNECT_BUCKETS",
    "DURATION_BUCKETS",
    "Histogram",
    "render",
]

# Upper bounds in seconds.  Backend connect time: loopback is ~1ms, a far region ~300ms, a timeout 5s+.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Session duration: from a bounce (under a second) to a long-lived dashboard (a day).
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class Histogram:
    """Counts of observations at or below each bound (cumulative, as Prometheus wants), sum, count."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        if math.isnan(value):
            return "NaN"
        return repr(value)
    return str(value)


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.family(name, "histogram", help_text)
        for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
            self.sample(f"{name}_bucket", count, le=_number(float(bound)))
        self.sample(f"{name}_bucket", histogram.count, le="+Inf")
        self.sample(f"{name}_sum", histogram.sum)
        self.sample(f"{name}_count", histogram.count)


SERVER_STATES = ("up", "down", "draining")


def render(
    snapshot: dict[str, Any],
    closed: Iterable[tuple[tuple[str, str, str, str], int]],
    connect_time: Histogram,
    session_duration: Histogram,
    version: str,
) -> str:
    """
    The Prometheus text exposition of a :func:`wsgate.ops.status.snapshot` (without sessions), the
    closed-session counts by ``(route, upstream, server, code)`` and the two histograms.
    """
    out = _Exposition()
    stats = snapshot["stats"]
    out.family("wsgate_build_info", "gauge", "Version of wsgate and of what it runs on.")
    versions = stats["versions"]
    out.sample(
        "wsgate_build_info",
        1,
        version=version,
        python=platform.python_version(),
        twisted=versions["twisted"],
        autobahn=versions["autobahn"],
    )
    out.family("wsgate_sessions_active", "gauge", "Sessions open right now.")
    out.sample("wsgate_sessions_active", stats["sessions_active"])
    out.family(
        "wsgate_sessions_total",
        "counter",
        "Finished sessions by route, upstream, server and the close code the client saw "
        "(1005: empty Close, 1006: dropped without a Close).",
    )
    for (route, upstream, server, code), count in sorted(closed):
        out.sample(
            "wsgate_sessions_total", count, route=route, upstream=upstream, server=server, code=code
        )
    out.family("wsgate_sessions_opened_total", "counter", "Sessions opened (both handshakes done).")
    out.sample("wsgate_sessions_opened_total", stats["sessions_opened"])
    out.family(
        "wsgate_handshakes_total",
        "counter",
        "Client handshakes by result: ok, or the HTTP status the client was refused with.",
    )
    for result, count in sorted(stats["handshakes"].items()):
        out.sample("wsgate_handshakes_total", count, result=result)
    out.family(
        "wsgate_messages_total",
        "counter",
        "Messages relayed; direction up is client to backend, down is backend to client.",
    )
    for direction in ("up", "down"):
        out.sample("wsgate_messages_total", stats[f"messages_{direction}"], direction=direction)
    out.family("wsgate_bytes_total", "counter", "Payload bytes relayed, by direction.")
    for direction in ("up", "down"):
        out.sample("wsgate_bytes_total", stats[f"bytes_{direction}"], direction=direction)
    out.histogram(
        "wsgate_backend_connect_seconds",
        "Time from the client's upgrade request to the backend's 101 (all tries).",
        connect_time,
    )
    out.histogram(
        "wsgate_session_duration_seconds", "Duration of finished sessions.", session_duration
    )
    upstreams = snapshot["upstreams"]
    out.family(
        "wsgate_server_state",
        "gauge",
        "1 for the state each backend server is in (up, down, draining), else 0.",
    )
    for row in upstreams:
        for state in SERVER_STATES:
            out.sample(
                "wsgate_server_state",
                1 if row["state"] == state else 0,
                upstream=row["upstream"],
                server=row["server"],
                state=state,
            )
    for name, key, help_text in (
        ("wsgate_server_active_sessions", "active", "Sessions open to each backend server."),
        ("wsgate_server_weight", "weight", "Balancing weight of each backend server."),
        ("wsgate_server_fails", "fails", "Recent failed attempts counted against each server."),
        ("wsgate_server_backup", "backup", "1 for a backup server."),
    ):
        out.family(name, "gauge", help_text)
        for row in upstreams:
            out.sample(name, int(row[key]), upstream=row["upstream"], server=row["server"])
    out.family(
        "wsgate_server_sessions_total", "counter", "Sessions ever opened to each backend server."
    )
    for row in upstreams:
        out.sample(
            "wsgate_server_sessions_total",
            row["sessions_total"],
            upstream=row["upstream"],
            server=row["server"],
        )
    return "\n".join(out.lines) + "\n"


def render_cluster(figures: dict[str, int]) -> str:
    """The fleet's figures (``Cluster.figures()``) in the Prometheus text format."""
    out = _Exposition()
    out.family("wsgate_cluster_up", "gauge", "1 while the gate is joined to its fleet's Redis.")
    out.sample("wsgate_cluster_up", figures["up"])
    out.family("wsgate_cluster_joins_total", "counter", "Times the gate (re)joined the fleet.")
    out.sample("wsgate_cluster_joins_total", figures["joins"])
    out.family(
        "wsgate_cluster_requests_total",
        "counter",
        "Requests (kick, push, drain) this gate sent to others, received, and that failed.",
    )
    for kind in ("sent", "received", "failed"):
        out.sample("wsgate_cluster_requests_total", figures[f"requests_{kind}"], kind=kind)
    out.family("wsgate_cluster_redis_errors_total", "counter", "Redis commands that failed.")
    out.sample("wsgate_cluster_redis_errors_total", figures["redis_errors"])
    return "\n".join(out.lines) + "\n"

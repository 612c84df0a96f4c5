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
    "BACKEND_FAILURE_REASONS",
    "CONNECT_BUCKETS",
    "DURATION_BUCKETS",
    "Histogram",
    "Reloads",
    "render",
    "render_operations",
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


class Reloads:
    """
    Results of config reloads (SIGHUP, console, control API): counts by result, whether the last
    one succeeded and when the config in force was loaded (``started``: the gate's start).
    """

    RESULTS = ("ok", "failed")

    def __init__(self, started: float) -> None:
        self.counts = dict.fromkeys(self.RESULTS, 0)
        self.last_ok = True
        self.last_success = started

    def record(self, ok: bool, now: float) -> None:
        self.counts["ok" if ok else "failed"] += 1
        self.last_ok = ok
        if ok:
            self.last_success = now


# Why a backend attempt failed: the bounded label set of wsgate_backend_failures_total.
BACKEND_FAILURE_REASONS = (
    "connect_refused",  # TCP connection refused
    "connect_timeout",  # no TCP (or TLS) connection within connect_timeout
    "dns",  # the server's host name did not resolve
    "tls",  # the TLS handshake failed (untrusted certificate, wrong name, ...)
    "connect_error",  # any other connect failure (unreachable, reset, ...)
    "handshake_timeout",  # connected, but no 101 within the upstream's handshake_timeout
    "http_status",  # the backend answered with an HTTP status other than 101
    "handshake_invalid",  # a 101 that is not a valid WebSocket answer, or unparsable
    "handshake_lost",  # the connection ended during the WebSocket handshake
    "try_timeout",  # the route's try_timeout passed while this attempt was under way
)


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


def _webhooks(out: _Exposition, counts: dict[str, int]) -> None:
    """The lifecycle webhooks' counters (``connect.allow``, ``disconnect.dropped``, ...)."""
    out.family(
        "wsgate_webhook_calls_total",
        "counter",
        "Webhook calls by hook and result: connect allow, deny, failed_open, failed_closed, "
        "cancelled; disconnect sent, failed (a try that failed; it may be retried).",
    )
    for key, count in sorted(counts.items()):
        hook, _, result = key.partition(".")
        if result != "dropped":
            out.sample("wsgate_webhook_calls_total", count, hook=hook, result=result)
    out.family(
        "wsgate_webhook_dropped_total",
        "counter",
        "on_disconnect records dropped: queue full, every try failed, or the gate stopped.",
    )
    out.sample(
        "wsgate_webhook_dropped_total", counts.get("disconnect.dropped", 0), hook="disconnect"
    )


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
    _webhooks(out, stats.get("webhooks", {}))
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


def render_operations(
    reloads: Reloads,
    backend_failures: Iterable[tuple[tuple[str, str, str], int]],
    certificates: Iterable[dict[str, Any]],
) -> str:
    """
    The families an operator alerts on beyond the traffic: reload results, backend attempt
    failures by ``(upstream, server, reason)`` and certificate expiry (rows with ``use``,
    ``endpoint``, ``sni``, ``file`` and ``not_after``, a Unix time).
    """
    out = _Exposition()
    out.family(
        "wsgate_reloads_total",
        "counter",
        "Config reloads by result: ok, or failed (the file was refused, or a listener kept its "
        "old certificates).",
    )
    for result in Reloads.RESULTS:
        out.sample("wsgate_reloads_total", reloads.counts[result], result=result)
    out.family(
        "wsgate_config_last_reload_successful",
        "gauge",
        "1 when the last reload succeeded (or none was tried since the start), 0 when it failed.",
    )
    out.sample("wsgate_config_last_reload_successful", 1 if reloads.last_ok else 0)
    out.family(
        "wsgate_config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the config in force was loaded (the start, or the last successful reload).",
    )
    out.sample("wsgate_config_last_reload_success_timestamp_seconds", float(reloads.last_success))
    out.family(
        "wsgate_backend_failures_total",
        "counter",
        "Failed backend attempts by upstream, server and reason ("
        + ", ".join(BACKEND_FAILURE_REASONS)
        + ").",
    )
    for (upstream, server, reason), count in sorted(backend_failures):
        out.sample(
            "wsgate_backend_failures_total", count, upstream=upstream, server=server, reason=reason
        )
    out.family(
        "wsgate_certificate_expiration_timestamp_seconds",
        "gauge",
        "When each certificate in use expires (notAfter, Unix time; a chain or bundle reports its "
        "first to expire): use is listener, backend_client or backend_ca.",
    )
    rows = sorted(certificates, key=lambda r: (r["use"], r["endpoint"], r["sni"], r["file"]))
    for row in rows:
        out.sample(
            "wsgate_certificate_expiration_timestamp_seconds",
            float(row["not_after"]),
            use=row["use"],
            endpoint=row["endpoint"],
            sni=row["sni"],
            file=row["file"],
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

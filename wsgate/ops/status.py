"""
What the console, the admin listener and the control API show: plain-data rows and snapshots of
the gate (read through its :class:`wsgate.ops.view.GateView`), and a sampler
that keeps the last 15 minutes of totals for rates and charts.

Owns the shape of the stats and snapshots, shared by ``gate.stats()``, ``/status.json`` and
``/metrics`` so that all three always agree (the rows in them are :mod:`wsgate.ops.rows`).
Must not change the gate: it only reads it.
"""

from __future__ import annotations

import platform
from collections import deque
from typing import TYPE_CHECKING, Any

import autobahn
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

import twisted
import wsgate

if TYPE_CHECKING:
    from wsgate.dataplane.gateway import Clock
    from wsgate.ops.view import GateView

__all__ = [
    "HISTORY_SECONDS",
    "Sampler",
    "sessions",
    "snapshot",
    "stats",
    "upstreams",
]

HISTORY_SECONDS = 15 * 60
SAMPLE_INTERVAL = 1.0
# Rates are averaged over this many seconds of samples (steadier than one interval).
RATE_WINDOW = 5.0

_VERSIONS = {
    "wsgate": wsgate.__version__,
    "python": platform.python_version(),
    "twisted": twisted.__version__,
    "autobahn": autobahn.__version__,
}


def sessions(view: GateView, filter: str | None = None) -> list[dict[str, Any]]:
    """Live sessions, oldest first; ``filter`` keeps those whose route, server or client contains it."""
    rows = view.session_rows()
    if filter:
        rows = [
            r
            for r in rows
            if any(filter in str(r[k] or "") for k in ("route", "server", "client", "upstream"))
        ]
    return rows


def upstreams(view: GateView, now: float) -> list[dict[str, Any]]:
    """Every backend server of every upstream with its state and load."""
    return view.server_rows(now)


def stats(view: GateView, sampler: Sampler | None = None) -> dict[str, Any]:
    """Totals since start and current rates (per second, over the last few seconds)."""
    counters = view.counters
    handshakes = {
        key.split(".", 1)[1]: count
        for key, count in counters.items()
        if key.startswith("handshakes.")
    }
    result: dict[str, Any] = {
        "sessions_active": view.session_count(),
        "sessions_opened": counters.get("sessions.opened", 0),
        "sessions_closed": counters.get("sessions.closed", 0),
        "messages_pushed": counters.get("messages.pushed", 0),
        "handshakes": handshakes,
        "webhooks": {
            key.split(".", 1)[1]: count
            for key, count in counters.items()
            if key.startswith("webhooks.")
        },
        **view.totals(),
        "versions": dict(_VERSIONS),
    }
    result["rates"] = sampler.rates() if sampler is not None else {}
    result["uptime"] = sampler.uptime() if sampler is not None else None
    return result


def snapshot(
    view: GateView,
    sampler: Sampler | None,
    limit: int | None = None,
    history: bool = True,
) -> dict[str, Any]:
    """
    The whole picture, as ``/status.json`` serves it: time, stats, upstreams, sessions (the
    ``limit`` busiest when given; ``sessions_shown`` says how many) and the sampled history.
    """
    now = view.clock.seconds()
    rows = sessions(view)
    if limit is not None and len(rows) > limit:
        rows.sort(key=lambda r: r["messages_up"] + r["messages_down"], reverse=True)
        rows = rows[:limit]
    result: dict[str, Any] = {
        "time": now,
        "stats": stats(view, sampler),
        "upstreams": upstreams(view, now),
        "sessions": rows,
    }
    if history:
        result["history"] = sampler.history() if sampler is not None else []
    return result


class Sampler(service.Service):
    """
    Every second, records ``(time, active sessions, messages up, messages down, bytes up, bytes
    down)`` totals; keeps :data:`HISTORY_SECONDS` of them.  Rates and the status page's charts are
    differences between samples.
    """

    log = Logger()

    def __init__(self, view: GateView, clock: Clock, interval: float = SAMPLE_INTERVAL) -> None:
        self.view = view
        self.clock = clock
        self.interval = interval
        self.samples: deque[tuple[float, int, int, int, int, int]] = deque(
            maxlen=int(HISTORY_SECONDS / interval) + 1
        )
        self.started: float | None = None
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.started = self.clock.seconds()
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = self.clock  # type: ignore[assignment]
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: self.log.failure("sampler_failed", failure)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def sample(self) -> None:
        totals = self.view.totals()
        self.samples.append(
            (
                self.clock.seconds(),
                self.view.session_count(),
                totals["messages_up"],
                totals["messages_down"],
                totals["bytes_up"],
                totals["bytes_down"],
            )
        )

    def uptime(self) -> float | None:
        return None if self.started is None else self.clock.seconds() - self.started

    def rates(self) -> dict[str, float]:
        """Per-second messages and bytes each way over the last :data:`RATE_WINDOW` seconds."""
        keys = ("messages_up", "messages_down", "bytes_up", "bytes_down")
        if len(self.samples) < 2:
            return dict.fromkeys(keys, 0.0)
        last = self.samples[-1]
        first = last
        for sample in reversed(self.samples):
            first = sample
            if last[0] - sample[0] >= RATE_WINDOW:
                break
        span = last[0] - first[0]
        if span <= 0:
            return dict.fromkeys(keys, 0.0)
        return {key: (last[i + 2] - first[i + 2]) / span for i, key in enumerate(keys)}

    def history(self) -> list[dict[str, float]]:
        """Per-sample points for charts: time, active sessions, messages/s and bytes/s each way."""
        points = []
        previous = None
        for sample in self.samples:
            t, active = sample[0], sample[1]
            point: dict[str, float] = {"t": t, "active": active}
            if previous is not None and t > previous[0]:
                span = t - previous[0]
                point["messages_up"] = (sample[2] - previous[2]) / span
                point["messages_down"] = (sample[3] - previous[3]) / span
                point["bytes_up"] = (sample[4] - previous[4]) / span
                point["bytes_down"] = (sample[5] - previous[5]) / span
            else:
                point.update(messages_up=0.0, messages_down=0.0, bytes_up=0.0, bytes_down=0.0)
            points.append(point)
            previous = sample
        return points

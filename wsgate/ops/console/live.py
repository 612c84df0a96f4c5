"""
The console's live views, which own the screen until Ctrl-C (or their end): ``tap`` (one
session's messages: time, direction, type, size and a preview) and ``top`` (the busiest sessions
and the servers, refreshed each second).

Live views never slow the gate down: a tap records at most :data:`TAP_QUEUE` messages between two
screen refreshes and counts the rest as dropped; the relay pays one call per message while tapped.

Must not: read the gate other than through the operations view and :mod:`wsgate.ops.status`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from wsgate.dataplane.tap import TAP_QUEUE, TAP_REFRESH, Tapped
from wsgate.ops import status
from wsgate.ops.console.text import _age, _preview, _rate, _size, _upstream_table, table

if TYPE_CHECKING:
    from wsgate.ops.view import GateView

__all__ = ["TAP_LINES_PER_REFRESH", "TOP_REFRESH"]

# How many tap lines per refresh at most (TAP_REFRESH: how often a tap's screen is written).
TAP_LINES_PER_REFRESH = 200
TOP_REFRESH = 1.0


class _Screen(Protocol):
    """Where the ``gate`` commands and live views write: a terminal, or the output of an exec."""

    live: _LiveView | None
    width: int
    height: int

    def write_lines(self, lines: Iterable[str]) -> None: ...

    def redraw(self, text: str) -> None: ...

    def end_live(self, summary: str) -> None: ...


class _LiveView:
    """A view that owns the screen until Ctrl-C (or its end): a tap or top."""

    def __init__(self, view: GateView, clock: Any, screen: _Screen, interval: float) -> None:
        self.view = view
        self.clock = clock
        self.screen = screen
        self.interval = interval
        self._call: Any = None

    def start(self) -> None:
        self.screen.live = self
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        if self.refresh():
            self._call = self.clock.callLater(self.interval, self._tick)

    def refresh(self) -> bool:
        """Update the screen; False when the view has ended by itself."""
        raise NotImplementedError

    def stop(self, why: str = "stopped") -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.finish()
        self.screen.end_live(self.summary(why))

    def finish(self) -> None:
        pass

    def summary(self, why: str) -> str:
        return why


class _Tap(_LiveView):
    """
    Streams one session's messages: time, direction, type, size and a preview.  The view's tap
    hands them over in batches (at most TAP_QUEUE per refresh; the rest are counted as dropped),
    and says once why it ended (the session closed, its worker is gone).
    """

    def __init__(self, view: GateView, clock: Any, screen: _Screen, id: object) -> None:
        super().__init__(view, clock, screen, TAP_REFRESH)
        self.id = id
        self.queue: deque[Tapped] = deque()
        self.shown = 0
        self.dropped = 0
        self._reported_drops = 0
        self.number: int | None = None
        self._ended: str | None = None

    def start(self) -> None:
        """Tap the session (a LookupError when there is none), then own the screen."""
        self.number, answer = self.view.tap(self.id, self)
        answer.addErrback(self._failed)
        super().start()

    def _failed(self, failure: Any) -> None:
        self.tap_ended(f"failed: {failure.getErrorMessage()}")

    def tapped(self, messages: list[Tapped], dropped: int) -> None:
        for message in messages:
            if len(self.queue) >= TAP_QUEUE:
                self.dropped += 1
            else:
                self.queue.append(message)
        self.dropped += dropped

    def tap_ended(self, why: str) -> None:
        self.number = None
        if self._ended is None:
            self._ended = f"session {self.id} {why}"

    def refresh(self) -> bool:
        width = max(20, self.screen.width - 40)
        out = []
        for _ in range(min(len(self.queue), TAP_LINES_PER_REFRESH)):
            when, direction, is_binary, size, first = self.queue.popleft()
            stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
            arrow = "client->backend" if direction == "up" else "backend->client"
            kind = "binary" if is_binary else "text"
            preview = _preview(is_binary, size, first, width)
            out.append(f"{stamp} {arrow} {kind:<6} {_size(size):>9}  {preview}")
            self.shown += 1
        if self.dropped > self._reported_drops:
            out.append(
                f"... {self.dropped - self._reported_drops} messages not shown "
                "(console too slow; the session was not slowed)"
            )
            self._reported_drops = self.dropped
        if out:
            self.screen.write_lines(out)
        if self._ended is not None and not self.queue:
            self.stop(self._ended)
            return False
        return True

    def finish(self) -> None:
        number, self.number = self.number, None
        if number is not None:
            self.view.untap(number)

    def summary(self, why: str) -> str:
        return f"tap of session {self.id} {why}: {self.shown} shown, {self.dropped} dropped"


class _Top(_LiveView):
    """A refreshing screen of the busiest sessions (by messages per second) and the servers."""

    def __init__(
        self, view: GateView, clock: Any, screen: _Screen, sampler: status.Sampler | None
    ) -> None:
        super().__init__(view, clock, screen, TOP_REFRESH)
        self.sampler = sampler
        self._previous: dict[object, tuple[float, int]] = {}
        self.frames = 0

    def start(self) -> None:
        super().start()
        self.refresh()

    def refresh(self) -> bool:
        view = self.view
        now = self.clock.seconds()
        rows = []
        previous = self._previous
        self._previous = {}
        for row in status.sessions(view):
            messages = row["messages_up"] + row["messages_down"]
            then = previous.get(row["id"])
            rate = (messages - then[1]) / (now - then[0]) if then and now > then[0] else 0.0
            self._previous[row["id"]] = (now, messages)
            rows.append((rate, row))
        rows.sort(key=lambda r: (r[0], r[1]["messages_up"] + r[1]["messages_down"]), reverse=True)
        stats = status.stats(view, self.sampler)
        rates = stats["rates"]
        term = self.screen
        servers = status.upstreams(view, now)
        room = max(3, term.height - len(servers) - 9)
        lines = [
            f"wsgate top  {time.strftime('%H:%M:%S')}  sessions {stats['sessions_active']} active, "
            f"{stats['sessions_opened']} opened  |  msg/s up {_rate(rates.get('messages_up', 0))} "
            f"down {_rate(rates.get('messages_down', 0))}  |  bytes/s up "
            f"{_size(rates.get('bytes_up', 0))} down {_size(rates.get('bytes_down', 0))}",
            "Ctrl-C to stop",
            "",
            table(
                ["ID", "CLIENT", "SERVER", "AGE", "MSG/S", "MSGS UP", "MSGS DOWN", "BYTES"],
                [
                    (
                        r["id"],
                        r["client"],
                        r["server"],
                        _age(r["age"]),
                        _rate(rate),
                        r["messages_up"],
                        r["messages_down"],
                        _size(r["bytes_up"] + r["bytes_down"]),
                    )
                    for rate, r in rows[:room]
                ],
                right="04567",
            ),
            "",
            _upstream_table(servers),
        ]
        term.redraw("\n".join(lines))
        self.frames += 1
        return True

    def summary(self, why: str) -> str:
        return f"top {why}"

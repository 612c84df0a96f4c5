"""
Tapping a session: what each relayed message looks like (direction, type, size, first bytes),
collected for the console's ``tap``, in one process or in a worker.

Owns :class:`TapFanout` (set as a relay's ``tap``, it hands each message to every listener) and
:class:`SessionTap` (one listener's tap of one session: at most ``limit`` messages per
``interval``, the rest only counted, handed on in batches; ends by itself when the session closes).
Must not format or show anything: the console does.  A tap never slows the session: the relay
pays one call per message while tapped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from wsgate.core.session import SessionState

__all__ = ["TAP_QUEUE", "TAP_REFRESH", "SessionTap", "TapFanout", "Tapped"]

# How many tapped messages wait for the screen between two refreshes; more are dropped, counted.
TAP_QUEUE = 1000
# How often a tap hands its messages on.
TAP_REFRESH = 0.1

Tapped = tuple[float, str, bool, int, bytes]
"""One tapped message: (time, "up" or "down", is binary, size, first bytes)."""


class TapFanout:
    """Set as a relay's ``tap``: hands each message to every listener tapping that relay."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[bool, int, bytes], None]] = []

    def __call__(self, is_binary: bool, size: int, first: bytes) -> None:
        for listener in list(self.listeners):
            listener(is_binary, size, first)

    @classmethod
    def add(cls, relay: Any, listener: Callable[[bool, int, bytes], None]) -> None:
        if not isinstance(relay.tap, cls):
            relay.tap = cls()
        relay.tap.listeners.append(listener)

    @classmethod
    def remove(cls, relay: Any, listener: Callable[[bool, int, bytes], None]) -> None:
        fanout = relay.tap
        if isinstance(fanout, cls) and listener in fanout.listeners:
            fanout.listeners.remove(listener)
            if not fanout.listeners:
                relay.tap = None


class SessionTap:
    """
    One tap of one session: listeners on both relays collect at most ``limit`` messages per
    ``interval``; every ``interval`` they go to ``deliver(messages, dropped)``.  When the session
    has closed, ``ended(why)`` is called once and the tap removes itself; :meth:`stop` ends it
    early (and calls nothing).
    """

    def __init__(
        self,
        session: Any,
        clock: Any,
        deliver: Callable[[list[Tapped], int], None],
        ended: Callable[[str], None],
        limit: int = TAP_QUEUE,
        interval: float = TAP_REFRESH,
    ) -> None:
        self.session = session
        self.clock = clock
        self.deliver = deliver
        self.ended = ended
        self.limit = limit
        self.interval = interval
        self.pending: list[Tapped] = []
        self.dropped = 0
        self.listeners: list[tuple[Any, Callable[[bool, int, bytes], None]]] = []
        for direction, relay in (("up", session.up), ("down", session.down)):
            if relay is None:
                continue

            def listener(is_binary: bool, size: int, first: bytes, direction: str = direction):
                self._record(direction, is_binary, size, first)

            TapFanout.add(relay, listener)
            self.listeners.append((relay, listener))
        self._call: Any = clock.callLater(interval, self._tick)

    def _record(self, direction: str, is_binary: bool, size: int, first: bytes) -> None:
        if len(self.pending) >= self.limit:
            self.dropped += 1
        else:
            self.pending.append((time.time(), direction, is_binary, size, first))

    def _tick(self) -> None:
        self._call = None
        self.flush()
        if self.session.state == SessionState.CLOSED:
            session = self.session
            self.stop()
            self.ended(f"closed: client {session.client_close}, backend {session.backend_close}")
            return
        self._call = self.clock.callLater(self.interval, self._tick)

    def flush(self) -> None:
        if not self.pending and not self.dropped:
            return
        messages, self.pending = self.pending, []
        dropped, self.dropped = self.dropped, 0
        self.deliver(messages, dropped)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for relay, listener in self.listeners:
            TapFanout.remove(relay, listener)
        self.listeners = []

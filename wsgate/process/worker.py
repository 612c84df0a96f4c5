"""
What runs in a worker process: :func:`run_worker` (``python -m wsgate.worker``) adopts the
inherited sockets, builds the ordinary gate and answers the parent on its stdin and stdout through
:class:`WorkerControl`; its log goes to the parent through :class:`_ForwardedLog`.

A worker runs the whole gateway of one process (Gateway, listeners, health checks, reload) except
the console and the admin listener, which stay in the parent.  Each call of the parent acts through
the worker's own :class:`wsgate.ops.view.LocalView`, the one a single process uses.  A worker's own
SIGTERM/SIGINT (a signal to the whole process group) goes through the same idempotent stop as the
parent's request, not through Twisted's handlers, so the two never stop the reactor twice.

Tap.  The parent's ``tap`` call taps a session under a number the parent chose; the worker taps it
through its view (:class:`wsgate.dataplane.tap.SessionTap`, as a single process does) and every
``TAP_REFRESH`` sends the messages it saw as one ``{"tapped": N, "messages": [[time, direction,
binary, size, preview-base64], ...], "dropped": D}`` event: at most ``TAP_QUEUE`` messages per
interval, the rest only counted, so a tap never slows the gate.  When the session closes the
worker drops the tap and sends ``{"tap_ended": N, "why": ...}``; the parent sends ``untap`` when
the operator stops.

Must not: hold gateway logic of its own (workers run the ordinary Gateway) or wire services
together (``service.py`` passes the builder of a worker's service tree to :func:`run_worker`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import string
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure

from wsgate import config as configmod
from wsgate.core.metrics import Histogram
from wsgate.dataplane.gateway import Clock
from wsgate.dataplane.tap import Tapped
from wsgate.ops.logs import LEVELS
from wsgate.ops.view import LocalView
from wsgate.process.channel import Channel, RemoteError

__all__ = ["WorkerControl", "run_worker"]


class WorkerControl:
    """
    What a worker answers on its control channel: snapshots of its gate for the parent's
    :class:`~wsgate.process.aggregate.Aggregate`, and the verbs, each through the worker's own
    :class:`wsgate.ops.view.LocalView` (the one a single process uses).
    """

    log = Logger()

    def __init__(
        self,
        top: Any,
        stop: Callable[[], None],
        send: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.top = top
        self.gateway = top.gateway
        self.view = LocalView(top.gateway, lambda: list(top.reload()))
        self.stop = stop
        # Unsolicited events to the parent (tapped messages); None: nobody listens.
        self.send = send
        self.taps: dict[int, int] = {}  # the parent's tap number -> the view's

    def __call__(self, call: str, args: dict[str, Any]) -> Any:
        method = getattr(self, f"call_{call}", None)
        if method is None:
            raise LookupError(f"unknown call {call!r}")
        return method(**args)

    def call_snapshot(self, rows: bool = True) -> dict[str, Any]:
        gateway = self.gateway
        view = self.view
        now = gateway.clock.seconds()
        return {
            "pid": os.getpid(),
            "time": now,
            "counters": dict(gateway.counters),
            "closed": [[list(key), count] for key, count in gateway.closed.items()],
            "connect_time": _histogram_data(gateway.connect_time),
            "session_duration": _histogram_data(gateway.session_duration),
            "backend_failures": [[list(k), n] for k, n in gateway.backend_failures.items()],
            "certificates": gateway.certificates(),
            "totals": view.totals(),
            "servers": view.server_rows(now),
            "session_count": view.session_count(),
            "sessions": view.session_rows() if rows else None,
        }

    def call_session(self, id: int) -> defer.Deferred:
        return self.view.session(id)

    def call_kick(self, id: int, code: int, reason: str, by: str) -> defer.Deferred:
        return self.view.kick(id, code, reason, by)

    def call_push(self, id: int, data: str, binary: bool) -> defer.Deferred:
        return self.view.push(id, base64.b64decode(data), binary)

    def call_drain(
        self, upstream: str, url: str, deadline: float | None, window: float
    ) -> defer.Deferred:
        return self.view.drain(upstream, url, deadline, window)

    def call_undrain(self, upstream: str, url: str) -> defer.Deferred:
        return self.view.undrain(upstream, url)

    def call_set_weight(self, upstream: str, url: str, weight: int) -> defer.Deferred:
        return self.view.set_weight(upstream, url, weight)

    def call_add_server(self, upstream: str, url: str, weight: int, backup: bool) -> defer.Deferred:
        return self.view.add_server(upstream, url, weight, backup)

    def call_remove_server(self, upstream: str, url: str) -> defer.Deferred:
        return self.view.remove_server(upstream, url)

    def call_reload(self) -> defer.Deferred:
        return self.view.reload()

    def call_stop(self) -> None:
        self.stop()

    def call_tap(self, id: int, tap: int) -> defer.Deferred:
        """Stream session ``id``'s messages to the parent as ``tapped`` events numbered ``tap``."""
        if self.send is None:
            raise RemoteError("this worker cannot send events")
        self.call_untap(tap)
        number, answer = self.view.tap(id, _TapEvents(self, tap))
        self.taps[tap] = number
        return answer

    def call_untap(self, tap: int) -> bool:
        """Stop tap ``tap``; False when there was none (it had ended already)."""
        number = self.taps.pop(tap, None)
        if number is None:
            return False
        self.view.untap(number)
        return True

    def _send(self, event: dict[str, Any]) -> None:
        if self.send is not None:
            self.send(event)


class _TapEvents:
    """A worker's tap listener: what the view's tap hands it goes to the parent as events."""

    def __init__(self, control: WorkerControl, number: int) -> None:
        self.control = control
        self.number = number

    def tapped(self, messages: list[Tapped], dropped: int) -> None:
        sent = [
            [when, direction, binary, size, base64.b64encode(first).decode("ascii")]
            for when, direction, binary, size, first in messages
        ]
        self.control._send({"tapped": self.number, "messages": sent, "dropped": dropped})

    def tap_ended(self, why: str) -> None:
        self.control.taps.pop(self.number, None)
        self.control._send({"tap_ended": self.number, "why": why})


def _histogram_data(histogram: Histogram) -> dict[str, Any]:
    return {"counts": histogram.counts, "sum": histogram.sum, "count": histogram.count}


class _StdioControl(protocol.Protocol):
    """The worker's end of the channel, on its stdin and stdout (``twisted.internet.stdio``)."""

    def __init__(self, clock: Clock, on_lost: Callable[[], None]) -> None:
        self.clock = clock
        self.on_lost = on_lost
        self.channel: Channel | None = None
        self.answer: Callable[[str, dict[str, Any]], Any] | None = None

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.channel = Channel(transport.write, self.clock, self._request)

    def _request(self, call: str, args: dict[str, Any]) -> Any:
        if self.answer is None:
            raise RemoteError("the worker is still starting")
        return self.answer(call, args)

    def dataReceived(self, data: bytes) -> None:
        assert self.channel is not None
        self.channel.data_received(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.channel is not None:
            self.channel.lost()
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)
        self.on_lost()

    _closed: defer.Deferred | None = None

    def flush(self, timeout: float = 2.0) -> defer.Deferred:
        """Write out what is buffered (the last log lines) and close; bounded by ``timeout``."""
        if self.transport is None or (self.channel is not None and self.channel.closed):
            return defer.succeed(None)
        self._closed = defer.Deferred()
        self._closed.addTimeout(timeout, self.clock)  # type: ignore[arg-type]
        transport: Any = self.transport
        transport.loseConnection()
        return self._closed.addErrback(lambda _: None)


class _ForwardedLog:
    """
    A log observer that sends every event at or above the gate's ``[log] level`` to the parent
    through the channel: its format and fields when the format names only plain fields (strings,
    numbers, booleans, None), so that the parent writes the same line as a single process would
    (logfmt-safe values, JSON fields); else its text.
    """

    def __init__(self, control: _StdioControl) -> None:
        self.control = control
        # The current [log] settings once the gate is built (info until then).
        self.current: Callable[[], configmod.LogSpec] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        channel = self.control.channel
        if channel is None or channel.closed:
            return
        level = event.get("log_level") or LogLevel.info
        lowest = LEVELS[self.current().level] if self.current is not None else LogLevel.info
        if level < lowest:
            return
        message: dict[str, Any] = {"level": level.name, "ns": event.get("log_namespace")}
        failure = event.get("log_failure")
        fields = _plain_fields(event) if failure is None else None
        if fields is not None:
            message["format"], message["fields"] = event["log_format"], fields
        else:
            text = formatEvent(event)
            if failure is not None:
                text += "\n" + failure.getTraceback()
            message["log"] = text
        try:
            channel.send(message)
        except Exception:  # noqa: BLE001  a broken pipe must not loop through the log again
            pass


_PLAIN = (str, int, float, bool, type(None))
# Names the parent's Logger.emit takes itself, or adds ("worker"), or Twisted owns ("log_...").
_RESERVED = ("worker", "format", "level")


def _plain_fields(event: dict[str, Any]) -> dict[str, Any] | None:
    """The fields an event's format names, when every one is a plain name of a plain value."""
    form = event.get("log_format")
    if not isinstance(form, str):
        return None
    fields = {}
    try:
        parsed = list(string.Formatter().parse(form))
    except ValueError:
        return None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if (
            not name.isidentifier()
            or name in _RESERVED
            or name.startswith("log_")
            or name not in event
        ):
            return None
        value = event[name]
        if not isinstance(value, _PLAIN):
            return None
        fields[name] = value
    return fields


def run_worker(argv: list[str], build: Callable[..., Any]) -> int:
    """
    The worker process (``python -m wsgate.worker INDEX CONFIG LISTENERS-JSON``): adopt the
    inherited sockets, build the gate with ``build(config, path, listeners, reactor)`` and run it
    until the parent says stop, the parent goes away, or SIGTERM/SIGINT.
    """
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    index, path, listeners = int(argv[0]), argv[1], json.loads(argv[2])
    the_reactor: Any = reactor
    stopping: list[bool] = []

    def stop() -> None:
        # The one way a worker stops, whichever comes first: the parent's "stop", the parent gone
        # (stdin closed), or SIGTERM/SIGINT.  A process-group signal (systemd, Ctrl-C) brings the
        # signal and the parent's "stop" together; a second reactor.stop() would raise
        # ReactorNotRunning and be logged as a CRITICAL traceback.
        if not stopping:
            stopping.append(True)
            the_reactor.callLater(0, the_reactor.stop)

    def on_signal(number: int, frame: Any) -> None:
        Logger(namespace="wsgate.worker").info(
            "worker_signal {index} {signal}: stopping",
            index=index,
            signal=signal.Signals(number).name,
        )
        the_reactor.callFromThread(stop)

    # Twisted's own handlers would call reactor.stop() beside stop(); ours go through stop().
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_signal)

    control = _StdioControl(the_reactor, stop)
    stdio.StandardIO(control)  # type: ignore[no-untyped-call]
    observer: Any = _ForwardedLog(control)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    log = Logger(namespace="wsgate.worker")
    try:
        config = configmod.load(path)
        top = build(config, path, listeners, the_reactor)
        top.privilegedStartService()
    except Exception:  # noqa: BLE001  reported to the parent, which restarts with a backoff
        log.failure("worker_start_failed {index}", index=index)
        stop()
        the_reactor.run(installSignalHandlers=False)
        return 1

    def send_event(event: dict[str, Any]) -> None:
        if control.channel is not None:
            control.channel.send(event)

    observer.current = lambda: top.gateway.config.log
    control.answer = WorkerControl(top, stop, send_event)
    # Stop the gate (sessions close within the grace), then flush the last log lines to the parent
    # before the reactor drops every connection.
    the_reactor.addSystemEventTrigger(
        "before",
        "shutdown",
        lambda: defer.maybeDeferred(top.stopService).addBoth(lambda _: control.flush()),
    )
    the_reactor.callWhenRunning(top.startService)
    the_reactor.run(installSignalHandlers=False)
    return 0

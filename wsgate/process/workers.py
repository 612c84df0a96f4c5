"""
``workers = N``: one supervising parent and N worker processes sharing each listening socket.

Theory of operation.  The parent binds every ``[[listen]]`` socket itself in
``privilegedStartService`` (so ports still bind before ``twistd --uid`` drops root, and a busy port
fails at startup), stops reading from them, and spawns N children (``python -m wsgate.worker``)
that inherit the sockets as file descriptors and adopt them; the kernel hands each new connection
to whichever worker accepts it first.  A worker runs the whole gateway of one process (Gateway,
listeners, health checks, reload) except the console and the admin listener, which stay in the
parent.  A worker that dies is restarted after a bounded backoff and the sessions it had are logged
as lost.  SIGHUP in the parent validates the file and fans out to every worker; stopping the
parent (SIGTERM) asks every worker to stop (each closes its sessions with 1001 within
``shutdown_grace``) and ends after the last one.  A worker's own SIGTERM/SIGINT (a signal to the
whole process group) goes through the same idempotent stop as the parent's request, not through
Twisted's handlers, so the two never stop the reactor twice.

Control channel.  Each worker's stdin and stdout carry newline-delimited JSON messages: requests
``{"id", "call", "args"}`` from the parent, answers ``{"id", "result"}`` or ``{"id", "error"}``
and unsolicited log events from the worker, ``{"format", "fields"}`` or ``{"log": TEXT}`` (its log
goes to the parent's log, each line prefixed with the worker's number).  Not AMP: a busy worker's session table is far larger
than AMP's 64 KiB value limit.

Aggregation.  :class:`Aggregate` is the parent's operations view (:class:`wsgate.ops.view.GateView`,
what the console, ``/metrics``, the status page and the control API use): the latest snapshot of
every worker (polled each second), summed, with session ids qualified by the worker (``"2:17"`` is
session 17 of worker 2).  Verbs go to the workers: ``kick`` and ``push`` to the worker that owns
the session, server verbs (drain, undrain, weight, add, remove) to all of them, each worker acting
through its own :class:`wsgate.ops.view.LocalView`.  Figures are up to one poll interval old.

Tap.  The console's ``gate.tap("2:17")`` asks worker 2 to ``tap`` session 17 under a number the
parent chose; the worker taps it through its view (:class:`wsgate.dataplane.tap.SessionTap`, as a
single process does) and every ``TAP_REFRESH`` sends the messages it saw as one ``{"tapped": N, "messages":
[[time, direction, binary, size, preview-base64], ...], "dropped": D}`` event: at most
``TAP_QUEUE`` messages per interval, the rest only counted, so a tap never slows the gate.  When
the session closes the worker drops the tap and sends ``{"tap_ended": N, "why": ...}``; the parent
sends ``untap`` when the operator stops; a worker that dies ends its taps in the parent.

Must not: hold gateway logic of its own (workers run the ordinary Gateway) or wire services
together (``service.py`` does; it passes the builder of a worker's service tree to
:func:`run_worker`).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, task, tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate import config as configmod
from wsgate.control.sighup import reload_on_sighup
from wsgate.core.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, Reloads
from wsgate.dataplane.gateway import Clock, config_changes
from wsgate.dataplane.tap import Tapped
from wsgate.ops.logs import LEVELS
from wsgate.ops.process_metrics import Process, gate_processes
from wsgate.ops.status import TOTALS, qualified_id, split_id
from wsgate.ops.view import LocalView, check_kick, check_push

__all__ = [
    "Aggregate",
    "Channel",
    "SharedSocketEndpoint",
    "WorkerControl",
    "WorkerPool",
    "run_worker",
]

POLL_INTERVAL = 1.0
REQUEST_TIMEOUT = 10.0
# Restart delays after a worker dies: doubling from the first to the last, reset after a worker
# that lived STABLE_AFTER seconds.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 30.0
# After stop, how long beyond shutdown_grace the parent waits before it kills workers.
STOP_MARGIN = 5.0
LOST_LOGGED = 100


# -- the control channel ---------------------------------------------------------------------------


class Channel:
    """
    Newline-delimited JSON over a byte stream, both ways: requests get a Deferred that fires with
    the answer (or fails with :class:`RemoteError`, or times out); incoming requests and events go
    to ``on_request`` / ``on_event``.
    """

    log = Logger()

    def __init__(
        self,
        write: Callable[[bytes], None],
        clock: Clock,
        on_request: Callable[[str, dict[str, Any]], Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._write = write
        self._clock = clock
        self._on_request = on_request
        self._on_event = on_event
        self._buffer = b""
        self._next = 1
        self._pending: dict[int, defer.Deferred] = {}
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self._write(json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n")

    def request(self, call: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> defer.Deferred:
        if self.closed:
            return defer.fail(RemoteError(f"{call}: the worker is gone"))
        request_id = self._next
        self._next += 1
        d: defer.Deferred = defer.Deferred(lambda _: self._forget(request_id))
        self._pending[request_id] = d
        d.addTimeout(timeout, self._clock)  # type: ignore[arg-type]
        self.send({"id": request_id, "call": call, "args": args})
        return d

    def _forget(self, request_id: int) -> None:
        self._pending.pop(request_id, None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.log.warn("worker_channel_garbage {line!r}", line=line[:200])
            return
        if "call" in message:
            self._answer(message)
        elif "id" in message:
            d = self._pending.pop(message["id"], None)
            if d is None:
                return
            if "error" in message:
                kind = _ERROR_KINDS.get(message.get("kind"), RemoteError)
                d.errback(kind(message["error"]))
            else:
                d.callback(message.get("result"))
        elif self._on_event is not None:
            self._on_event(message)

    def _answer(self, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if self._on_request is None:
            self.send({"id": request_id, "error": "no requests here"})
            return
        d = defer.maybeDeferred(self._on_request, message["call"], message.get("args") or {})
        d.addCallbacks(
            lambda result: self.send({"id": request_id, "result": result}),
            lambda failure: self.send(
                {"id": request_id, "error": _problem(failure), "kind": _kind(failure)}
            ),
        )

    def lost(self) -> None:
        """The stream ended: every pending request fails."""
        self.closed = True
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(RemoteError("the worker is gone"))


class RemoteError(Exception):
    """The other side of a :class:`Channel` answered with an error (or went away)."""


# Errors that cross the channel as what they are (the control API answers 404 or 400 for them).
_ERROR_KINDS: dict[Any, type[Exception]] = {
    "lookup": LookupError,
    "value": ValueError,
    "overflow": OverflowError,
}


def _kind(failure: Failure) -> str | None:
    for kind, kind_of in _ERROR_KINDS.items():
        if failure.check(kind_of):
            return kind
    return None


def _problem(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, configmod.ConfigError):
        return "\n".join(value.problems)
    if isinstance(value, KeyError | LookupError) and value.args:
        return str(value.args[0])
    return str(value) or failure.getErrorMessage()


# -- inside a worker -------------------------------------------------------------------------------

# Connections a worker accepts from the shared socket each time it wakes up (see _TakeTurnsPort).
ACCEPTS_PER_WAKEUP = 8


class _TakeTurnsPort(tcp.Port):
    """
    A TCP port that accepts a few connections per wake-up.  Every worker polls the shared socket;
    Twisted's default accepts up to a hundred at once, so one worker would take a whole burst of
    connections while the others get none.  A few at a time, the idle workers win the race.
    Measured with two workers on two cores: 8 per wake-up opened 5,400-5,600 sessions/s (200
    handshakes in flight) against 4,000-4,200 with 1, and spread 64 connections evenly (74 open
    descriptors in each worker; with 1: 88 and 60).
    """

    def doRead(self) -> None:
        self.numberAccepts = ACCEPTS_PER_WAKEUP
        super().doRead()


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """A listening socket inherited from the parent (``fd``), shared with the other workers."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: protocol.Factory) -> defer.Deferred:
        try:
            if self.family == socket.AF_UNIX:
                port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
            else:
                port = _TakeTurnsPort._fromListeningDescriptor(
                    self.reactor, self.fd, self.family, factory
                )
                port.startListening()
            os.close(self.fd)
        except Exception:  # noqa: BLE001  a Deferred's failure, as endpoints report it
            return defer.fail()
        return defer.succeed(port)


class WorkerControl:
    """
    What a worker answers on its control channel: snapshots of its gate for the parent's
    :class:`Aggregate`, and the verbs, each through the worker's own
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


# -- in the parent ---------------------------------------------------------------------------------


class Aggregate:
    """
    The operations view of a gate with workers (a :class:`wsgate.ops.view.GateView`, as the
    console, ``/metrics``, the status page and the control API use it): one object over every
    worker's latest snapshot, and verbs forwarded to the workers.  Counters,
    close counts and histograms are summed; servers are merged by URL (active sessions summed,
    ``draining`` if any worker drains it, ``up`` if any worker sees it up); sessions carry a
    ``worker`` field and worker-qualified ids.  ``send(worker, call, **args)`` reaches one worker
    and ``broadcast(call, **args)`` all of them; both return Deferreds.  ``reload()`` is the
    pool's (a Deferred of what changed).
    """

    log = Logger()
    closing = False

    def __init__(
        self,
        config: configmod.Config,
        clock: Clock,
        send: Callable[..., defer.Deferred],
        broadcast: Callable[..., defer.Deferred],
        reload: Callable[[], defer.Deferred] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self._reload = reload
        self._send = send
        self._broadcast = broadcast
        self.snapshots: dict[int, dict[str, Any]] = {}
        # Live taps: number -> (worker, listener); see :meth:`tap`.
        self.taps: dict[int, tuple[int, Any]] = {}
        self._next_tap = 1
        # Counted here, not summed: the parent validates the file before its workers reload it.
        self.reloads = Reloads(clock.seconds())
        self._refresh()

    # -- what status.py reads ------------------------------------------------------------------

    def update(self, worker: int, snapshot: dict[str, Any] | None) -> None:
        """Take a worker's latest snapshot (None: the worker is gone, and so are its taps)."""
        if snapshot is None:
            self.snapshots.pop(worker, None)
            for number, (owner, listener) in list(self.taps.items()):
                if owner == worker:
                    del self.taps[number]
                    listener.tap_ended(f"ended: worker {worker} is gone")
        else:
            self.snapshots[worker] = snapshot
        self._refresh()

    def _refresh(self) -> None:
        counters: Counter[str] = Counter()
        closed: Counter[tuple[str, str, str, str]] = Counter()
        connect_time = Histogram(CONNECT_BUCKETS)
        session_duration = Histogram(DURATION_BUCKETS)
        backend_failures: Counter[tuple[str, str, str]] = Counter()
        sessions: dict[str, dict[str, Any]] = {}
        for worker, snap in sorted(self.snapshots.items()):
            counters.update(snap["counters"])
            for key, count in snap["closed"]:
                closed[tuple(key)] += count  # type: ignore[index]
            for key, count in snap.get("backend_failures", ()):
                backend_failures[tuple(key)] += count  # type: ignore[index]
            _add_histogram(connect_time, snap["connect_time"])
            _add_histogram(session_duration, snap["session_duration"])
            for row in snap.get("sessions") or ():
                row = dict(row, id=qualified_id(worker, row["id"]), worker=worker)
                sessions[row["id"]] = row
        self.counters = counters
        self.closed = closed
        self.connect_time = connect_time
        self.session_duration = session_duration
        self.backend_failures = backend_failures
        self.sessions = sessions

    def certificates(self) -> list[dict[str, Any]]:
        """The workers' certificate rows, each once, with the earliest expiry any worker has."""
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for snap in self.snapshots.values():
            for row in snap.get("certificates", ()):
                key = (row["use"], row["endpoint"], row["sni"], row["file"])
                if key not in rows or row["not_after"] < rows[key]["not_after"]:
                    rows[key] = row
        return list(rows.values())

    def session_count(self) -> int:
        return sum(s["session_count"] for s in self.snapshots.values())

    def session_rows(self) -> list[dict[str, Any]]:
        return list(self.sessions.values())

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(TOTALS, 0)
        for snap in self.snapshots.values():
            for key in TOTALS:
                totals[key] += snap["totals"][key]
        return totals

    def server_rows(self, now: float) -> list[dict[str, Any]]:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        states: dict[tuple[str, str], set[str]] = {}
        for _, snap in sorted(self.snapshots.items()):
            for row in snap["servers"]:
                key = (row["upstream"], row["server"])
                states.setdefault(key, set()).add(row["state"])
                current = merged.get(key)
                if current is None:
                    merged[key] = dict(row)
                    continue
                current["active"] += row["active"]
                current["sessions_total"] += row["sessions_total"]
                current["fails"] = max(current["fails"], row["fails"])
                ages = [a for a in (current["last_check"], row["last_check"]) if a is not None]
                current["last_check"] = min(ages) if ages else None
        for key, row in merged.items():
            seen = states[key]
            row["state"] = "draining" if "draining" in seen else "up" if "up" in seen else "down"
        return list(merged.values())

    def workers(self) -> list[dict[str, Any]]:
        """One row per live worker: number, pid, sessions."""
        return [
            {"worker": w, "pid": s["pid"], "sessions": s["session_count"]}
            for w, s in sorted(self.snapshots.items())
        ]

    def processes(self) -> list[Process]:
        return gate_processes(self.workers)

    fleet = None  # [cluster] is refused with workers

    # -- verbs: to the worker that holds the session, or to every worker ------------------------

    def _holder(self, id: object) -> tuple[int, int]:
        worker, number = split_id(id)
        if str(id) not in self.sessions:
            raise LookupError(f"no live session {id}")
        return worker, number

    def session(self, id: object) -> defer.Deferred:
        def ask() -> defer.Deferred:
            worker, number = split_id(id)
            return self._send(worker, "session", id=number)

        d = defer.maybeDeferred(ask)
        return d.addCallback(lambda detail: dict(detail, id=str(id), worker=split_id(id)[0]))

    def kick(self, id: object, code: int, reason: str, by: str) -> defer.Deferred:
        def kick() -> defer.Deferred:
            check_kick(code, reason)
            worker, number = self._holder(id)
            d = self._send(worker, "kick", id=number, code=code, reason=reason, by=by)
            return d.addCallback(lambda row: dict(row, id=str(id)))

        return defer.maybeDeferred(kick)

    def push(self, id: object, payload: bytes, binary: bool) -> defer.Deferred:
        def push() -> defer.Deferred:
            check_push(payload, binary)
            worker, number = self._holder(id)
            data = base64.b64encode(payload).decode("ascii")
            d = self._send(worker, "push", id=number, data=data, binary=binary)
            return d.addCallback(lambda row: dict(row, id=str(id)))

        return defer.maybeDeferred(push)

    def _server_call(self, call: str, upstream: str, url: str, **args: Any) -> defer.Deferred:
        """A server verb in every worker (each holds the same servers); fires with the first
        worker's answer, or fails with the first failure."""

        def send() -> defer.Deferred:
            if (
                not any(
                    r["upstream"] == upstream and r["server"] == url for r in self.server_rows(0.0)
                )
                and call != "add_server"
            ):
                raise LookupError(f"no server {url} in upstream {upstream}")
            d = self._broadcast(call, upstream=upstream, url=url, **args)
            return d.addCallback(lambda results: results[0] if results else None)

        return defer.maybeDeferred(send).addErrback(_first_error)

    def drain(
        self, upstream: str, url: str, deadline: float | None = None, window: float = 10.0
    ) -> defer.Deferred:
        d = self._server_call("drain", upstream, url, deadline=deadline, window=window)
        return d.addCallback(
            lambda _: sum(
                r["active"]
                for r in self.server_rows(0.0)
                if r["upstream"] == upstream and r["server"] == url
            )
        )

    def undrain(self, upstream: str, url: str) -> defer.Deferred:
        return self._server_call("undrain", upstream, url)

    def set_weight(self, upstream: str, url: str, weight: int) -> defer.Deferred:
        return self._server_call("set_weight", upstream, url, weight=weight)

    def add_server(
        self, upstream: str, url: str, weight: int = 1, backup: bool = False
    ) -> defer.Deferred:
        def check() -> None:
            if upstream not in self.config.upstreams:
                raise LookupError(f"no upstream {upstream}")
            configmod.server_spec(url, weight, backup)

        d = defer.maybeDeferred(check)
        return d.addCallback(
            lambda _: self._server_call("add_server", upstream, url, weight=weight, backup=backup)
        )

    def remove_server(self, upstream: str, url: str) -> defer.Deferred:
        return self._server_call("remove_server", upstream, url)

    def reload(self) -> defer.Deferred:
        if self._reload is None:
            return defer.fail(configmod.ConfigError(["reload is not available here"]))
        return defer.maybeDeferred(self._reload)

    def tap(self, id: object, listener: Any) -> tuple[int, defer.Deferred]:
        """
        Have the session's worker stream its messages to ``listener``: ``listener.tapped(messages,
        dropped)`` with ``(time, direction, is_binary, size, first_bytes)`` tuples, then once
        ``listener.tap_ended(why)`` (session closed, worker gone).  Returns the tap's number (for
        :meth:`untap`) and the Deferred of the worker's answer.
        """
        worker, number = self._holder(id)
        tap = self._next_tap
        self._next_tap += 1
        self.taps[tap] = (worker, listener)

        def failed(failure: Failure) -> Failure:
            self.taps.pop(tap, None)
            return failure

        return tap, self._send(worker, "tap", id=number, tap=tap).addErrback(failed)

    def untap(self, tap: int) -> None:
        """Stop a tap (the console's view ended); the worker removes its listeners."""
        entry = self.taps.pop(tap, None)
        if entry is None:
            return
        self._send(entry[0], "untap", tap=tap).addErrback(
            lambda failure: self.log.info(
                "workers_untap_failed {problem}", problem=failure.getErrorMessage()
            )
        )

    def tap_event(self, worker: int, message: dict[str, Any]) -> None:
        """A worker's ``tapped`` or ``tap_ended`` event, to the tap's listener."""
        number = message.get("tapped", message.get("tap_ended"))
        entry = self.taps.get(number)  # type: ignore[arg-type]
        if entry is None or entry[0] != worker:
            if "tapped" in message and isinstance(number, int):
                # Nobody here listens any more (the view ended while messages were on the way).
                self._send(worker, "untap", tap=number).addErrback(lambda _: None)
            return
        listener = entry[1]
        if "tap_ended" in message:
            del self.taps[number]  # type: ignore[arg-type]
            listener.tap_ended(str(message.get("why") or "ended"))
            return
        messages = [
            (float(t), str(direction), bool(binary), int(size), base64.b64decode(first))
            for t, direction, binary, size, first in message.get("messages") or ()
        ]
        listener.tapped(messages, int(message.get("dropped") or 0))


def _first_error(failure: Failure) -> Failure:
    """gatherResults(consumeErrors=True) wraps the first failure; unwrap it."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure  # type: ignore[union-attr]
    return failure


def _add_histogram(histogram: Histogram, data: dict[str, Any]) -> None:
    for i, count in enumerate(data["counts"][: len(histogram.counts)]):
        histogram.counts[i] += count
    histogram.sum += data["sum"]
    histogram.count += data["count"]


class _Refuse(protocol.Factory):
    """The parent never accepts on the shared sockets; should it, the connection is dropped."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


def _family(address: Any) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot share a listener on {address!r}")


class _WorkerProcess(protocol.ProcessProtocol):
    """The parent's end of one worker: its channel, its pid, when it started."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.started = pool.reactor.seconds()
        self.channel = Channel(self._write, pool.reactor, on_event=self._event)
        self.ended: defer.Deferred = defer.Deferred()

    def _write(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(data)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.channel.data_received(data)

    def _event(self, message: dict[str, Any]) -> None:
        if "tapped" in message or "tap_ended" in message:
            if self.pool.processes.get(self.index) is self:
                self.pool.aggregate.tap_event(self.index, message)
            return
        if "log" in message or "format" in message:
            level = LogLevel.levelWithName(message.get("level") or "info")
            log = Logger(namespace=message.get("ns") or "wsgate.worker")
            fields = message.get("fields")
            if isinstance(fields, dict) and isinstance(message.get("format"), str):
                log.emit(
                    level, "worker {worker}: " + message["format"], worker=self.index, **fields
                )
            else:
                log.emit(level, "worker {worker}: {text}", worker=self.index, text=message["log"])

    def processEnded(self, reason: Failure) -> None:
        self.channel.lost()
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Binds the shared sockets, runs and supervises the workers, polls their snapshots into the
    :class:`Aggregate`, fans out SIGHUP (``reload``) and stop.  ``command(index, listeners)``
    is the argv of a worker; the default runs ``python -m wsgate.worker``.
    """

    log = Logger()

    def __init__(
        self,
        config: configmod.Config,
        path: str,
        reactor: Any,
        rows: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.reactor = reactor
        self.rows = rows
        self.env = env
        self.count = config.workers
        self.aggregate = Aggregate(config, reactor, self.send, self.broadcast, self.reload_all)
        self.ports: list[Any] = []
        self.listeners: list[dict[str, Any]] = []
        self.processes: dict[int, _WorkerProcess] = {}
        self.stopping = False
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._poll: task.LoopingCall | None = None
        self._restore_sighup: Any = None

    # -- start ---------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every listener now (as root, before --uid), and stop the parent reading them."""
        super().privilegedStartService()
        for listener in self.config.listeners:
            endpoint = listener.socket_endpoint
            results: list[Any] = []
            serverFromString(self.reactor, endpoint).listen(_Refuse()).addBoth(results.append)
            result = results[0] if results else None
            if isinstance(result, Failure):
                result.raiseException()
            if result is None:
                raise RuntimeError(f"{endpoint}: did not bind at once")
            result.stopReading()
            self.ports.append(result)
            self.listeners.append(
                {
                    "fd": result.fileno(),
                    "family": _family(result.getHost()),
                    "endpoint": listener.endpoint,
                }
            )

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._restore_sighup = reload_on_sighup(self.reactor, self.reload, self.log)
        self._poll = task.LoopingCall(self.poll)
        self._poll.clock = self.reactor
        self._poll.start(POLL_INTERVAL, now=False).addErrback(
            lambda failure: self.log.failure("workers_poll_failed", failure)
        )

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "wsgate.worker",
            str(index),
            self.path,
            json.dumps(self.listeners),
        ]

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        process = _WorkerProcess(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        for listener in self.listeners:
            child_fds[listener["fd"]] = listener["fd"]
        argv = self.command(index)
        self.reactor.spawnProcess(
            process,
            argv[0],
            argv,
            env=self.env,
            childFDs=child_fds,  # type: ignore[arg-type]
        )
        self.processes[index] = process
        self.log.info("worker_started {worker} pid={pid}", worker=index, pid=process.pid)

    # -- supervision ---------------------------------------------------------------------------

    def worker_ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        snapshot = self.aggregate.snapshots.get(index)
        self.aggregate.update(index, None)
        exit_code = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        how = f"signal {signal_number}" if signal_number else f"exit {exit_code}"
        if self.stopping:
            self.log.info(
                "worker_stopped {worker} pid={pid} {how}", worker=index, pid=process.pid, how=how
            )
            return
        lost = snapshot["session_count"] if snapshot else 0
        self.log.error(
            "worker_died {worker} pid={pid} {how}: {lost} sessions lost",
            worker=index,
            pid=process.pid,
            how=how,
            lost=lost,
        )
        for row in ((snapshot or {}).get("sessions") or [])[:LOST_LOGGED]:
            self.log.warn(
                "session_lost {session_id} client={client} route={route} server={server}",
                session_id=qualified_id(index, row["id"]),
                client=row["client"],
                route=row["route"],
                server=row["server"],
            )
        lived = self.reactor.seconds() - process.started
        delay = RESTART_FIRST if lived >= STABLE_AFTER else self._delays.get(index, RESTART_FIRST)
        self._delays[index] = min(delay * 2, RESTART_MAX)
        self.log.info("worker_restart {worker} in {delay}s", worker=index, delay=delay)
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def poll(self) -> defer.Deferred:
        """Ask every worker for its snapshot; the Aggregate takes each as it arrives."""
        calls = []
        for index, process in list(self.processes.items()):
            d = process.channel.request("snapshot", rows=self.rows)
            d.addCallbacks(
                lambda snap, index=index, process=process: self._snapshot(index, process, snap),
                lambda failure, index=index: self.log.warn(
                    "worker_snapshot_failed {worker}: {problem}",
                    worker=index,
                    problem=failure.getErrorMessage(),
                ),
            )
            calls.append(d)
        return defer.gatherResults(calls)

    def _snapshot(self, index: int, process: _WorkerProcess, snapshot: dict[str, Any]) -> None:
        if self.processes.get(index) is process:
            self.aggregate.update(index, snapshot)

    # -- fan-out -------------------------------------------------------------------------------

    def send(self, index: int, call: str, **args: Any) -> defer.Deferred:
        process = self.processes.get(index)
        if process is None:
            return defer.fail(LookupError(f"no worker {index} running"))
        return process.channel.request(call, **args)

    def broadcast(self, call: str, **args: Any) -> defer.Deferred:
        calls = [p.channel.request(call, **args) for p in list(self.processes.values())]
        return defer.gatherResults(calls, consumeErrors=True)

    def reload(self) -> list[str]:
        """SIGHUP: validate the file here, then have every worker reload it; returns what
        changed here (each worker logs its own outcome)."""
        return self._reload()[0]

    def reload_all(self) -> defer.Deferred:
        """
        The control API's reload: as :meth:`reload`, firing once every worker has answered with
        what changed, the lines of the workers (run-time changes the file reset) included.  A
        refused file raises ConfigError at once.
        """
        changes, answers = self._reload()

        def merged(results: list[list[str]]) -> list[str]:
            lines = list(changes)
            for result in results:
                lines += [line for line in result if line not in lines]
            if len(lines) > 1 and "nothing changed" in lines:
                lines.remove("nothing changed")
            return lines

        return answers.addCallback(merged)

    def _reload(self) -> tuple[list[str], defer.Deferred]:
        try:
            new = configmod.load(self.path)
        except configmod.ConfigError:
            self.aggregate.reloads.record(False, self.reactor.seconds())
            raise
        self.aggregate.reloads.record(True, self.reactor.seconds())
        changes = config_changes(self.config, new)
        if new.workers != self.config.workers:
            changes.append("workers changed: restart wsgate to apply it (kept as it is)")
        self.config = self.aggregate.config = new
        answers = []
        for index, process in list(self.processes.items()):
            answers.append(
                process.channel.request("reload").addCallbacks(
                    lambda result, index=index: self._reloaded(index, result),
                    lambda failure, index=index: self._reload_failed(index, failure),
                )
            )
        return changes, defer.gatherResults(answers)

    def _reloaded(self, index: int, result: list[str]) -> list[str]:
        self.log.info("worker_reloaded {worker}", worker=index)
        return list(result or [])

    def _reload_failed(self, index: int, failure: Failure) -> list[str]:
        problem = failure.getErrorMessage()
        self.log.error("worker_reload_failed {worker}: {problem}", worker=index, problem=problem)
        return [f"worker {index}: reload failed: {problem}"]

    # -- stop ----------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        """Every worker closes its sessions (1001) within the grace; then the sockets close."""
        super().stopService()
        self.stopping = True
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        processes = list(self.processes.values())
        for process in processes:
            process.channel.request("stop").addErrback(self._terminate, process)
        ended = defer.DeferredList([p.ended for p in processes])
        grace = self.config.limits.shutdown_grace + STOP_MARGIN
        kill = self.reactor.callLater(grace, self._kill, processes)
        ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        ended.addBoth(lambda _: self._close_ports())
        return ended

    def _terminate(self, failure: Failure, process: _WorkerProcess) -> None:
        _signal(process, "TERM")

    def _kill(self, processes: Iterable[_WorkerProcess]) -> None:
        for process in processes:
            if not process.ended.called:
                self.log.warn(
                    "worker_killed {worker} pid={pid}", worker=process.index, pid=process.pid
                )
                _signal(process, "KILL")

    def _close_ports(self) -> defer.Deferred:
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


def _signal(process: _WorkerProcess, name: str) -> None:
    try:
        transport: Any = process.transport
        if transport is not None:
            transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass

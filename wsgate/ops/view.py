"""
The operations view: one interface through which the console, ``/status.json``, ``/metrics``,
the status page and the control API read the gate and act on it, whether the gate is one process
or a parent with workers.

Owns :class:`GateView` (the interface), :class:`LocalView` (over the Gateway of this process; a
worker answers its parent with one too) and the checks every implementation shares (close codes,
pushed messages, naming a server).  The other implementation is the workers' parent's
:class:`wsgate.process.aggregate.Aggregate`, over its workers' snapshots, forwarding each verb to the
worker that holds the session (or to every worker, for servers).  Callers never ask which one they
hold.

Reading is synchronous (rows, counts, totals: plain data, up to a poll interval old with workers);
every verb returns a Deferred, because with workers it is answered by another process.  Session
ids are what the rows show: ``17`` in one process, ``"2:17"`` (worker 2's session 17) with
workers.  Servers are named by upstream and URL, so a verb never acts on every upstream that
holds the same URL.

Must not format text (the console and the control API do) or hold gateway logic: verbs call the
Gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer

from wsgate.dataplane.tap import SessionTap, Tapped
from wsgate.ops import rows
from wsgate.ops.process_metrics import Process, gate_processes

if TYPE_CHECKING:
    from wsgate.config import Config
    from wsgate.control.cluster import Cluster
    from wsgate.core.metrics import Histogram, Reloads
    from wsgate.dataplane.gateway import Clock, Gateway

__all__ = [
    "KICK_CODES",
    "MAX_PUSH",
    "GateView",
    "LocalView",
    "TapListener",
    "check_kick",
    "check_push",
    "find_server",
]

# Close codes an operator may send (valid on the wire; 1005/1006/1015 are never sent).
KICK_CODES = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)})
# The largest message the control API pushes into a session.
MAX_PUSH = 1024 * 1024


class TapListener(Protocol):
    """Who taps a session: gets batches of messages, then once why the tap ended."""

    def tapped(self, messages: list[Tapped], dropped: int) -> None: ...

    def tap_ended(self, why: str) -> None: ...


class GateView(Protocol):
    """What operations read and do; see the module docstring."""

    @property
    def clock(self) -> Clock: ...

    @property
    def config(self) -> Config: ...

    @property
    def counters(self) -> Mapping[str, int]: ...

    @property
    def closed(self) -> Mapping[tuple[str, str, str, str], int]: ...

    @property
    def connect_time(self) -> Histogram: ...

    @property
    def session_duration(self) -> Histogram: ...

    @property
    def closing(self) -> bool: ...

    @property
    def reloads(self) -> Reloads: ...

    @property
    def backend_failures(self) -> Mapping[tuple[str, str, str], int]: ...

    def certificates(self) -> list[dict[str, Any]]:
        """Every certificate in use, with its expiry (:mod:`wsgate.core.metrics`' rows)."""

    def processes(self) -> list[Process]:
        """The gate's processes, for the ``process_*`` metrics."""

    @property
    def fleet(self) -> Cluster | None:
        """The fleet of gates this gate is in (``[cluster]``), or None."""

    def session_rows(self) -> list[dict[str, Any]]:
        """Every live session's row (:func:`wsgate.ops.rows.session_row`), oldest first."""

    def session_count(self) -> int: ...

    def server_rows(self, now: float) -> list[dict[str, Any]]:
        """Every server of every upstream: state, weight, load (one row per upstream and URL)."""

    def totals(self) -> dict[str, int]:
        """Messages and bytes each way since start, live sessions included."""

    def session(self, id: object) -> defer.Deferred:
        """Everything about one session (:func:`wsgate.ops.rows.session_detail`)."""

    def kick(self, id: object, code: int, reason: str, by: str) -> defer.Deferred:
        """Close a session: ``code`` and ``reason`` to the client, 1001 to the backend."""

    def push(self, id: object, payload: bytes, binary: bool) -> defer.Deferred:
        """Send the client a message; fires with ``{"id", "size", "binary", "queued"}``."""

    def tap(self, id: object, listener: TapListener) -> tuple[int, defer.Deferred]:
        """Stream a session's messages to ``listener``: the tap's number and the answer."""

    def untap(self, number: int) -> None: ...

    def drain(
        self, upstream: str, url: str, deadline: float | None = None, window: float = 10.0
    ) -> defer.Deferred:
        """No new sessions to the server; close its sessions by ``deadline``.  Fires with the
        number of sessions on it."""

    def undrain(self, upstream: str, url: str) -> defer.Deferred: ...

    def set_weight(self, upstream: str, url: str, weight: int) -> defer.Deferred: ...

    def add_server(
        self, upstream: str, url: str, weight: int = 1, backup: bool = False
    ) -> defer.Deferred: ...

    def remove_server(self, upstream: str, url: str) -> defer.Deferred: ...

    def reload(self) -> defer.Deferred:
        """Re-read the config file: fires with what changed (run-time changes it reset too), or
        fails with the ConfigError that names every problem."""


def check_kick(code: int, reason: str) -> None:
    """A ValueError unless ``code`` may be sent and ``reason`` fits a Close frame."""
    if not isinstance(code, int) or isinstance(code, bool) or code not in KICK_CODES:
        raise ValueError(f"{code} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999")
    if len(reason.encode()) > 123:
        raise ValueError("a close reason is at most 123 bytes of UTF-8")


def check_push(payload: bytes, binary: bool) -> None:
    """A ValueError unless ``payload`` may be pushed: at most MAX_PUSH bytes; text is UTF-8."""
    if len(payload) > MAX_PUSH:
        raise ValueError(f"a pushed message is at most {MAX_PUSH} bytes")
    if not binary:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a text message must be UTF-8") from None


def find_server(view: GateView, text: str, upstream: str | None = None) -> tuple[str, str]:
    """
    The (upstream, URL) of the one server whose URL is ``text`` or else contains it (``"8011"``
    finds ``ws://h:8011``), in ``upstream`` when given.  A LookupError names the candidates when
    there are several (the same URL in two upstreams included) or none.
    """
    servers = [r for r in view.server_rows(0.0) if upstream in (None, r["upstream"])]
    if upstream is not None and upstream not in view.config.upstreams:
        raise LookupError(f"no upstream {upstream}")
    found = [(r["upstream"], r["server"]) for r in servers if r["server"] == text.rstrip("/")]
    found = found or sorted({(r["upstream"], r["server"]) for r in servers if text in r["server"]})
    if len(found) == 1:
        return found[0]
    if not found:
        raise LookupError(f"{text!r} names no server" + (f" of {upstream}" if upstream else ""))
    names = ", ".join(f"{name} {url}" for name, url in found)
    raise LookupError(f"{text!r} names {len(found)} servers ({names}): say which upstream")


class LocalView:
    """The view over this process's Gateway; ``reload`` is the service's reload (or None)."""

    def __init__(self, gateway: Gateway, reload: Callable[[], list[str]] | None = None) -> None:
        self.gateway = gateway
        self._reload = reload
        self._taps: dict[int, SessionTap] = {}
        self._next_tap = 1

    # -- reading -------------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self.gateway.clock

    @property
    def config(self) -> Config:
        return self.gateway.config

    @property
    def counters(self) -> Mapping[str, int]:
        return self.gateway.counters

    @property
    def closed(self) -> Mapping[tuple[str, str, str, str], int]:
        return self.gateway.closed

    @property
    def connect_time(self) -> Histogram:
        return self.gateway.connect_time

    @property
    def session_duration(self) -> Histogram:
        return self.gateway.session_duration

    @property
    def closing(self) -> bool:
        return self.gateway.closing

    @property
    def reloads(self) -> Reloads:
        return self.gateway.reloads

    @property
    def backend_failures(self) -> Mapping[tuple[str, str, str], int]:
        return self.gateway.backend_failures

    def certificates(self) -> list[dict[str, Any]]:
        return self.gateway.certificates()

    def processes(self) -> list[Process]:
        return gate_processes(None)

    @property
    def fleet(self) -> Cluster | None:
        return self.gateway.fleet

    def session_rows(self) -> list[dict[str, Any]]:
        return [rows.session_row(s) for s in list(self.gateway.sessions.values())]

    def session_count(self) -> int:
        return len(self.gateway.sessions)

    def server_rows(self, now: float) -> list[dict[str, Any]]:
        return [
            rows.server_row(name, server, now)
            for name, upstream in self.gateway.upstreams.items()
            for server in upstream.servers
        ]

    def totals(self) -> dict[str, int]:
        gateway = self.gateway
        totals = {key: gateway.counters[key.replace("_", ".")] for key in rows.TOTALS}
        for session in list(gateway.sessions.values()):
            for direction, relay in (("up", session.up), ("down", session.down)):
                if relay is not None:
                    totals[f"messages_{direction}"] += relay.messages
                    totals[f"bytes_{direction}"] += relay.bytes
        return totals

    # -- acting --------------------------------------------------------------------------------

    def _find(self, id: object) -> Any:
        text = str(id)
        session = self.gateway.sessions.get(int(text)) if text.isdigit() else None
        if session is None:
            raise LookupError(f"no live session {id}")
        return session

    def session(self, id: object) -> defer.Deferred:
        return defer.execute(lambda: rows.session_detail(self._find(id)))

    def kick(self, id: object, code: int, reason: str, by: str) -> defer.Deferred:
        def kick() -> dict[str, Any]:
            check_kick(code, reason)
            session = self._find(id)
            session.close(code, reason, by=by)
            return {"id": session.id, "client": session.client_address, "code": code}

        return defer.execute(kick)

    def push(self, id: object, payload: bytes, binary: bool) -> defer.Deferred:
        def push() -> dict[str, Any]:
            check_push(payload, binary)
            session = self._find(id)
            sent = session.push(payload, binary)
            self.gateway.counters["messages.pushed"] += 1
            return {"id": session.id, "size": len(payload), "binary": binary, "queued": not sent}

        return defer.execute(push)

    def tap(self, id: object, listener: TapListener) -> tuple[int, defer.Deferred]:
        session = self._find(id)
        number = self._next_tap
        self._next_tap += 1

        def ended(why: str) -> None:
            self._taps.pop(number, None)
            listener.tap_ended(why)

        self._taps[number] = SessionTap(session, self.clock, listener.tapped, ended)
        return number, defer.succeed({"client": session.client_address})

    def untap(self, number: int) -> None:
        tap = self._taps.pop(number, None)
        if tap is not None:
            tap.stop()

    def drain(
        self, upstream: str, url: str, deadline: float | None = None, window: float = 10.0
    ) -> defer.Deferred:
        return defer.execute(
            self.gateway.drain, url, deadline=deadline, window=window, upstream=upstream
        )

    def undrain(self, upstream: str, url: str) -> defer.Deferred:
        return defer.execute(self.gateway.undrain, url, upstream=upstream)

    def set_weight(self, upstream: str, url: str, weight: int) -> defer.Deferred:
        return defer.execute(self.gateway.set_weight, url, weight, upstream=upstream)

    def add_server(
        self, upstream: str, url: str, weight: int = 1, backup: bool = False
    ) -> defer.Deferred:
        return defer.execute(self.gateway.add_server, upstream, url, weight, backup)

    def remove_server(self, upstream: str, url: str) -> defer.Deferred:
        return defer.execute(self.gateway.remove_server, upstream, url)

    def reload(self) -> defer.Deferred:
        reload = self._reload
        if reload is None:
            from wsgate.config import ConfigError

            return defer.fail(ConfigError(["reload is not available: no config file"]))
        return defer.execute(reload)

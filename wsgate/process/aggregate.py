"""
The parent's operations view of a gate with workers: :class:`Aggregate`, a
:class:`wsgate.ops.view.GateView` (what the console, ``/metrics``, the status page and the control
API use) over the latest snapshot of every worker (polled each second by the pool), summed, with
session ids qualified by the worker (``"2:17"`` is session 17 of worker 2).  Verbs go to the
workers: ``kick`` and ``push`` to the worker that owns the session, server verbs (drain, undrain,
weight, add, remove) to all of them, each worker acting through its own
:class:`wsgate.ops.view.LocalView`.  Figures are up to one poll interval old.  A tap is forwarded to
the session's worker and its events come back here; a worker that dies ends its taps.

Must not: talk to processes itself (it is given ``send`` and ``broadcast``; ``pool.py`` owns the
workers) or hold gateway logic (the workers run the ordinary Gateway).
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate import config as configmod
from wsgate.core.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, Reloads
from wsgate.dataplane.gateway import Clock
from wsgate.ops.process_metrics import Process, gate_processes
from wsgate.ops.rows import TOTALS, qualified_id, split_id
from wsgate.ops.view import check_kick, check_push

__all__ = ["Aggregate"]


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

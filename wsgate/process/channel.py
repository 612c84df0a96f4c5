"""
The parent's control channel to each worker: newline-delimited JSON over the worker's stdin and
stdout, both ways.

Requests ``{"id", "call", "args"}`` go from the parent; answers ``{"id", "result"}`` or ``{"id",
"error", "kind"}`` come back, and unsolicited events from the worker (log lines ``{"format",
"fields"}`` or ``{"log": TEXT}``, a tap's ``{"tapped": N, ...}``).  Errors whose kind the control
API tells apart (LookupError, ValueError, OverflowError) cross as what they are.  Not AMP: a busy
worker's session table is far larger than AMP's 64 KiB value limit.

Must not: know what the calls mean (``worker.py`` answers them, ``pool.py`` and ``aggregate.py``
ask) or touch processes and sockets (it is given a ``write`` function and fed bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate import config as configmod
from wsgate.dataplane.gateway import Clock

__all__ = ["Channel", "RemoteError"]

REQUEST_TIMEOUT = 10.0


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

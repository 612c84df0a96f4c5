"""
What the lifecycle webhooks decide, without I/O.

Owns three things the HTTP driver (:mod:`wsgate.dataplane.webhooks`) carries out:

- the JSON an ``on_connect`` call sends (:func:`connect_facts`) and what its answer means
  (:func:`connect_verdict`): a 2xx allows, with the headers its JSON body names added to the
  backend request; a 4xx denies with that status; anything else (5xx, 3xx, timeout, a connection
  that failed, an answer that is not what is documented) is a failure, which the route's
  ``on_failure`` turns into a 503 (``"deny"``) or an allow without added headers (``"allow"``);
- the audit record an ``on_disconnect`` call sends (:func:`disconnect_record`);
- :class:`DeliveryQueue`: the bounded queue of records waiting for one webhook, with at most
  ``concurrency`` in flight, retries after a doubling, jittered backoff (:class:`RetryPolicy`),
  and drops counted by the caller: a record offered to a full queue is refused, a record whose
  last try failed is given up.  Nothing grows past ``capacity`` records, whatever the webhook does.

Must not do I/O, read a clock (every method that needs the time is given ``now``) or log.
"""

from __future__ import annotations

import heapq
import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from wsgate.config import ConnectHook

__all__ = [
    "ANSWER_LIMIT",
    "Delivery",
    "DeliveryQueue",
    "RetryPolicy",
    "Verdict",
    "connect_facts",
    "connect_verdict",
    "disconnect_record",
    "retryable",
]

# The most of an answer's body that is read; a longer body is a failure (on_connect) or ignored.
ANSWER_LIMIT = 64 * 1024
# The most headers an on_connect answer may add, and the longest value.
_MAX_HEADERS = 32
_MAX_VALUE = 8192
_MAX_REASON = 200
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Headers the gate itself writes on the backend handshake (the handshake's own, and the facts it
# forwards about the client), or that would break it: an on_connect answer may not set them.
_RESERVED = frozenset(
    {
        "host", "connection", "upgrade", "origin", "user-agent", "content-length",
        "transfer-encoding", "te", "trailer", "keep-alive", "x-forwarded-for",
        "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "x-request-id",
    }
)  # fmt: skip
_DENY_REASON = "Refused by the connect webhook"

Verdict = dict[str, str] | tuple[int, str]
"""An ``on_connect`` outcome: the headers to add to the backend request (allowed), or the HTTP
status and reason the client is refused with."""


def connect_facts(
    session: Mapping[str, Any], request: Any, target: str | None, spec: ConnectHook
) -> dict[str, Any]:
    """
    The JSON object an ``on_connect`` call sends: the session's identity (``session``: the
    :meth:`~wsgate.dataplane.session.Session.describe` row so far), the request's host, path,
    origin and subprotocols, the query string when ``spec.query`` is on, and the client headers
    ``spec.headers`` names (those the client sent).
    """
    facts: dict[str, Any] = {
        "event": "connect",
        "session_id": session["session_id"],
        "request_id": session["request_id"],
        "client": session["client"],
        "client_port": session["client_port"],
        "route": session["route"],
        "upstream": session["upstream"],
        "tls": session["tls"],
        "host": request.host,
        "path": request.path,
        "origin": request.origin,
        "subprotocols": list(request.protocols),
        "headers": {
            name: request.headers[name] for name in spec.headers if name in request.headers
        },
    }
    if spec.query:
        facts["query"] = (target or "").partition("?")[2]
    return facts


def connect_verdict(status: int | None, body: bytes, on_failure: str) -> tuple[Verdict, str]:
    """
    What an ``on_connect`` answer means, and the result it is counted and logged under (``allow``,
    ``deny``, ``failed_open``, ``failed_closed``).  ``status`` None: no answer (timeout, connection
    failed, body too long).  A 2xx body is empty or a JSON object whose optional ``headers`` object
    maps header names to string values; a 4xx body may be a JSON object with a ``reason`` string,
    shown to the client.
    """
    if status is not None and 200 <= status < 300:
        headers = _added_headers(body)
        if headers is not None:
            return headers, "allow"
    elif status is not None and 400 <= status < 500:
        return (status, _deny_reason(body)), "deny"
    if on_failure == "allow":
        return {}, "failed_open"
    return (503, "The connect webhook did not answer"), "failed_closed"


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _added_headers(body: bytes) -> dict[str, str] | None:
    """The headers of an allowing answer (title-cased names), or None when it breaks the rules."""
    answer = _json_object(body)
    if answer is None:
        return None
    headers = answer.get("headers", {})
    if not isinstance(headers, dict) or len(headers) > _MAX_HEADERS:
        return None
    added = {}
    for name, value in headers.items():
        lower = name.lower()
        if (
            not _TOKEN.match(name)
            or lower in _RESERVED
            or lower.startswith(("sec-websocket-", "proxy-"))
            or not isinstance(value, str)
            or len(value) > _MAX_VALUE
            or any(c in value for c in "\r\n\0")
        ):
            return None
        added[name.title()] = value
    return added


def _deny_reason(body: bytes) -> str:
    answer = _json_object(body) or {}
    reason = answer.get("reason")
    if isinstance(reason, str) and reason.isprintable() and 0 < len(reason) <= _MAX_REASON:
        return reason
    return _DENY_REASON


def disconnect_record(row: Mapping[str, Any], ended: float) -> dict[str, Any]:
    """
    The audit record of a finished session from its access-log row (``Session.describe``):
    identity, route and servers, duration, counts each way, each side's close and who closed
    first.  ``ended`` is the wall-clock time it ended.
    """
    keys = (
        "session_id", "request_id", "client", "client_port", "route", "upstream", "server",
        "path", "subprotocol", "tls", "started", "duration", "messages_up", "bytes_up",
        "messages_down", "bytes_down", "client_close", "client_code", "client_reason",
        "backend_close", "backend_code", "backend_reason", "closed_by",
    )  # fmt: skip
    return {"event": "disconnect", **{key: row[key] for key in keys}, "ended": ended}


def retryable(status: int | None) -> bool:
    """Whether a failed delivery is worth another try: no answer, 408, 429 or a 5xx."""
    return status is None or status in (408, 429) or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` tries in all; before try n+1, ``backoff * 2**(n-1)`` seconds (at most ``max_backoff``),
    times a jitter between 0.5 and 1 so that many failed records do not all come back at once."""

    tries: int = 4
    backoff: float = 1.0
    max_backoff: float = 60.0

    def delay(self, failures: int, jitter: float) -> float:
        base = min(self.backoff * 2 ** (failures - 1), max(self.max_backoff, self.backoff))
        return base * (0.5 + jitter / 2)


class Delivery:
    """One record on its way: its body, how many tries failed so far and when it is due."""

    __slots__ = ("body", "failures", "due", "_seq")

    def __init__(self, body: bytes, due: float, seq: int) -> None:
        self.body = body
        self.failures = 0
        self.due = due
        self._seq = seq

    def __lt__(self, other: Delivery) -> bool:
        return (self.due, self._seq) < (other.due, other._seq)


class DeliveryQueue:
    """
    The records waiting for one webhook and those in flight, at most ``capacity`` together; at
    most ``concurrency`` in flight.  The driver calls :meth:`offer` for each new record,
    :meth:`take` to get the records to send now, :meth:`succeeded` or :meth:`failed` with each
    outcome, and wakes up at :meth:`next_due`.
    """

    def __init__(
        self,
        capacity: int,
        concurrency: int,
        policy: RetryPolicy,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.capacity = capacity
        self.concurrency = concurrency
        self.policy = policy
        self._jitter = jitter
        self._waiting: list[Delivery] = []  # a heap by due time, then arrival
        self.in_flight = 0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting) + self.in_flight

    def offer(self, body: bytes, now: float) -> bool:
        """Queue a record for a first try now; False (nothing queued) when the queue is full."""
        if len(self) >= self.capacity:
            return False
        self._seq += 1
        heapq.heappush(self._waiting, Delivery(body, now, self._seq))
        return True

    def take(self, now: float) -> list[Delivery]:
        """The records to send now (due, within the concurrency); they count as in flight."""
        taken = []
        while self._waiting and self.in_flight < self.concurrency and self._waiting[0].due <= now:
            taken.append(heapq.heappop(self._waiting))
            self.in_flight += 1
        return taken

    def succeeded(self, delivery: Delivery) -> None:
        self.in_flight -= 1

    def failed(self, delivery: Delivery, now: float, retry: bool = True) -> bool:
        """A try failed: queue the record again after its backoff (True), or give it up (False)
        when it has had its tries or ``retry`` is False."""
        self.in_flight -= 1
        delivery.failures += 1
        if not retry or delivery.failures >= self.policy.tries:
            return False
        delivery.due = now + self.policy.delay(delivery.failures, self._jitter())
        heapq.heappush(self._waiting, delivery)
        return True

    def next_due(self) -> float | None:
        """When :meth:`take` has something to give next (None: nothing, or the concurrency is full
        and an outcome will come first)."""
        if not self._waiting or self.in_flight >= self.concurrency:
            return None
        return self._waiting[0].due

"""
The lifecycle webhooks' HTTP side: ``on_connect`` calls during a handshake and the
``on_disconnect`` audit records of finished sessions, through Twisted's HTTP client (one
``Agent`` with a persistent connection pool for the gate).

``on_connect``: :meth:`Webhooks.on_connect` POSTs the request's facts as JSON and returns a
Deferred that always fires with a :data:`~wsgate.core.webhooks.Verdict` (allow with headers,
or refuse with a status); the whole call, body included, is bounded by the hook's ``timeout``
and by :data:`~wsgate.core.webhooks.ANSWER_LIMIT` bytes.  Cancelling it (the client left, or the
upstream's ``try_timeout`` passed) aborts the call.

``on_disconnect``: :meth:`Webhooks.session_closed` turns the access-log row of a finished session
into a JSON record and queues it, per hook, in a :class:`~wsgate.core.webhooks.DeliveryQueue`;
sending happens later, off the data path, with at most ``concurrency`` calls in flight, each
bounded by ``timeout``.  A full queue drops the record, as does a record whose tries all failed:
both are counted (``webhooks.disconnect.dropped``) and logged, rate limited.  A webhook that hangs
costs one timer and ``concurrency`` connections, never memory beyond ``queue_size`` records.

Counters (in the Gateway's ``counters``, so ``/metrics`` and workers' sums see them):
``webhooks.connect.<result>`` (``allow``, ``deny``, ``failed_open``, ``failed_closed``,
``cancelled``), ``webhooks.disconnect.<result>`` (``sent``, ``failed``: a try that failed,
``dropped``).

Must not decide anything the core decides (what an answer means, when to retry), and must not
touch a session: the bridge asks, and acts on the verdict itself.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from wsgate.config import ConnectHook, DisconnectHook, Route
from wsgate.core.limits import WarningLimiter
from wsgate.core.webhooks import (
    ANSWER_LIMIT,
    Delivery,
    DeliveryQueue,
    RetryPolicy,
    Verdict,
    connect_facts,
    connect_verdict,
    disconnect_record,
    retryable,
)
from wsgate.dataplane._compat import quiet_pool
from wsgate.dataplane.httpclient import read_body

__all__ = ["Webhooks"]

# Idle connections kept open per webhook host (the pool's), and for how long.
_POOL_PER_HOST = 8
_POOL_IDLE = 30
# How often drain() looks whether the last records went.
_DRAIN_POLL = 0.1


class Webhooks:
    """
    The gate's webhook client: ``on_connect`` calls and ``on_disconnect`` queues.  Made by
    ``service.py`` (with the reactor) and handed to the Gateway; :meth:`stop` ends it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        counters: Counter[str],
        warnings: WarningLimiter,
        agent: Any = None,
    ) -> None:
        self._reactor = reactor
        self.counters = counters
        self._warnings = warnings
        self._pool: HTTPConnectionPool | None = None
        if agent is None:
            self._pool = quiet_pool(reactor)
            self._pool.maxPersistentPerHost = _POOL_PER_HOST
            self._pool.cachedConnectionTimeout = _POOL_IDLE
            self._pool.retryAutomatically = False
            agent = Agent(reactor, pool=self._pool)
        self._agent = agent
        self._senders: dict[DisconnectHook, _Sender] = {}

    # -- on_connect ------------------------------------------------------------------------------

    def on_connect(
        self, spec: ConnectHook, session: Mapping[str, Any], request: Any, target: str | None
    ) -> Deferred:
        """
        Ask the ``on_connect`` webhook about a handshake (``session``: the session's describe row;
        ``request``: Autobahn's ConnectionRequest; ``target``: the raw request target).  The
        Deferred fires with the verdict, never fails, and can be cancelled.
        """
        facts = connect_facts(session, request, target, spec)
        call = _post(self._agent, self._reactor, spec.url, facts, spec.timeout, ANSWER_LIMIT)
        return call.addBoth(self._connect_answered, spec, session)

    def _connect_answered(
        self, answer: tuple[int, bytes] | Failure, spec: ConnectHook, session: Mapping[str, Any]
    ) -> Verdict:
        if isinstance(answer, Failure) and answer.check(CancelledError):
            self.counters["webhooks.connect.cancelled"] += 1
            return (499, "client left")  # nobody acts on it: the session is gone
        status, body, problem = _outcome(answer)
        verdict, result = connect_verdict(status, body, spec.on_failure)
        self.counters[f"webhooks.connect.{result}"] += 1
        if result.startswith("failed"):
            self._warnings.warn(
                "webhook_connect_failed",
                "session_id={session_id} url={url} problem={problem} result={result}",
                session_id=session["session_id"],
                url=spec.url,
                problem=problem,
                result=result,
            )
        return verdict

    # -- on_disconnect ---------------------------------------------------------------------------

    def session_closed(self, route: Route, row: Mapping[str, Any]) -> None:
        """Queue the audit record of a finished session on ``route`` (``row``: its access-log
        row), when the route has an ``on_disconnect`` hook."""
        spec = route.on_disconnect
        if spec is None:
            return
        sender = self._senders.get(spec)
        if sender is None:
            sender = self._senders[spec] = _Sender(self, spec)
        record = disconnect_record(row, self._reactor.seconds())
        sender.add(json.dumps(record, separators=(",", ":")).encode())

    def queued(self) -> int:
        """Records waiting or in flight, all hooks together."""
        return sum(len(sender.queue) for sender in self._senders.values())

    def sender_done(self, spec: DisconnectHook) -> None:
        """A hook's queue is empty: forget it (a reload may have replaced the hook)."""
        self._senders.pop(spec, None)

    def drain(self, settled: Callable[[], bool], grace: float) -> Deferred:
        """
        Stop once ``settled()`` (the gate has no session left to report) and every queue is
        empty, or after ``grace`` seconds whatever is left (then dropped): the records of the
        sessions a shutdown closes get their chance.
        """
        done: Deferred = Deferred()
        deadline = self._reactor.seconds() + grace

        def check() -> None:
            if (settled() and not self.queued()) or self._reactor.seconds() >= deadline:
                self.stop().chainDeferred(done)
            else:
                self._reactor.callLater(_DRAIN_POLL, check)

        check()
        return done

    def stop(self) -> Deferred:
        """Stop sending (queued records are dropped) and close the pool's idle connections."""
        for sender in list(self._senders.values()):
            sender.stop()
        self._senders.clear()
        return self._pool.closeCachedConnections() if self._pool is not None else succeed(None)


class _Sender:
    """Carries out one ``on_disconnect`` hook's :class:`DeliveryQueue`: sends, retries, drops."""

    def __init__(self, hooks: Webhooks, spec: DisconnectHook) -> None:
        self._hooks = hooks
        self._spec = spec
        self._clock = hooks._reactor
        self.queue = DeliveryQueue(
            spec.queue_size, spec.concurrency, RetryPolicy(spec.tries, spec.backoff)
        )
        self._timer: Any = None
        self._calls: set[Deferred] = set()

    def add(self, body: bytes) -> None:
        if self.queue.offer(body, self._clock.seconds()):
            self._pump()
        else:
            self._dropped("queue full")

    def _pump(self) -> None:
        hooks, spec = self._hooks, self._spec
        for delivery in self.queue.take(self._clock.seconds()):
            call = _post(hooks._agent, self._clock, spec.url, delivery.body, spec.timeout, None)
            self._calls.add(call)
            call.addBoth(self._outcome, call, delivery)
        # (An outcome may have come at once and pumped already: one timer at most all the same.)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        due = self.queue.next_due()
        if due is not None:
            self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._pump)
        elif not len(self.queue):
            self._hooks.sender_done(self._spec)

    def _outcome(
        self, answer: tuple[int, bytes] | Failure, call: Deferred, delivery: Delivery
    ) -> None:
        self._calls.discard(call)
        counters = self._hooks.counters
        if isinstance(answer, Failure) and answer.check(CancelledError):
            return  # stopped
        status, _, problem = _outcome(answer)
        if status is not None and 200 <= status < 300:
            counters["webhooks.disconnect.sent"] += 1
            self.queue.succeeded(delivery)
        else:
            counters["webhooks.disconnect.failed"] += 1
            if not self.queue.failed(delivery, self._clock.seconds(), retryable(status)):
                self._dropped(f"gave up after {delivery.failures} tries ({problem})")
        self._pump()

    def _dropped(self, why: str) -> None:
        self._hooks.counters["webhooks.disconnect.dropped"] += 1
        self._hooks._warnings.warn(
            "webhook_record_dropped", "url={url} why={why}", url=self._spec.url, why=why
        )

    def stop(self) -> None:
        """Cancel what is in flight and drop what waits (counted and logged)."""
        if len(self.queue):
            self._hooks.counters["webhooks.disconnect.dropped"] += len(self.queue)
            self._hooks.log.warn(
                "webhook_records_dropped url={url} count={count} why=gate stopping",
                url=self._spec.url,
                count=len(self.queue),
            )
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for call in list(self._calls):
            call.cancel()


# -- one HTTP POST --------------------------------------------------------------------------------


def _post(
    agent: Any, clock: Any, url: str, payload: Any, timeout: float, limit: int | None
) -> Deferred:
    """
    POST ``payload`` (bytes, or an object sent as JSON) to ``url``; the Deferred fires with the
    status and at most ``limit`` bytes of the body (a longer body fails it; None: the body is
    read and dropped), or fails (connection,
    timeout after ``timeout`` seconds for the whole exchange).  Cancelling aborts the call.
    """
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = Headers({b"content-type": [b"application/json"], b"user-agent": [b"wsgate"]})
    d = agent.request(b"POST", url.encode("ascii"), headers, _Body(body))
    d.addCallback(_read_answer, limit)
    d.addTimeout(timeout, clock)
    return d


@implementer(IBodyProducer)
class _Body:
    """A request body known in full: written at once (FileBodyProducer would need a cooperator)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _outcome(answer: tuple[int, bytes] | Failure) -> tuple[int | None, bytes, str]:
    """A call's status (None: no answer), body and what went wrong, in words."""
    if isinstance(answer, Failure):
        return None, b"", answer.getErrorMessage() or repr(answer.value)
    return answer[0], answer[1], f"status {answer[0]}"


def _read_answer(response: Any, limit: int | None) -> Deferred:
    """The response's status and body, reading at most ``limit`` bytes (then the call fails)."""
    return read_body(response, limit).addCallback(lambda body: (response.code, body))

"""
Lifecycle webhooks without sockets: the delivery queue and its retry policy on a fake clock, what
an on_connect answer means, the records and facts sent, the config keys, the metrics, the HTTP
driver over a fake agent, and the session's on_connect step in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from tests.helpers import BackendFactory, Network, make_config, upgrade_request
from wsgate import config
from wsgate.core import metrics
from wsgate.core.limits import WarningLimiter
from wsgate.core.webhooks import (
    DeliveryQueue,
    RetryPolicy,
    connect_facts,
    connect_verdict,
    disconnect_record,
    retryable,
)
from wsgate.dataplane.webhooks import Webhooks
from wsgate.ops import status


class RetryPolicyTests(SynchronousTestCase):
    def test_delays_double_jitter_and_cap(self) -> None:
        """Backoff doubles from ``backoff``, capped at ``max_backoff``; jitter scales it to 50..100%."""
        policy = RetryPolicy(tries=10, backoff=1.0, max_backoff=5.0)
        self.assertEqual([policy.delay(n, 1.0) for n in range(1, 6)], [1.0, 2.0, 4.0, 5.0, 5.0])
        self.assertEqual(policy.delay(2, 0.0), 1.0)
        self.assertEqual(policy.delay(2, 0.5), 1.5)

    def test_retryable(self) -> None:
        """No answer, 408, 429 and 5xx are retried; other answers are final."""
        for code, expected in [
            (None, True), (408, True), (429, True), (500, True), (503, True),
            (400, False), (404, False), (302, False),
        ]:  # fmt: skip
            self.assertEqual(retryable(code), expected, code)


class DeliveryQueueTests(SynchronousTestCase):
    def queue(self, capacity: int = 3, concurrency: int = 2, tries: int = 3) -> DeliveryQueue:
        return DeliveryQueue(capacity, concurrency, RetryPolicy(tries, 1.0, 60.0), lambda: 1.0)

    def test_capacity_counts_waiting_and_in_flight(self) -> None:
        """The queue holds at most ``capacity`` records, in flight included; more are refused."""
        q = self.queue(capacity=3, concurrency=2)
        self.assertEqual([q.offer(b"%d" % i, 0.0) for i in range(5)], [True] * 3 + [False] * 2)
        taken = q.take(0.0)
        self.assertEqual([d.body for d in taken], [b"0", b"1"])  # in arrival order
        self.assertEqual(len(q), 3)
        self.assertFalse(q.offer(b"x", 0.0), "in-flight records count against the capacity")
        q.succeeded(taken[0])
        self.assertTrue(q.offer(b"x", 0.0))

    def test_concurrency(self) -> None:
        """At most ``concurrency`` in flight; the next waits for an outcome, not for a timer."""
        q = self.queue(capacity=10, concurrency=2)
        for i in range(4):
            q.offer(b"%d" % i, 0.0)
        first = q.take(0.0)
        self.assertEqual(len(first), 2)
        self.assertEqual(q.take(5.0), [])
        self.assertIsNone(q.next_due(), "no wake-up while the concurrency is full")
        q.succeeded(first[0])
        self.assertEqual(q.next_due(), 0.0)
        self.assertEqual([d.body for d in q.take(5.0)], [b"2"])

    def test_retries_then_gives_up(self) -> None:
        """A failed try comes back after its backoff (1 s, then 2 s), until ``tries`` are spent."""
        q = self.queue(tries=3)
        q.offer(b"r", 10.0)
        (d,) = q.take(10.0)
        self.assertTrue(q.failed(d, 11.0))
        self.assertEqual(q.take(11.5), [], "not before its backoff")
        self.assertEqual(q.next_due(), 12.0)
        (d,) = q.take(12.0)
        self.assertTrue(q.failed(d, 12.0))
        self.assertEqual(q.next_due(), 14.0)
        (d,) = q.take(14.0)
        self.assertFalse(q.failed(d, 14.0), "third failure of three tries: given up")
        self.assertEqual(len(q), 0)
        self.assertIsNone(q.next_due())

    def test_final_failure_not_retried(self) -> None:
        """A failure that is not worth retrying gives the record up at once."""
        q = self.queue()
        q.offer(b"r", 0.0)
        (d,) = q.take(0.0)
        self.assertFalse(q.failed(d, 0.0, retry=False))
        self.assertEqual(len(q), 0)

    def test_order_by_due_time_then_arrival(self) -> None:
        """A retry waits for its backoff behind newer records, then goes before later ones."""
        q = self.queue(capacity=5, concurrency=1)
        q.offer(b"a", 0.0)
        (a,) = q.take(0.0)
        q.failed(a, 0.0)  # due again at 1.0
        q.offer(b"b", 0.5)
        q.offer(b"c", 2.0)
        (b,) = q.take(0.5)
        self.assertEqual(b.body, b"b")
        q.succeeded(b)
        self.assertEqual([d.body for d in q.take(3.0)], [b"a"])


class VerdictTests(SynchronousTestCase):
    def test_table(self) -> None:
        """What each answer means, with on_failure = deny and allow."""
        ok_headers = json.dumps({"headers": {"x-user": "alice", "Authorization": "Bearer t"}})
        cases = [
            # (status, body, on_failure) -> (verdict, result)
            ((200, b"", "deny"), ({}, "allow")),
            ((204, b"", "deny"), ({}, "allow")),
            ((200, ok_headers.encode(), "deny"),
             ({"X-User": "alice", "Authorization": "Bearer t"}, "allow")),
            ((403, b"", "deny"), ((403, "Refused by the connect webhook"), "deny")),
            ((401, b'{"reason": "token expired"}', "allow"), ((401, "token expired"), "deny")),
            ((429, b"not json", "deny"), ((429, "Refused by the connect webhook"), "deny")),
            ((500, b"", "deny"), ((503, "The connect webhook did not answer"), "failed_closed")),
            ((500, b"", "allow"), ({}, "failed_open")),
            ((None, b"", "deny"), ((503, "The connect webhook did not answer"), "failed_closed")),
            ((None, b"", "allow"), ({}, "failed_open")),
            ((302, b"", "deny"), ((503, "The connect webhook did not answer"), "failed_closed")),
            ((200, b"not json", "deny"),
             ((503, "The connect webhook did not answer"), "failed_closed")),
            ((200, b"[1]", "allow"), ({}, "failed_open")),
        ]  # fmt: skip
        for args, expected in cases:
            self.assertEqual(connect_verdict(*args), expected, args)

    def test_reserved_and_malformed_headers_are_failures(self) -> None:
        """An allow that sets a header the gate owns, or a malformed one, is not trusted."""
        for headers in [
            {"Host": "evil"},
            {"Sec-WebSocket-Protocol": "x"},
            {"X-Forwarded-For": "1.2.3.4"},
            {"X-Request-ID": "x"},
            {"Bad Name": "x"},
            {"X-A": "line\r\nX-Injected: 1"},
            {"X-A": 5},
            {f"X-{i}": "v" for i in range(33)},
        ]:
            body = json.dumps({"headers": headers}).encode()
            self.assertEqual(connect_verdict(200, body, "deny")[1], "failed_closed", headers)

    def test_deny_reason_is_bounded(self) -> None:
        """A deny reason that is too long or not printable is replaced by the generic one."""
        for reason in ["x" * 201, "a\nb", ""]:
            body = json.dumps({"reason": reason}).encode()
            self.assertEqual(
                connect_verdict(403, body, "deny")[0], (403, "Refused by the connect webhook")
            )


class _Request:
    host = "chat.example"
    path = "/chat"
    origin = "https://app.example"
    protocols = ["v1"]
    headers = {"authorization": "Bearer t", "cookie": "c=1", "user-agent": "ua"}


ROW = {
    "session_id": 7,
    "request_id": "r7",
    "client": "127.0.0.5",
    "client_port": 40000,
    "route": "/chat",
    "upstream": "u",
    "tls": False,
}


class FactsTests(SynchronousTestCase):
    def test_connect_facts(self) -> None:
        """The request facts, only the headers named (and sent), the query only when asked."""
        spec = config.ConnectHook(url="http://h/", headers=("authorization", "x-missing"))
        facts = connect_facts(ROW, _Request(), "/chat?token=s", spec)
        self.assertEqual(
            facts,
            {
                "event": "connect",
                **ROW,
                "host": "chat.example",
                "path": "/chat",
                "origin": "https://app.example",
                "subprotocols": ["v1"],
                "headers": {"authorization": "Bearer t"},
            },
        )
        with_query = config.ConnectHook(url="http://h/", query=True)
        self.assertEqual(
            connect_facts(ROW, _Request(), "/chat?token=s", with_query)["query"], "token=s"
        )

    def test_disconnect_record(self) -> None:
        """The audit record carries the access-log fields that matter, and when it ended."""
        row = {key: key for key in (
            "session_id", "request_id", "client", "client_port", "route", "upstream", "server",
            "path", "subprotocol", "tls", "started", "duration", "messages_up", "bytes_up",
            "messages_down", "bytes_down", "client_close", "client_code", "client_reason",
            "backend_close", "backend_code", "backend_reason", "closed_by", "tried", "idle",
        )}  # fmt: skip
        record = disconnect_record(row, 99.0)
        self.assertEqual(record["event"], "disconnect")
        self.assertEqual(record["ended"], 99.0)
        self.assertEqual(record["closed_by"], "closed_by")
        self.assertNotIn("tried", record)
        self.assertEqual(len(record), 25)


def _parse(route: dict[str, Any]) -> config.Config:
    return config.parse(
        {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u", **route}],
            "upstream": {"u": {"servers": [{"url": "ws://127.0.0.1:1"}]}},
        },
        "w.toml",
    )


class ConfigTests(SynchronousTestCase):
    def test_parsed_with_defaults(self) -> None:
        """Both hooks parse into frozen specs, with their defaults and units."""
        route = _parse(
            {
                "on_connect": {
                    "url": "https://auth.internal/ws",
                    "timeout": "500ms",
                    "headers": ["Authorization", "Cookie"],
                    "on_failure": "allow",
                },
                "on_disconnect": {"url": "http://127.0.0.1:9/audit", "queue_size": 10},
            }
        ).routes[0]
        self.assertEqual(
            route.on_connect,
            config.ConnectHook(
                url="https://auth.internal/ws",
                timeout=0.5,
                headers=("authorization", "cookie"),
                on_failure="allow",
            ),
        )
        self.assertEqual(
            route.on_disconnect,
            config.DisconnectHook(url="http://127.0.0.1:9/audit", queue_size=10),
        )
        self.assertIsNone(_parse({}).routes[0].on_connect)

    def test_bad_values_named(self) -> None:
        """Every bad key is reported with file, key path and reason."""
        e = self.assertRaises(
            config.ConfigError,
            _parse,
            {
                "on_connect": {
                    "url": "ws://x/",
                    "timeout": "0s",
                    "headers": ["bad name"],
                    "on_failure": "maybe",
                    "colour": 1,
                },
                "on_disconnect": {"queue_size": 0, "tries": 0, "concurrency": -1},
            },
        )
        self.assertEqual(
            sorted(e.problems),
            sorted(
                [
                    "w.toml: route[0].on_connect.url: 'ws://x/': not an http:// or https:// URL",
                    "w.toml: route[0].on_connect.timeout: must be more than 0",
                    "w.toml: route[0].on_connect.headers: 'bad name' is not an HTTP header name",
                    "w.toml: route[0].on_connect.on_failure: 'maybe' is not one of deny, allow",
                    "w.toml: route[0].on_connect.colour: unknown key",
                    "w.toml: route[0].on_disconnect.url: required",
                    "w.toml: route[0].on_disconnect.queue_size: expected a whole number of at least 1",
                    "w.toml: route[0].on_disconnect.tries: expected a whole number of at least 1",
                    "w.toml: route[0].on_disconnect.concurrency: expected a whole number of at least 1",
                ]
            ),
        )

    def test_not_a_table(self) -> None:
        """A hook that is not a table is refused as such."""
        e = self.assertRaises(config.ConfigError, _parse, {"on_disconnect": "http://x/"})
        self.assertIn("w.toml: route[0].on_disconnect: expected a table", e.problems)


# -- the HTTP driver over a fake agent ------------------------------------------------------------


class _Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """Records requests; each answers when the test fires its Deferred (cancellable)."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Deferred]] = []
        self.immediate: tuple[int, bytes] | None = None  # answer every request at once

    def request(self, method: bytes, url: bytes, headers: Any, body: Any) -> Deferred:
        sent: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                sent.append(data)

        body.startProducing(Consumer())
        d: Deferred = Deferred()
        self.requests.append((url, b"".join(sent), d))
        if self.immediate is not None:
            d.callback(_Response(*self.immediate))
        return d

    def answer(self, i: int, code: int, body: bytes = b"") -> None:
        self.requests[i][2].callback(_Response(code, body))

    def fail(self, i: int) -> None:
        self.requests[i][2].errback(ConnectionRefusedError())


DISCONNECT = config.DisconnectHook(
    url="http://hook/audit", timeout=5.0, queue_size=3, concurrency=1, tries=2, backoff=1.0
)
CONNECT = config.ConnectHook(url="http://hook/connect", timeout=2.0)


def _route(**hooks: Any) -> config.Route:
    return config.Route(path="/", upstream="u", **hooks)


class DriverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters: Counter[str] = Counter()
        self.agent = FakeAgent()
        self.hooks = Webhooks(
            self.clock, self.counters, WarningLimiter(self.clock.seconds), agent=self.agent
        )

    def close_session(self, n: int) -> None:
        self.hooks.session_closed(_route(on_disconnect=DISCONNECT), {**_ROW_FULL, "session_id": n})

    def test_disconnect_sent_one_at_a_time(self) -> None:
        """Records go out one at a time (concurrency 1), each as the JSON audit record."""
        self.close_session(1)
        self.close_session(2)
        self.assertEqual(len(self.agent.requests), 1)
        url, body, _ = self.agent.requests[0]
        self.assertEqual(url, b"http://hook/audit")
        self.assertEqual(json.loads(body)["session_id"], 1)
        self.agent.answer(0, 204)
        self.assertEqual(json.loads(self.agent.requests[1][1])["session_id"], 2)
        self.agent.answer(1, 200, b"x" * 100_000)  # a long body is read and ignored
        self.assertEqual(self.counters["webhooks.disconnect.sent"], 2)
        self.assertEqual(self.hooks.queued(), 0)

    def test_full_queue_drops_and_counts(self) -> None:
        """A hanging webhook: the queue stays at queue_size and every further record is dropped."""
        for n in range(10):
            self.close_session(n)
        self.assertEqual(self.hooks.queued(), 3)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.counters["webhooks.disconnect.dropped"], 7)

    def test_timeout_retry_then_give_up(self) -> None:
        """A try that times out is retried after its backoff; after ``tries`` it is dropped."""
        self.close_session(1)
        self.clock.advance(5.0)  # the first try times out (cancelled)
        self.assertEqual(self.counters["webhooks.disconnect.failed"], 1)
        self.assertEqual(len(self.agent.requests), 1, "not before the backoff")
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.answer(1, 503)
        self.assertEqual(self.counters["webhooks.disconnect.failed"], 2)
        self.assertEqual(self.counters["webhooks.disconnect.dropped"], 1)
        self.assertEqual(self.hooks.queued(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer left behind")

    def test_client_error_not_retried(self) -> None:
        """A 400 from the webhook will not get better: dropped at once."""
        self.close_session(1)
        self.agent.answer(0, 400)
        self.clock.advance(60)
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.counters["webhooks.disconnect.dropped"], 1)

    def test_drain_waits_then_stops(self) -> None:
        """drain() waits for the last records, at most the grace, then drops what is left."""
        self.close_session(1)
        self.close_session(2)
        done = self.hooks.drain(lambda: True, 3.0)
        self.assertNoResult(done)
        self.agent.answer(0, 200)
        self.clock.advance(3.0)
        self.successResultOf(done)
        self.assertEqual(self.counters["webhooks.disconnect.sent"], 1)
        self.assertEqual(self.counters["webhooks.disconnect.dropped"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_verdicts(self) -> None:
        """on_connect: the answer becomes a verdict; a refused connection fails closed."""
        request = _Request()
        allowed = self.hooks.on_connect(CONNECT, ROW, request, "/chat")
        self.assertEqual(json.loads(self.agent.requests[0][1])["event"], "connect")
        self.agent.answer(0, 200, b'{"headers": {"X-User": "alice"}}')
        self.assertEqual(self.successResultOf(allowed), {"X-User": "alice"})
        refused = self.hooks.on_connect(CONNECT, ROW, request, "/chat")
        self.agent.fail(1)
        self.assertEqual(self.successResultOf(refused), (503, "The connect webhook did not answer"))
        slow = self.hooks.on_connect(CONNECT, ROW, request, "/chat")
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(slow)[0], 503)
        self.assertEqual(
            {k: v for k, v in self.counters.items() if v},
            {"webhooks.connect.allow": 1, "webhooks.connect.failed_closed": 2},
        )

    def test_metrics(self) -> None:
        """/metrics shows calls by hook and result, and the drops."""
        for n in range(5):
            self.close_session(n)
        self.agent.answer(0, 200)
        text = metrics.render(
            {"stats": {**_STATS, "webhooks": status.stats(_Counters(self.counters))["webhooks"]},
             "upstreams": []},
            [],
            metrics.Histogram([1.0]),
            metrics.Histogram([1.0]),
            "test",
        )  # fmt: skip
        self.assertIn('wsgate_webhook_calls_total{hook="disconnect",result="sent"} 1', text)
        self.assertIn('wsgate_webhook_dropped_total{hook="disconnect"} 2', text)


class _Counters:
    """Just enough of a GateView for status.stats: counters, and no session."""

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters

    def session_count(self) -> int:
        return 0

    def totals(self) -> dict[str, int]:
        return {}


_STATS = {
    "versions": {"twisted": "t", "autobahn": "a"},
    "sessions_active": 0,
    "sessions_opened": 0,
    "handshakes": {},
    "messages_up": 0,
    "messages_down": 0,
    "bytes_up": 0,
    "bytes_down": 0,
}

_ROW_FULL = {
    key: None
    for key in (
        "request_id", "client", "client_port", "route", "upstream", "server", "path",
        "subprotocol", "tls", "started", "duration", "messages_up", "bytes_up", "messages_down",
        "bytes_down", "client_close", "client_code", "client_reason", "backend_close",
        "backend_code", "backend_reason", "closed_by",
    )
}  # fmt: skip


# -- the session's on_connect step, in memory -----------------------------------------------------


class SessionHookTests(SynchronousTestCase):
    def gate(self, **route: Any) -> tuple[Network, FakeAgent, BackendFactory]:
        backend = BackendFactory()
        net = Network(make_config(["ws://b1:80"], **route), {"ws://b1:80": backend})
        agent = FakeAgent()
        net.gateway.webhooks = Webhooks(
            net.clock, net.gateway.counters, net.gateway.warnings, agent=agent
        )
        return net, agent, backend

    def test_backend_waits_for_the_webhook(self) -> None:
        """No backend is contacted before the webhook allows; its headers reach the backend."""
        net, agent, backend = self.gate(on_connect={"url": "http://hook/c"})
        client = net.client("/")
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual(backend.requests, [])
        agent.answer(0, 200, b'{"headers": {"X-User": "alice"}}')
        net.flush()
        (request,) = backend.requests
        self.assertEqual(request.headers["x-user"], "alice")
        self.assertTrue(client.opened)

    def test_deny_status_reaches_the_client(self) -> None:
        """A 403 from the webhook is the client's answer; no backend is contacted."""
        net, agent, backend = self.gate(on_connect={"url": "http://hook/c"})
        raw = net.raw(upgrade_request("/"))
        agent.answer(0, 403, b'{"reason": "banned"}')
        net.flush()
        self.assertEqual(raw.status, 403)
        self.assertIn(b"banned", raw.data)
        self.assertEqual(backend.requests, [])
        self.assertEqual(net.gateway.counters["handshakes.403"], 1)

    def test_client_leaving_cancels_the_call(self) -> None:
        """A client that leaves while the webhook thinks cancels the call; nothing else happens."""
        net, agent, backend = self.gate(on_connect={"url": "http://hook/c"})
        raw = net.raw(upgrade_request("/"))
        raw.transport.loseConnection()
        net.flush()
        self.assertEqual(net.gateway.counters["webhooks.connect.cancelled"], 1)
        self.assertEqual(backend.requests, [])
        self.assertEqual(net.clock.getDelayedCalls(), [])

    def test_immediate_answer_keeps_the_backend_attempt_cancellable(self) -> None:
        """A webhook that answers at once: a client that then leaves still cancels the connect."""
        net = Network(
            make_config(["ws://b1:80"], on_connect={"url": "http://hook/c"}), {"ws://b1:80": "hang"}
        )
        agent = FakeAgent()
        agent.immediate = (204, b"")
        net.gateway.webhooks = Webhooks(
            net.clock, net.gateway.counters, net.gateway.warnings, agent=agent
        )
        raw = net.raw(upgrade_request("/"))
        self.assertEqual(len(net.hanging), 1)
        raw.transport.loseConnection()
        net.flush()
        self.assertEqual(net.cancelled, net.hanging)

    def test_disconnect_record_from_the_access_log(self) -> None:
        """A finished session's record is queued with its counts, codes and who closed."""
        net, agent, backend = self.gate(on_disconnect={"url": "http://hook/d"})
        client = net.client("/")
        client.proto.sendMessage(b"hello")
        net.flush()
        client.proto.sendClose(4000, "bye")
        net.flush()
        (url, body, _) = agent.requests[0]
        record = json.loads(body)
        self.assertEqual(url, b"http://hook/d")
        self.assertEqual(
            {k: record[k] for k in ("messages_up", "messages_down", "client_code", "closed_by")},
            {"messages_up": 1, "messages_down": 1, "client_code": 4000, "closed_by": "client"},
        )
        self.assertEqual(record["client_reason"], "bye")

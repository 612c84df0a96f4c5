"""
Lifecycle webhooks' decisions without a gate: the delivery queue and its retry policy on a fake
clock, what an on_connect answer means, the records and facts sent.  The HTTP driver and the
session's on_connect step are in ``tests/dataplane/test_webhooks.py``.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import SESSION_ROW, HandshakeRequest
from wsgate import config
from wsgate.core.webhooks import (
    DeliveryQueue,
    RetryPolicy,
    connect_facts,
    connect_verdict,
    disconnect_record,
    retryable,
)


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


class FactsTests(SynchronousTestCase):
    def test_connect_facts(self) -> None:
        """The request facts, only the headers named (and sent), the query only when asked."""
        spec = config.ConnectHook(url="http://h/", headers=("authorization", "x-missing"))
        facts = connect_facts(SESSION_ROW, HandshakeRequest(), "/chat?token=s", spec)
        self.assertEqual(
            facts,
            {
                "event": "connect",
                **SESSION_ROW,
                "host": "chat.example",
                "path": "/chat",
                "origin": "https://app.example",
                "subprotocols": ["v1"],
                "headers": {"authorization": "Bearer t"},
            },
        )
        with_query = config.ConnectHook(url="http://h/", query=True)
        self.assertEqual(
            connect_facts(SESSION_ROW, HandshakeRequest(), "/chat?token=s", with_query)["query"],
            "token=s",
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

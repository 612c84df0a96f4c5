"""
Lifecycle webhooks in the gate, without sockets: the config keys, the metrics, the HTTP driver
over a fake agent, and the session's on_connect step in memory.  The delivery queue, its retry
policy, what an answer means and the records sent are in ``tests/core/test_webhooks.py``.
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

from tests.helpers import (
    SESSION_ROW,
    BackendFactory,
    HandshakeRequest,
    Network,
    make_config,
    upgrade_request,
)
from wsgate import config
from wsgate.core import metrics
from wsgate.core.limits import WarningLimiter
from wsgate.dataplane.webhooks import Webhooks
from wsgate.ops import status


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
        request = HandshakeRequest()
        allowed = self.hooks.on_connect(CONNECT, SESSION_ROW, request, "/chat")
        self.assertEqual(json.loads(self.agent.requests[0][1])["event"], "connect")
        self.agent.answer(0, 200, b'{"headers": {"X-User": "alice"}}')
        self.assertEqual(self.successResultOf(allowed), {"X-User": "alice"})
        refused = self.hooks.on_connect(CONNECT, SESSION_ROW, request, "/chat")
        self.agent.fail(1)
        self.assertEqual(self.successResultOf(refused), (503, "The connect webhook did not answer"))
        slow = self.hooks.on_connect(CONNECT, SESSION_ROW, request, "/chat")
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

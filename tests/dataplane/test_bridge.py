"""
The data path in memory: handshake pairing, failures, relay, close policy, registry.
"""

from __future__ import annotations

import dataclasses

from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, make_config, upgrade_request
from wsgate.dataplane.bridge import ClientLeg, Session, partner_close
from wsgate.dataplane.relay import ReadThrottle as _ReadThrottle

A = "ws://a.test:1"
B = "ws://b.test:2"


class PartnerCloseTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Every way a leg can end maps to the documented close of its partner."""
        table = [
            (("client", "close", 4001, "bye"), (4001, "bye")),
            (("backend", "close", 1000, ""), (1000, "")),
            (("client", "close", None, ""), (None, "")),
            (("backend", "close", 1012, "restart"), (1012, "restart")),
            (("client", "failed", 1009, "too big"), (1001, "client error 1009: too big")),
            (("backend", "failed", 1002, "bad frame"), (1011, "backend error 1002: bad frame")),
            (("client", "dropped", None, "x"), (1001, "client went away")),
            (("backend", "dropped", None, "x"), (1011, "backend connection lost")),
        ]
        for args, expected in table:
            self.assertEqual(partner_close(*args), expected, args)


class HandshakeTests(SynchronousTestCase):
    def test_backend_first(self) -> None:
        """The client's 101 carries the subprotocol the backend chose from the client's offer."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        client = net.client("/chat?room=1", protocols=["v1", "v2"])
        self.assertTrue(client.opened)
        self.assertEqual(backend.requests[0].protocols, ["v1", "v2"])
        session = next(iter(net.gateway.sessions.values()))
        self.assertEqual(session.subprotocol, "v2")
        self.assertEqual(net.gateway.counters["handshakes.ok"], 1)

    def test_no_101_while_backend_pending(self) -> None:
        """While the backend has not answered, the client gets nothing; after try_timeout, a 504."""
        net = Network(make_config([A]), {A: "hang"})
        raw = net.raw(upgrade_request())
        self.assertEqual(raw.data, b"")
        net.advance(15)
        self.assertEqual(raw.status, 504)
        self.assertEqual(net.cancelled, net.hanging)
        self.assertEqual(net.gateway.counters["handshakes.504"], 1)

    def test_backend_refuses_handshake(self) -> None:
        """A backend answering the upgrade with 403 makes the client's answer a 502, not a 101."""
        net = Network(make_config([A]), {A: BackendFactory(deny=403)})
        raw = net.raw(upgrade_request())
        self.assertEqual(raw.status, 502)
        self.assertIn(b"Content-Length:", raw.data)
        self.assertNotIn(b"101", raw.data.split(b"\r\n")[0])

    def test_failover(self) -> None:
        """A refused server is skipped: the session opens on the next one."""
        backend = BackendFactory()
        net = Network(make_config([A, B]), {A: "refuse", B: backend})
        client = net.client()
        self.assertTrue(client.opened)
        self.assertEqual(len(backend.requests), 1)

    def test_all_refused(self) -> None:
        """When every try fails the client gets 502."""
        net = Network(make_config([A, B]), {A: "refuse", B: "refuse"})
        self.assertEqual(net.raw(upgrade_request()).status, 502)

    def test_backend_handshake_timeout(self) -> None:
        """A backend that accepts TCP but never answers the upgrade gives the client a 504."""
        silent = BackendFactory()
        silent.protocol = type("Silent", (silent.protocol,), {"dataReceived": lambda s, d: None})
        net = Network(make_config([A]), {A: silent})
        raw = net.raw(upgrade_request())
        net.advance(10)
        self.assertEqual(raw.status, 504)

    def test_client_leaves_while_pending(self) -> None:
        """A client that disconnects before the backend answered cancels the pending connect."""
        net = Network(make_config([A]), {A: "hang"})
        raw = net.raw(upgrade_request())
        raw.transport.loseConnection()
        net.flush()
        self.assertEqual(len(net.cancelled), 1)
        self.assertEqual(net.gateway.sessions, {})

    def test_forwarded_headers(self) -> None:
        """The backend sees the client's path, query, credentials and the X-Forwarded set."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        net.raw(
            upgrade_request(
                "/room/7?user=ann",
                "Origin: https://app.test\r\nCookie: sid=1\r\nAuthorization: Bearer t\r\n"
                "User-Agent: ua/1\r\nX-Forwarded-For: 10.9.9.9\r\n",
            )
        )
        request = backend.requests[0]
        headers = request.headers
        self.assertEqual(request.path, "/room/7")
        self.assertEqual(request.params, {"user": ["ann"]})
        self.assertEqual(headers["host"], "a.test:1")
        self.assertEqual(headers["origin"], "https://app.test")
        self.assertEqual(headers["cookie"], "sid=1")
        self.assertEqual(headers["authorization"], "Bearer t")
        self.assertEqual(headers["user-agent"], "ua/1")
        self.assertEqual(headers["x-forwarded-for"], "10.9.9.9, 127.0.0.5")
        self.assertEqual(headers["x-forwarded-proto"], "http")
        self.assertEqual(headers["x-forwarded-host"], "gate.test")
        self.assertEqual(headers["x-real-ip"], "127.0.0.5")


class NotWebSocketTests(SynchronousTestCase):
    def test_plain_get(self) -> None:
        """A plain GET on a route gets 426 with Upgrade: websocket and a short body."""
        net = Network(make_config([A]), {A: BackendFactory()})
        raw = net.raw(b"GET / HTTP/1.1\r\nHost: gate.test\r\n\r\n")
        self.assertEqual(raw.status, 426)
        self.assertIn(b"\r\nUpgrade: websocket\r\n", raw.data)
        self.assertTrue(
            raw.data.endswith(b"\r\n\r\n426 Upgrade Required: HTTP Upgrade header missing\n")
        )

    def test_no_route(self) -> None:
        """A request no route matches gets 404, upgrade or not."""
        config = make_config([A])
        config = type(config)(
            config.source,
            config.listeners,
            tuple(type(r)(path="/chat", upstream=r.upstream) for r in config.routes),
            config.upstreams,
        )
        net = Network(config, {A: BackendFactory()})
        self.assertEqual(net.raw(b"GET /other HTTP/1.1\r\nHost: gate.test\r\n\r\n").status, 404)
        self.assertEqual(net.raw(upgrade_request("/other")).status, 404)
        self.assertEqual(net.raw(upgrade_request("/chatter")).status, 404)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(make_config([A], max_message_size="2MiB"), {A: self.backend})
        self.client = self.net.client()
        self.protocol = self.client.proto

    def test_types_and_sizes(self) -> None:
        """Text stays text, binary stays binary, large and empty messages arrive intact."""
        messages = [(b"hello", False), (b"\x00\xff", True), (b"", False), (b"x" * 1_500_000, True)]
        for payload, binary in messages:
            self.protocol.sendMessage(payload, binary)
        self.net.flush()
        self.assertEqual(self.backend.received, messages)
        self.assertEqual(self.client.received, messages)

    def test_fragmented(self) -> None:
        """A fragmented message arrives whole, in both directions."""
        self.protocol.sendMessage(("é" * 5000).encode(), False, fragmentSize=999)
        self.net.flush()
        self.assertEqual(self.client.received, [(("é" * 5000).encode(), False)])

    def test_counters(self) -> None:
        """The registry counts messages and payload bytes each way."""
        self.protocol.sendMessage(b"12345")
        self.net.flush()
        info = next(iter(self.net.gateway.sessions.values())).describe()
        self.assertEqual((info["messages_up"], info["bytes_up"]), (1, 5))
        self.assertEqual((info["messages_down"], info["bytes_down"]), (1, 5))

    def test_too_big(self) -> None:
        """A message over the route's limit closes that session 1009 to the client, 1001 to the backend."""
        other = self.net.client()
        self.protocol.sendMessage(b"x" * (2 * 1024 * 1024 + 1), True)
        self.net.flush()
        self.assertEqual(self.client.close[0], 1009)
        self.assertEqual(self.backend.closes[0][0], 1001)
        other.proto.sendMessage(b"still here")
        self.net.flush()
        self.assertEqual(other.received, [(b"still here", False)])


class CloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(make_config([A], idle_timeout="30s"), {A: self.backend})
        self.client = self.net.client()
        self.protocol = self.client.proto
        self.session = next(iter(self.net.gateway.sessions.values()))

    def test_client_closes(self) -> None:
        """The client's close code and reason reach the backend; the session leaves the registry."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.protocol.sendClose(4001, "bye")
        self.net.flush()
        self.assertEqual(self.backend.closes, [(4001, "bye")])
        self.assertEqual(self.net.gateway.sessions, {})
        access = [e for e in events if e.get("log_format", "").startswith("session_closed")]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["closed_by"], "client")
        self.assertEqual(access[0]["client_close"], "4001 'bye'")

    def test_session_opened_line_only_when_asked(self) -> None:
        """A session is logged once, when it ends; ``log_session_opened`` adds a line at the open."""
        for flag, lines in (
            (False, ["session_closed"]),
            (True, ["session_opened", "session_closed"]),
        ):
            events: list[dict] = []
            globalLogPublisher.addObserver(events.append)
            self.addCleanup(globalLogPublisher.removeObserver, events.append)
            config = dataclasses.replace(make_config([A]), log_session_opened=flag)
            net = Network(config, {A: BackendFactory()})
            net.client().proto.sendClose(1000)
            net.flush()
            logged = [e.get("log_format", "").split(" ")[0] for e in events]
            self.assertEqual([word for word in logged if word.startswith("session_")], lines)

    def test_backend_closes(self) -> None:
        """The backend's close code and reason reach the client."""
        self.protocol.sendMessage(b"close 4002 done")
        self.net.flush()
        self.assertEqual(self.client.close, (4002, "done"))
        self.assertEqual(self.session.closed_by, "backend")

    def test_backend_drops(self) -> None:
        """A backend that drops TCP without a Close gives the client 1011."""
        self.backend.connections[0].transport.loseConnection()
        self.net.flush()
        self.assertEqual(self.client.close[0], 1011)
        self.assertEqual(self.net.gateway.sessions, {})

    def test_client_drops(self) -> None:
        """A client that drops TCP without a Close gives the backend 1001."""
        self.protocol.transport.loseConnection()
        self.net.flush()
        self.assertEqual(self.backend.closes, [(1001, "client went away")])
        self.assertEqual(self.net.gateway.sessions, {})

    def test_kick(self) -> None:
        """Session.close sends its code to the client and 1001 to the backend."""
        self.session.close(4009, "kicked")
        self.net.flush()
        self.assertEqual(self.client.close, (4009, "kicked"))
        self.assertEqual(self.backend.closes, [(1001, "kicked")])

    def test_idle_timeout(self) -> None:
        """A session idle for idle_timeout is closed 1001; traffic keeps it open."""
        self.net.advance(20)
        self.protocol.sendMessage(b"ping")
        self.net.flush()
        self.net.advance(20)
        self.assertIsNone(self.client.close)
        self.net.advance(11)
        self.assertEqual(self.client.close, (1001, "idle timeout"))
        self.assertEqual(self.backend.closes, [(1001, "idle timeout")])

    def test_no_idle_timeout_by_default(self) -> None:
        """Without idle_timeout a silent session stays open (no NGINX-style 60 s cut)."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        client = net.client()
        net.advance(24 * 3600)
        self.assertTrue(client.opened)
        self.assertIsNone(client.close)
        self.assertEqual(len(net.gateway.sessions), 1)


class ThrottleTests(SynchronousTestCase):
    def test_pause_resume_stop(self) -> None:
        """The throttle pauses and resumes the other transport; its stop resumes instead of closing."""
        other = StringTransport()
        throttle = _ReadThrottle(other)
        throttle.pauseProducing()
        self.assertEqual(other.producerState, "paused")
        throttle.resumeProducing()
        self.assertEqual(other.producerState, "producing")
        throttle.pauseProducing()
        throttle.stopProducing()
        self.assertEqual(other.producerState, "producing")
        self.assertFalse(other.disconnecting)
        self.assertEqual(throttle.pauses, 2)

    def test_registered_both_ways(self) -> None:
        """An open session registers a throttle on each leg's transport for the other leg."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        net.client()
        session: Session = next(iter(net.gateway.sessions.values()))
        assert session.backend is not None and session.throttles is not None
        self.assertIs(session.client.transport.producer, session.throttles[0])
        self.assertIs(session.backend.transport.producer, session.throttles[1])
        self.assertIs(session.throttles[0]._transport, session.backend.transport)


class PingTests(SynchronousTestCase):
    def test_pings_find_dead_backend(self) -> None:
        """With ping_interval set, a backend that stops answering pings is dropped and the client gets 1011."""
        backend = BackendFactory()
        pings: list[bytes] = []
        backend.protocol = type(
            "Deaf", (backend.protocol,), {"onPing": lambda s, p: pings.append(p)}
        )
        net = Network(make_config([A], ping_interval="10s", ping_timeout="5s"), {A: backend})
        client = net.client()
        net.advance(10)
        self.assertEqual(len(pings), 1)
        self.assertIsNone(client.close)
        net.advance(5)
        self.assertEqual(client.close, (1011, "backend connection lost"))

    def test_pings_keep_session(self) -> None:
        """Answered pings keep an idle session open on both legs for hours."""
        backend = BackendFactory()
        net = Network(make_config([A], ping_interval="10s", ping_timeout="5s"), {A: backend})
        client = net.client()
        for _ in range(360):
            net.advance(10)
        self.assertIsNone(client.close)
        self.assertEqual(len(net.gateway.sessions), 1)


class RefusalBodyTests(SynchronousTestCase):
    def test_backend_details_stay_in_the_log(self) -> None:
        """A refused client learns the status, not backend host names or error texts."""
        net = Network(make_config([A]), {A: "refuse"})
        raw = net.raw(upgrade_request())
        self.assertEqual(raw.status, 502)
        self.assertIn(b"No backend server accepted the session", raw.data)
        self.assertNotIn(b"a.test", raw.data)
        self.assertNotIn(b"refused", raw.data)


class TapTests(SynchronousTestCase):
    def test_tap_sees_type_size_preview(self) -> None:
        """A tap on a relay gets each message's type, size and first bytes; untapped, nothing."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        client = net.client()
        session = next(iter(net.gateway.sessions.values()))
        seen: list[tuple[bool, int, bytes]] = []
        session.up.tap = lambda *event: seen.append(event)
        client.proto.sendMessage(b"hello tap")
        client.proto.sendMessage(b"\x01" * 1000, True)
        net.flush()
        session.up.tap = None
        client.proto.sendMessage(b"not seen")
        net.flush()
        self.assertEqual(seen, [(False, 9, b"hello tap"), (True, 1000, b"\x01" * 64)])


class StateTests(SynchronousTestCase):
    def test_states(self) -> None:
        """A session goes OPEN -> CLOSING (a close started) -> CLOSED (both legs gone)."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        client = net.client()
        (session,) = net.gateway.sessions.values()
        self.assertEqual(session.state, "OPEN")
        session.close(4000, "bye")
        self.assertEqual(session.state, "CLOSING")
        net.flush()
        self.assertEqual(session.state, "CLOSED")
        self.assertEqual(client.close, (4000, "bye"))


class TLSReasonTests(SynchronousTestCase):
    def test_reasons_of_a_pyopenssl_error(self) -> None:
        """The warning for a failed client TLS handshake names OpenSSL's reasons, and survives
        errors without them (a SysCallError's args are (errno, text), not a list)."""
        from OpenSSL import SSL

        from wsgate.dataplane.bridge import _tls_reason

        error = SSL.Error([("SSL routines", "", "http request"), ("SSL routines", "", "x")])
        self.assertEqual(_tls_reason(error), "http request; x")
        self.assertEqual(
            _tls_reason(SSL.SysCallError(-1, "Unexpected EOF")), "(-1, 'Unexpected EOF')"
        )
        self.assertEqual(_tls_reason(SSL.Error()), "Error")


class QuietLogTests(SynchronousTestCase):
    def test_only_errors_reach_the_log(self) -> None:
        """Autobahn's log calls on a leg: below error nothing is logged (nor formatted), errors
        are, and a name Autobahn may add later is ignored rather than raising."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = ClientLeg.log
        for level in ("trace", "debug", "info", "warn", "emit_later"):
            getattr(log, level)("{x} happened", x=object())
        self.assertEqual(events, [])
        log.error("{x} failed", x="handshake")
        self.assertEqual([e["log_format"] for e in events], ["{x} failed"])

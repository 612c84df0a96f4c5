"""
The admin listener in memory: ``/metrics`` parsed with Prometheus's own text parser after a
scripted set of sessions, ``/status.json`` and the status page's files.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, get, make_config, upgrade_request
from wsgate import config as configmod
from wsgate.ops.admin import admin_resource, admin_service
from wsgate.ops.status import Sampler
from wsgate.ops.view import LocalView
from wsgate.process.aggregate import Aggregate
from wsgate.process.sdnotify import Listening, Notifier
from wsgate.process.worker import WorkerControl

A = "ws://a.test:1"
B = "ws://b.test:2"
C = "ws://c.test:3"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Network(make_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        self.sampler = Sampler(LocalView(self.net.gateway), self.net.clock)
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.root = admin_resource(LocalView(self.net.gateway), self.sampler)

    def script(self) -> None:
        """Three sessions (A, B, A), one 502 and one plain GET (426)."""
        net = self.net
        first = net.client("/")  # to A
        first.proto.sendMessage(b"ab")
        first.proto.sendMessage(b"cde")
        net.flush()
        second = net.client("/")  # to B
        second.proto.sendMessage(b"close 4001 bye")
        net.flush()
        net.advance(2)
        first.proto.sendClose(1000)
        net.flush()
        third = net.client("/")  # to A, stays open
        third.proto.sendMessage(b"\x01\x02\x03\x04", isBinary=True)
        net.flush()
        net.backends[A] = net.backends[B] = "refuse"
        self.assertEqual(net.raw(upgrade_request()).status, 502)
        self.assertEqual(net.raw(b"GET / HTTP/1.1\r\nHost: gate.test\r\n\r\n").status, 426)
        self.assertEqual(second.close, (4001, "bye"))

    def test_metrics_after_sessions(self) -> None:
        """Counters, gauges and histograms agree with what the scripted sessions did."""
        self.script()
        request, body = get(self.root, "/metrics")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        m = samples(body.decode())

        def value(name: str, **labels: str) -> float:
            return m[(name, frozenset(labels.items()))]

        self.assertEqual(value("wsgate_sessions_active"), 1)
        closed = dict(route="/", upstream="u")
        self.assertEqual(value("wsgate_sessions_total", **closed, server=A, code="1000"), 1)
        self.assertEqual(value("wsgate_sessions_total", **closed, server=B, code="4001"), 1)
        self.assertEqual(value("wsgate_handshakes_total", result="ok"), 3)
        self.assertEqual(value("wsgate_handshakes_total", result="502"), 1)
        self.assertEqual(value("wsgate_handshakes_total", result="426"), 1)
        self.assertEqual(value("wsgate_messages_total", direction="up"), 4)
        self.assertEqual(value("wsgate_messages_total", direction="down"), 3)
        self.assertEqual(value("wsgate_bytes_total", direction="up"), 2 + 3 + 14 + 4)
        self.assertEqual(value("wsgate_bytes_total", direction="down"), 2 + 3 + 4)
        self.assertEqual(value("wsgate_backend_connect_seconds_count"), 3)
        self.assertEqual(value("wsgate_backend_connect_seconds_bucket", le="+Inf"), 3)
        self.assertEqual(value("wsgate_session_duration_seconds_count"), 2)
        # The session B closed at once, A after two seconds.
        self.assertEqual(value("wsgate_session_duration_seconds_bucket", le="1.0"), 1)
        self.assertEqual(value("wsgate_session_duration_seconds_bucket", le="10.0"), 2)
        self.assertEqual(value("wsgate_session_duration_seconds_sum"), 2.0)
        # One state per server, the one the upstream holds (the 502 may have marked them down).
        for server in self.net.gateway.upstreams["u"].servers:
            states = {
                state: value("wsgate_server_state", upstream="u", server=server.url, state=state)
                for state in ("up", "down", "draining")
            }
            self.assertEqual(states[server.state], 1)
            self.assertEqual(sum(states.values()), 1)
        self.assertEqual(value("wsgate_server_active_sessions", upstream="u", server=A), 1)
        self.assertEqual(value("wsgate_server_sessions_total", upstream="u", server=A), 2)
        [build] = [k for k in m if k[0] == "wsgate_build_info"]
        self.assertIn(("version", "0.1.0"), build[1])

    def test_label_escaping(self) -> None:
        """Label values with quotes, backslashes and newlines still parse."""
        self.net.gateway.closed[('/a"b\\c\nd', "u", A, "1000")] += 1
        _, body = get(self.root, "/metrics")
        m = samples(body.decode())
        self.assertIn(
            (
                "wsgate_sessions_total",
                frozenset(
                    {("route", '/a"b\\c\nd'), ("upstream", "u"), ("server", A), ("code", "1000")}
                ),
            ),
            m,
        )


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Network(make_config([A]), {A: BackendFactory()})
        self.sampler = Sampler(LocalView(self.net.gateway), self.net.clock)
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.root = admin_resource(LocalView(self.net.gateway), self.sampler)

    def test_status_json(self) -> None:
        """/status.json holds the sessions, upstreams, stats with rates, and the history."""
        client = self.net.client("/live")
        for _ in range(10):
            client.proto.sendMessage(b"x")
            self.net.flush()
            self.net.advance(1)
        _, body = get(self.root, "/status.json")
        data = json.loads(body)
        [session] = data["sessions"]
        self.assertEqual(session["client"], "127.0.0.5:40000")
        self.assertEqual(session["server"], A)
        self.assertEqual(session["path"], "/live")
        self.assertEqual(session["messages_up"], 10)
        self.assertEqual(data["upstreams"][0]["server"], A)
        self.assertEqual(data["stats"]["sessions_active"], 1)
        self.assertAlmostEqual(data["stats"]["rates"]["messages_up"], 1.0)
        self.assertEqual(len(data["history"]), 11)
        self.assertEqual(data["history"][-1]["active"], 1)
        self.assertEqual(data["history"][-1]["messages_down"], 1.0)

    def test_status_json_limit(self) -> None:
        """?limit=N lists the N busiest sessions; ?history=0 leaves the history out."""
        busy = self.net.client("/")
        self.net.client("/")
        busy.proto.sendMessage(b"x")
        self.net.flush()
        _, body = get(self.root, "/status.json?limit=1&history=0")
        data = json.loads(body)
        self.assertEqual(len(data["sessions"]), 1)
        self.assertEqual(data["sessions"][0]["messages_up"], 1)
        self.assertEqual(data["sessions_total"], 2)
        self.assertNotIn("history", data)

    def test_history_bounded(self) -> None:
        """The sampler keeps 15 minutes of samples, no more."""
        for _ in range(20 * 60):
            self.net.clock.advance(1)
        _, body = get(self.root, "/status.json")
        history = json.loads(body)["history"]
        self.assertEqual(len(history), 15 * 60 + 1)
        self.assertEqual(history[-1]["t"] - history[0]["t"], 15 * 60)

    def test_page_and_static_files(self) -> None:
        """/ is the status page (with a strict CSP); its script and styles are served."""
        request, body = get(self.root, "/")
        self.assertIn(b'id="chart-active"', body)
        self.assertIn(b'<script src="/static/app.js"', body)
        csp = request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"default-src 'self'", csp)
        self.assertNotIn(b"http", body.replace(b"http-equiv", b""))  # nothing from a CDN

    def test_service(self) -> None:
        """The admin listener is a strports service on its endpoint."""
        svc: Any = admin_service(
            configmod.AdminSpec("tcp:0:interface=127.0.0.1"), self.net.gateway, self.sampler
        )
        self.assertEqual(svc.endpoint._interface, "127.0.0.1")
        self.assertIsNotNone(MemoryReactorClock)


class ReadyTests(SynchronousTestCase):
    """``/ready``: whether the gate should get new sessions, for probes and load balancers."""

    def setUp(self) -> None:
        config = configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [
                    {"path": "/chat", "upstream": "chat"},
                    {"path": "/feed", "upstream": "feed"},
                    {"path": "/", "upstream": "chat"},
                ],
                "upstream": {
                    "chat": {"servers": [{"url": A}, {"url": B}]},
                    "feed": {"servers": [{"url": C}]},
                },
            },
            "test.toml",
        )
        self.net = Network(config, {A: BackendFactory(), B: BackendFactory(), C: BackendFactory()})
        self.gateway = self.net.gateway
        self.listening = Listening(Notifier(None))
        self.root = admin_resource(LocalView(self.gateway), None, self.listening)

    def ready(self, root: Any = None) -> tuple[int, str]:
        request, body = get(root or self.root, "/ready")
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"]
        )
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])
        return request.responseCode or 200, body.decode()

    def server(self, upstream: str, url: str) -> Any:
        return next(s for s in self.gateway.upstreams[upstream].servers if s.url == url)

    def test_lifecycle(self) -> None:
        """503 until the listeners listen, 200 while they do, 503 from the moment the gate stops."""
        self.assertEqual(self.ready(), (503, "not ready: gate starting\n"))
        self.listening.startService()
        self.assertEqual(self.ready(), (200, "ready\n"))
        self.listening.stopService()
        self.assertEqual(self.ready(), (503, "not ready: gate stopping\n"))

    def test_shutdown(self) -> None:
        """A gateway closing its sessions (SIGTERM) is not ready, even before the marker stops."""
        self.listening.startService()
        self.gateway.shutdown()
        self.assertEqual(self.ready(), (503, "not ready: gate stopping\n"))

    def test_every_routed_upstream_needs_a_server_up(self) -> None:
        """
        One server up per routed upstream is enough; an upstream with every server down or
        draining makes the gate not ready, and is named once however many routes use it.
        """
        self.listening.startService()
        chat = self.gateway.upstreams["chat"]
        chat.set_healthy(self.server("chat", A), False, "test")
        self.assertEqual(self.ready(), (200, "ready\n"))
        chat.set_draining(self.server("chat", B), True)
        self.assertEqual(self.ready(), (503, "not ready: upstream chat: no server up\n"))
        feed = self.gateway.upstreams["feed"]
        feed.set_healthy(self.server("feed", C), False, "test")
        self.assertEqual(
            self.ready(),
            (503, "not ready: upstream chat: no server up; upstream feed: no server up\n"),
        )
        chat.set_draining(self.server("chat", B), False)
        feed.set_healthy(self.server("feed", C), True, "test")
        self.assertEqual(self.ready(), (200, "ready\n"))

    def test_passive_down_comes_back(self) -> None:
        """A server marked down by failed attempts counts again once its fail_timeout is over."""
        self.listening.startService()
        feed = self.gateway.upstreams["feed"]
        feed.set_healthy(self.server("feed", C), False, "test")
        self.assertEqual(self.ready()[0], 503)
        feed.set_healthy(self.server("feed", C), True, "test")
        chat = self.gateway.upstreams["chat"]
        for url in (A, B):
            chat.failed(self.server("chat", url))
        self.assertEqual(self.ready(), (503, "not ready: upstream chat: no server up\n"))
        self.net.advance(chat.spec.fail_timeout + 1)
        self.assertEqual(self.ready(), (200, "ready\n"))

    def test_workers_aggregate(self) -> None:
        """With workers, the parent answers from its workers' snapshots: no report, not ready."""
        aggregate = Aggregate(self.gateway.config, self.net.clock, lambda *a, **k: None, None)  # type: ignore[arg-type]
        root = admin_resource(aggregate, None, self.listening)
        self.listening.startService()
        self.assertEqual(
            self.ready(root),
            (503, "not ready: upstream chat: no server up; upstream feed: no server up\n"),
        )
        control = WorkerControl(SimpleNamespace(gateway=self.gateway), stop=lambda: None)
        aggregate.update(1, control.call_snapshot())
        self.assertEqual(self.ready(root), (200, "ready\n"))
        self.gateway.upstreams["feed"].set_healthy(self.server("feed", C), False, "test")
        aggregate.update(1, control.call_snapshot())
        self.assertEqual(self.ready(root), (503, "not ready: upstream feed: no server up\n"))

    def test_service_passes_the_marker(self) -> None:
        """admin_service serves /ready from the marker it is given."""
        svc: Any = admin_service(
            configmod.AdminSpec("tcp:0:interface=127.0.0.1"),
            LocalView(self.gateway),
            None,
            self.listening,
        )
        self.assertEqual(self.ready(svc.factory.resource), (503, "not ready: gate starting\n"))


class TokenTests(SynchronousTestCase):
    """[admin] token_file: every path but /ready asks for the bearer token."""

    def setUp(self) -> None:
        net = Network(make_config([A]), {A: BackendFactory()})
        self.root = admin_resource(LocalView(net.gateway), None, None, token="s3cret")

    def fetch(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        headers = {"authorization": authorization} if authorization is not None else None
        request, body = get(self.root, path, headers)
        return request.responseCode or 200, body

    def test_refused_without_the_token(self) -> None:
        for path in ("/", "/metrics", "/status.json", "/static/app.js"):
            for given in (None, "Bearer wrong", "Basic czNjcmV0", "s3cret"):
                code, body = self.fetch(path, given)
                self.assertEqual((code, body), (401, b"a valid bearer token is required\n"))

    def test_served_with_the_token(self) -> None:
        code, body = self.fetch("/metrics", "Bearer s3cret")
        self.assertEqual(code, 200)
        self.assertIn(b"wsgate_sessions_active 0", body)
        self.assertEqual(self.fetch("/status.json", "bearer  s3cret ")[0], 200)

    def test_ready_needs_no_token(self) -> None:
        """Probes (kubelet, load balancers) ask /ready without credentials."""
        self.assertEqual(self.fetch("/ready", None), (200, b"ready\n"))

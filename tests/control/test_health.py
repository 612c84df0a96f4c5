"""
Active health checks on a test clock (rise/fall transitions, logging, counting, timeouts) and the
automatic rebalance.  The real probes against loopback servers are in ``tests/e2e/test_health.py``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wsgate.config import HealthSpec, ServerSpec, UpstreamSpec
from wsgate.control.health import AutoRebalance, HealthChecker
from wsgate.core.upstream import Server, Upstream

A, B = "ws://a.test:1", "ws://b.test:2"


def upstream(clock: task.Clock, **health: Any) -> Upstream:
    spec = UpstreamSpec(
        name="u",
        servers=(ServerSpec(url=A), ServerSpec(url=B)),
        health=HealthSpec(**{"interval": 5.0, "timeout": 2.0, "rise": 2, "fall": 3, **health}),
    )
    return Upstream(spec, clock)


class FakeProbe:
    """Answers each probe by the server's current verdict: True, False or "hang"."""

    def __init__(self) -> None:
        self.verdict: dict[str, Any] = {A: True, B: True}
        self.calls = 0

    def __call__(self, server: Server, spec: HealthSpec) -> Deferred:
        self.calls += 1
        verdict = self.verdict[server.url]
        if verdict == "hang":
            return Deferred()
        return succeed(None) if verdict else fail(ConnectionError("refused"))


class HealthCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.upstream = upstream(self.clock)
        self.probe = FakeProbe()
        self.checker = HealthChecker(lambda: self.upstream, self.probe, self.clock)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.checker.startService()
        self.addCleanup(self.checker.stopService)

    def names(self) -> list[str]:
        return [
            e["log_format"].split()[0]
            for e in self.events
            if e.get("log_format", "").startswith("server_")
        ]

    def test_fall_and_rise(self) -> None:
        """
        fall = 3: the third failed check in a row takes a server down (one server_down event,
        counted); rise = 2: the second passed check brings it back (server_up).
        """
        a = self.upstream.servers[0]
        self.probe.verdict[A] = False
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(a.state, "up")
        self.clock.advance(5)  # third round: t = 10 + the first at t = 0
        self.assertEqual(a.state, "down")
        self.assertEqual(self.names(), ["server_down"])
        self.assertEqual(self.upstream.counters["servers.down"], 1)
        self.assertIs(self.upstream.pick(), self.upstream.servers[1])
        event = [e for e in self.events if e.get("log_format", "").startswith("server_")][0]
        self.assertEqual((event["upstream"], event["server"], event["source"]), ("u", A, "active"))
        self.probe.verdict[A] = True
        self.clock.advance(5)
        self.assertEqual(a.state, "down")
        self.clock.advance(5)
        self.assertEqual(a.state, "up")
        self.assertEqual(self.names(), ["server_down", "server_up"])
        self.assertEqual(a.last_check, 25.0)

    def test_timeout_is_a_failure(self) -> None:
        """A probe that does not answer within timeout counts as failed."""
        self.probe.verdict[B] = "hang"  # from the round at t = 5 on (t = 0 passed)
        for _ in range(3):
            self.clock.advance(5)
            self.assertEqual(self.upstream.servers[1].state, "up")
        self.clock.advance(2)
        self.assertEqual(self.upstream.servers[1].state, "down")

    def test_stop_cancels(self) -> None:
        """stopService cancels the next round and pending probes."""
        self.probe.verdict[B] = "hang"
        self.clock.advance(5)
        self.checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        calls = self.probe.calls
        self.clock.advance(60)
        self.assertEqual(self.probe.calls, calls)

    def test_passive_and_active(self) -> None:
        """A server brought back by the checks starts with a clean passive record."""
        a = self.upstream.servers[0]
        self.upstream.failed(a)
        self.assertEqual(a.state, "down")
        self.upstream.set_healthy(a, False, "test")
        self.upstream.set_healthy(a, True, "test")
        self.assertEqual((a.state, a.fails), ("up", 0))


class AutoRebalanceTests(SynchronousTestCase):
    def test_threshold(self) -> None:
        """Rebalances only when the most loaded server is above threshold times its share."""
        clock = task.Clock()
        spec = UpstreamSpec(
            name="u",
            servers=(ServerSpec(url=A), ServerSpec(url=B)),
            rebalance_threshold=1.5,
            rebalance_interval=10.0,
        )
        u = Upstream(spec, clock)
        calls: list[tuple[str, float]] = []

        def rebalance(name: str, window: float) -> int:
            calls.append((name, window))
            u.start_rebalance(window)
            return 0

        service = AutoRebalance("u", lambda: u, rebalance, clock)
        service.startService()
        self.addCleanup(service.stopService)
        u.servers[0].active, u.servers[1].active = 14, 6  # 1.4 times the share
        clock.advance(10)
        self.assertEqual(calls, [])
        u.servers[0].active = 20  # 1.54
        clock.advance(10)
        self.assertEqual(calls, [("u", 10.0)])
        clock.advance(10)  # still settling
        self.assertEqual(len(calls), 1)


def _upstream_services(top: Any) -> list[str]:
    """The kinds of the per-upstream services of a gate's service tree."""
    (services,) = [s for s in top if type(s).__name__ == "_UpstreamServices"]
    return sorted(type(s).__name__ for s in services)


_TREE = """
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
[[route]]
upstream = "checked"
[upstream.checked]
servers = [ {{ url = "ws://127.0.0.1:1" }} ]
rebalance_threshold = 1.5
{checked}
[upstream.plain]
servers = [ {{ url = "ws://127.0.0.1:2" }} ]
{added}
"""


class ServiceTreeTests(SynchronousTestCase):
    def test_services_per_upstream(self) -> None:
        """Per upstream as configured, a HealthChecker and an AutoRebalance; reload adds and stops them."""
        from wsgate import config as configmod
        from wsgate.service import makeService

        path = self.mktemp()
        health = '[upstream.{name}.health]\ntype = "websocket"\npath = "/health"'
        with open(path, "w") as f:
            f.write(_TREE.format(checked=health.format(name="checked"), added=""))
        from twisted.internet.testing import MemoryReactorClock

        top = makeService(
            {"gate_config": configmod.load(path), "config": path}, MemoryReactorClock()
        )
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(_upstream_services(top), ["AutoRebalance", "HealthChecker"])
        checker = next(s for s in top if type(s).__name__ == "_UpstreamServices")
        (old,) = [s for s in checker if isinstance(s, HealthChecker)]

        # a reload that moves the health check from one upstream to another, new one
        added = '[upstream.added]\nservers = [ { url = "ws://127.0.0.1:3" } ]\n' + health.format(
            name="added"
        )
        with open(path, "w") as f:
            f.write(_TREE.format(checked="", added=added))
        top.reload()
        self.assertEqual(_upstream_services(top), ["AutoRebalance", "HealthChecker"])
        (new,) = [s for s in checker if isinstance(s, HealthChecker)]
        self.assertIsNot(new, old)
        self.assertFalse(old.running)
        self.assertTrue(new.running)
        self.assertEqual(new.find_upstream().spec.name, "added")

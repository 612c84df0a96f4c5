"""
Upstreams through the gate, in memory: failover with passive health, 503 when every server is
draining or full, draining with a deadline and undraining, weights set at run time, rebalance
after a server is added (round robin and hash), and a hash key keeping a room on one server.
Choosing a server on its own is in ``tests/core/test_upstream.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, upgrade_request
from wsgate import config as configmod

A, B, C = "ws://a.test:1", "ws://b.test:2", "ws://c.test:3"


def gate_config(servers: list[str], **upstream_options: Any) -> Any:
    return configmod.parse(
        {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u"}],
            "upstream": {"u": {"servers": [{"url": u} for u in servers], **upstream_options}},
        },
        "test.toml",
    )


def by_server(net: Network) -> dict[str, int]:
    return {s.url: s.active for s in net.gateway.upstreams["u"].servers}


class GatewayTests(SynchronousTestCase):
    def test_failover_passive(self) -> None:
        """
        One of three servers refuses: 30 sessions in a row all open, the dead server is tried
        once (then it is down for fail_timeout) and the log shows that one failed attempt.
        """
        backends = {A: "refuse", B: BackendFactory(), C: BackendFactory()}
        net = Network(gate_config([A, B, C]), backends)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clients = [net.client() for _ in range(30)]
        self.assertTrue(all(c.opened for c in clients))
        failed = [e for e in events if e.get("log_format", "").startswith("backend_attempt")]
        self.assertEqual(len(failed), 1)
        self.assertEqual(net.gateway.upstreams["u"].servers[0].state, "down")
        self.assertEqual(net.gateway.counters["servers.down"], 1)
        self.assertEqual(by_server(net), {A: 0, B: 15, C: 15})

    def test_all_unavailable_503(self) -> None:
        """Every server draining or full: the client gets 503 and no backend is tried."""
        net = Network(gate_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        net.gateway.drain(A)
        net.gateway.upstreams["u"].servers[1].max_conns = 1
        self.assertTrue(net.client().opened)
        self.assertEqual(net.raw(upgrade_request()).status, 503)
        net.gateway.undrain(A)
        self.assertTrue(net.client().opened)

    def test_drain_with_deadline(self) -> None:
        """
        drain(A, deadline=30, window=3): A gets no new sessions, its live ones continue until
        the window before the deadline, are then closed with 1001 one per second, and the last
        at the deadline exactly: none is left after it.
        """
        backends = {A: BackendFactory(), B: BackendFactory()}
        net = Network(gate_config([A, B]), backends)
        clients = [net.client() for _ in range(6)]
        self.assertEqual(by_server(net), {A: 3, B: 3})
        self.assertEqual(net.gateway.drain(A, deadline=30, window=3), 3)
        self.assertEqual(net.gateway.upstreams["u"].servers[0].state, "draining")
        later = [net.client() for _ in range(4)]
        self.assertEqual(by_server(net), {A: 3, B: 7})
        net.advance(27)
        self.assertEqual(by_server(net)[A], 3)
        drops = []
        for step in range(1, 61):  # until 33 s
            before = by_server(net)[A]
            net.advance(0.05)
            if by_server(net)[A] < before:
                drops.append(round(27 + step / 20, 2))
        self.assertEqual(by_server(net), {A: 0, B: 7})
        self.assertEqual(sorted({c.close[0] for c in clients + later if c.close}), [1001])
        self.assertEqual(drops, [28, 29, 30])

    def test_drain_deadline_is_exact(self) -> None:
        """
        drain(A, 5) with the default 10 s window: every session of A is closed by 5 s on the
        clock (the spread fits inside the deadline), the last one at 5 s exactly, not 5 s later.
        """
        net = Network(gate_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        [net.client() for _ in range(4)]
        net.gateway.drain(A, 5)
        net.advance(4.99)
        self.assertEqual(by_server(net)[A], 1)
        net.advance(0.01)
        self.assertEqual(by_server(net), {A: 0, B: 2})

    def test_undrain_cancels_deadline(self) -> None:
        """undrain() before the deadline keeps the sessions and brings new ones back."""
        net = Network(gate_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        [net.client() for _ in range(2)]
        net.gateway.drain(A, deadline=10)
        net.gateway.undrain(A)
        net.advance(20)
        self.assertEqual(by_server(net), {A: 1, B: 1})
        with self.assertRaises(KeyError):
            net.gateway.drain("ws://nope.test:1")

    def test_set_weight(self) -> None:
        """set_weight(B, 3) sends three of every four new sessions to B."""
        net = Network(gate_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        net.gateway.set_weight(B, 3)
        [net.client() for _ in range(8)]
        self.assertEqual(by_server(net), {A: 2, B: 6})
        with self.assertRaises(ValueError):
            net.gateway.set_weight(B, 0)

    def test_rebalance(self) -> None:
        """
        120 reconnecting clients on two servers, a third added, rebalance(): every closed client
        got 1012, and once they have reconnected each server holds 40 +- 4 sessions.
        """
        backends: dict[str, Any] = {A: BackendFactory(), B: BackendFactory()}
        net = Network(gate_config([A, B]), backends)
        clients = [net.client() for _ in range(120)]
        self.assertEqual(by_server(net), {A: 60, B: 60})
        backends[C] = BackendFactory()
        upstream = net.gateway.upstreams["u"]
        upstream.update(gate_config([A, B, C]).upstreams["u"])
        closing = net.gateway.rebalance("u", window=10)
        self.assertEqual(closing, 40)
        codes = []
        for _ in range(120):  # 12 s in steps of 0.1 s; a closed client reconnects at once
            net.advance(0.1)
            for i, c in enumerate(clients):
                if c.close is not None:
                    codes.append(c.close[0])
                    clients[i] = net.client()
        self.assertEqual(codes, [1012] * 40)
        counts = by_server(net)
        self.assertEqual(sum(counts.values()), 120)
        for count in counts.values():
            self.assertLessEqual(abs(count - 40), 4)
        self.assertEqual(counts, {A: 40, B: 40, C: 40})

    def test_rebalance_hash(self) -> None:
        """
        With hash, rebalance() after adding a server closes exactly the sessions whose key now
        belongs to it (1012), and they reconnect to it; the other sessions stay.
        """
        backends: dict[str, Any] = {A: BackendFactory(), B: BackendFactory()}
        config = gate_config([A, B], balance="hash", key="query:room")
        net = Network(config, backends)
        clients = [net.client(f"/chat?room={i}") for i in range(30)]
        backends[C] = BackendFactory()
        upstream = net.gateway.upstreams["u"]
        upstream.update(gate_config([A, B, C], balance="hash", key="query:room").upstreams["u"])
        owners = {i: upstream.owner(str(i)) for i in range(30)}
        moving = sum(owner is upstream.find(C) for owner in owners.values())
        self.assertGreater(moving, 5)
        self.assertEqual(net.gateway.rebalance("u", window=0), moving)
        net.flush()
        closed = [i for i, c in enumerate(clients) if c.close is not None]
        self.assertEqual(len(closed), moving)
        self.assertTrue(all(clients[i].close[0] == 1012 for i in closed))  # type: ignore[index]
        for i in closed:
            net.client(f"/chat?room={i}")
        self.assertEqual(by_server(net)[C], moving)
        self.assertEqual(sum(by_server(net).values()), 30)

    def test_hash_through_gate(self) -> None:
        """With key = "query:room", every client of a room lands on the same server."""
        servers = {A: BackendFactory(), B: BackendFactory(), C: BackendFactory()}
        net = Network(gate_config([A, B, C], balance="hash", key="query:room"), servers)
        for room in range(6):
            for _ in range(3):
                self.assertTrue(net.client(f"/chat?room={room}").opened)
        for backend in servers.values():
            rooms = Counter(r.params["room"][0] for r in backend.requests)
            self.assertTrue(all(n == 3 for n in rooms.values()), rooms)

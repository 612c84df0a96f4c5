"""
``workers = N`` in memory: the ``workers`` key, the control channel, and the parent's Aggregate
over two real Gateways (each behind its own WorkerControl and Channel, wired in memory) as the
console, ``/metrics`` and ``/status.json`` read it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import A, B, Terminal, TwoWorkersCase, channel_pair
from wsgate import config as configmod
from wsgate.core import metrics
from wsgate.ops import status
from wsgate.ops.console import Console
from wsgate.ops.rows import qualified_id, split_id
from wsgate.ops.view import find_server
from wsgate.process.channel import Channel, RemoteError
from wsgate.process.pool import WorkerPool
from wsgate.service import makeService


def _config(workers: object = None, endpoint: str = "tcp:8020") -> configmod.Config:
    data: dict[str, Any] = {
        "listen": [{"endpoint": endpoint}],
        "route": [{"path": "/", "upstream": "u"}],
        "upstream": {"u": {"servers": [{"url": A}]}},
    }
    if workers is not None:
        data["workers"] = workers
    return configmod.parse(data, "w.toml")


class WorkersConfigTests(SynchronousTestCase):
    def test_default_is_one(self) -> None:
        """Without ``workers`` the gate is one process, as before."""
        self.assertEqual(_config().workers, 1)

    def test_number_and_auto(self) -> None:
        """A whole number is taken as it is; "auto" is the number of cores."""
        self.assertEqual(_config(4).workers, 4)
        self.assertEqual(_config("auto").workers, os.cpu_count() or 1)

    def test_invalid(self) -> None:
        """0, negative numbers, booleans and other strings are refused with the key's name."""
        for bad in (0, -2, True, "many", 1.5):
            with self.assertRaises(configmod.ConfigError) as e:
                _config(bad)
            self.assertIn("w.toml: workers: ", str(e.exception), bad)

    def test_unshareable_listener(self) -> None:
        """With workers > 1 a listener must be one the parent can bind and hand over."""
        with self.assertRaises(configmod.ConfigError) as e:
            _config(2, endpoint="ssl:8443:privateKey=k.pem")
        self.assertIn("w.toml: listen[0].endpoint: with workers > 1", str(e.exception))
        self.assertEqual(_config(2, endpoint="haproxy:tcp:8020").workers, 2)

    def test_make_service_parent(self) -> None:
        """makeService with workers = 2 builds the parent: a WorkerPool and no Gateway of its own."""
        config = _config(2)
        top = makeService({"gate_config": config, "config": "w.toml"}, MemoryReactorClock())
        services = list(IServiceCollection(top))
        pools = [s for s in services if isinstance(s, WorkerPool)]
        self.assertEqual(len(pools), 1)
        self.assertEqual(pools[0].count, 2)
        self.assertFalse(hasattr(top, "gateway"))
        self.assertEqual(top.reload, pools[0].reload)

    def test_worker_command(self) -> None:
        """A worker is `python -m wsgate.worker INDEX CONFIG LISTENERS` with fds and families."""
        pool = WorkerPool(_config(2), "/etc/w.toml", MemoryReactorClock())
        pool.listeners = [{"fd": 7, "family": 2, "endpoint": "tcp:8020"}]
        argv = pool.command(2)
        self.assertEqual(argv[1:5], ["-m", "wsgate.worker", "2", "/etc/w.toml"])
        self.assertEqual(json.loads(argv[5]), pool.listeners)


class ChannelTests(SynchronousTestCase):
    def test_request_answer(self) -> None:
        """A request gets the answer of the other side's handler."""
        parent, _ = channel_pair(Clock(), lambda call, args: {"call": call, **args})
        results: list[Any] = []
        parent.request("echo", x=1).addCallback(results.append)
        self.assertEqual(results, [{"call": "echo", "x": 1}])

    def test_error_answer(self) -> None:
        """An exception in the handler fails the request with its message."""

        def answer(call: str, args: dict[str, Any]) -> None:
            raise LookupError("no live session 9")

        parent, _ = channel_pair(Clock(), answer)
        failure = self.failureResultOf(parent.request("kick"), LookupError)
        self.assertEqual(str(failure.value), "no live session 9")

    def test_other_error_answer(self) -> None:
        """An error the parent has no kind for arrives as a RemoteError with its message."""

        def answer(call: str, args: dict[str, Any]) -> None:
            raise RuntimeError("broken")

        parent, _ = channel_pair(Clock(), answer)
        failure = self.failureResultOf(parent.request("kick"), RemoteError)
        self.assertEqual(str(failure.value), "broken")

    def test_split_lines_and_events(self) -> None:
        """Messages split across reads are put back together; messages without id are events."""
        events: list[Any] = []
        channel = Channel(lambda data: None, Clock(), on_event=events.append)
        data = b'{"log":"one"}\n{"log":"two"}\n'
        for i in range(len(data)):
            channel.data_received(data[i : i + 1])
        self.assertEqual(events, [{"log": "one"}, {"log": "two"}])

    def test_timeout_and_lost(self) -> None:
        """Unanswered requests time out; when the stream ends, pending ones fail at once."""
        clock = Clock()
        channel = Channel(lambda data: None, clock)
        slow = channel.request("snapshot", timeout=5)
        clock.advance(5)
        self.failureResultOf(slow)
        pending = channel.request("snapshot")
        channel.lost()
        self.failureResultOf(pending, RemoteError)
        self.failureResultOf(channel.request("snapshot"), RemoteError)


class AggregateTests(TwoWorkersCase):
    """The parent's view of two workers, each a real Gateway reached through a Channel."""

    def open(self, worker: int, count: int) -> list[Any]:
        clients = []
        for _ in range(count):
            client = self.workers[worker].net.client("/")
            client.proto.sendMessage(b"hello")
            clients.append(client)
        self.workers[worker].net.flush()
        return clients

    def test_sessions_of_every_worker(self) -> None:
        """Sessions of both workers are listed, with worker-qualified ids and a worker field."""
        self.open(1, 2)
        self.open(2, 1)
        self.poll()
        rows = status.sessions(self.aggregate)
        self.assertEqual(sorted(r["id"] for r in rows), ["1:1", "1:2", "2:1"])
        self.assertEqual(sorted(r["worker"] for r in rows), [1, 1, 2])
        self.assertEqual(len(self.aggregate.sessions), 3)
        self.assertEqual(self.aggregate.session_count(), 3)
        self.assertEqual(
            [w["sessions"] for w in self.aggregate.workers()], [2, 1], self.aggregate.workers()
        )

    def test_counters_histograms_and_metrics_sum(self) -> None:
        """Counters, close counts and histograms are the sums of the workers' (as /metrics shows)."""
        first = self.open(1, 2)
        self.open(2, 1)
        for client in first:
            client.proto.sendClose(1000)
        self.workers[1].net.flush()
        self.poll()
        stats = status.stats(self.aggregate)
        self.assertEqual(stats["sessions_opened"], 3)
        self.assertEqual(stats["sessions_closed"], 2)
        self.assertEqual(stats["sessions_active"], 1)
        self.assertEqual(stats["messages_up"], 3)
        self.assertEqual(stats["handshakes"], {"ok": 3})
        self.assertEqual(self.aggregate.connect_time.count, 3)
        self.assertEqual(self.aggregate.session_duration.count, 2)
        text = metrics.render(
            status.snapshot(self.aggregate, None, limit=0, history=False),
            self.aggregate.closed.items(),
            self.aggregate.connect_time,
            self.aggregate.session_duration,
            "test",
        )
        self.assertIn("wsgate_sessions_opened_total 3\n", text)
        self.assertIn('wsgate_messages_total{direction="up"} 3\n', text)
        self.assertIn("wsgate_backend_connect_seconds_count 3\n", text)
        self.assertEqual(sum(self.aggregate.closed.values()), 2)
        self.assertEqual(text.count('code="1000"} 1\n'), 2)

    def test_servers_merged(self) -> None:
        """A server is one row: active sessions summed, draining if any worker drains it."""
        self.open(1, 2)
        self.open(2, 2)
        self.workers[2].gateway.drain(A, upstream="u")
        self.poll()
        rows = {r["server"]: r for r in status.upstreams(self.aggregate, 0.0)}
        self.assertEqual(set(rows), {A, B})
        self.assertEqual(rows[A]["active"] + rows[B]["active"], 4)
        self.assertEqual(rows[A]["state"], "draining")
        self.assertEqual(rows[B]["state"], "up")
        self.assertEqual(find_server(self.aggregate, "a.test"), ("u", A))

    def test_worker_gone(self) -> None:
        """A worker that is gone no longer counts."""
        self.open(1, 1)
        self.open(2, 1)
        self.poll()
        self.aggregate.update(2, None)
        self.assertEqual([r["id"] for r in status.sessions(self.aggregate)], ["1:1"])

    def test_console_kick_reaches_the_right_worker(self) -> None:
        """gate.kick("2:1") closes session 1 of worker 2 and only that one."""
        clients = {w: self.open(w, 1)[0] for w in (1, 2)}
        self.poll()
        term = Terminal(Console(self.aggregate, self.clock))
        screen = term.type("gate.sessions()")
        self.assertIn("2:1", screen)
        self.assertIn("(2 sessions)", screen)
        screen = term.type('gate.kick("2:1", 4000, "bye")')
        self.assertIn("closing session 2:1 with 4000", screen)
        for worker in self.workers.values():
            worker.net.flush()
        self.assertEqual(clients[2].close, (4000, "bye"))
        self.assertIsNone(clients[1].close)
        screen = term.type("gate.kick(1)")
        self.assertIn("session ids are WORKER:ID", screen)

    def test_console_drain_and_weight_reach_every_worker(self) -> None:
        """gate.drain and gate.weight act in every worker."""
        self.open(1, 1)
        self.poll()
        term = Terminal(Console(self.aggregate, self.clock))
        term.type('gate.drain("a.test")')
        term.type('gate.weight("b.test", 3)')
        for worker in self.workers.values():
            upstream = worker.gateway.upstreams["u"]
            servers = {s.url: s for s in upstream.servers}
            self.assertTrue(servers[A].draining)
            self.assertEqual(servers[B].weight, 3)
        term.type('gate.undrain("a.test")')
        for worker in self.workers.values():
            self.assertFalse({s.url: s for s in worker.gateway.upstreams["u"].servers}[A].draining)

    def test_session_detail_from_its_worker(self) -> None:
        """gate.session("1:1") shows the detail that worker 1 sends (request headers included)."""
        self.open(1, 1)
        self.poll()
        details: list[dict[str, Any]] = []
        self.aggregate.session("1:1").addCallback(details.append)
        self.assertEqual(details[0]["id"], "1:1")
        self.assertIn("request_headers", details[0])
        term = Terminal(Console(self.aggregate, self.clock))
        screen = term.type('gate.session("1:1")')
        self.assertIn("forwarded headers:", screen)

    def test_ids(self) -> None:
        """Worker-qualified ids round-trip; anything else names the expected form."""
        self.assertEqual(split_id(qualified_id(3, 41)), (3, 41))
        for bad in (5, "5", "a:b", "1:"):
            with self.assertRaises(LookupError):
                split_id(bad)

    def test_snapshot_is_json(self) -> None:
        """A worker's snapshot crosses the channel as JSON without loss."""
        self.open(1, 1)
        snapshot = self.workers[1].control("snapshot", {})
        self.assertEqual(json.loads(json.dumps(snapshot)), snapshot)
        self.assertIsNone(self.workers[1].control("snapshot", {"rows": False})["sessions"])

    def test_reload_and_stop_calls(self) -> None:
        """The worker side of reload and stop calls its service tree."""
        reloaded = self.workers[1].control("reload", {})
        self.assertEqual(self.successResultOf(reloaded), ["nothing changed"])
        self.workers[1].control("stop", {})
        self.assertEqual((self.workers[1].reloads, self.workers[1].stops), (1, 1))

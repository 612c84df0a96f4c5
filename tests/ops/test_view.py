"""
The operations view (``wsgate.ops.view.GateView``): one suite run against both implementations,
:class:`~wsgate.ops.view.LocalView` over one Gateway, and the workers' parent's
:class:`~wsgate.process.aggregate.Aggregate` over two in-memory workers (each a real Gateway behind
its WorkerControl and Channel).  Also the push queue of a relay (a message in flight) and the
run-time changes a reload resets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import A, B, BackendFactory, Network, TwoWorkersCase, make_config
from wsgate.config import ConfigError, parse
from wsgate.core.frames import message_frame
from wsgate.core.upstream import Upstream, runtime_resets
from wsgate.dataplane.bridge import PUSH_QUEUE
from wsgate.dataplane.tap import TAP_REFRESH
from wsgate.ops import status
from wsgate.ops.view import MAX_PUSH, GateView, LocalView, find_server


class _Listener:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.ended: list[str] = []

    def tapped(self, messages: list[Any], dropped: int) -> None:
        self.messages += messages

    def tap_ended(self, why: str) -> None:
        self.ended.append(why)


class ViewContract:
    """What every GateView does; a subclass provides the view and its sessions."""

    view: GateView

    def open(self) -> Any:
        """A client session through the gate (in the first worker); settled."""
        raise NotImplementedError

    def settle(self) -> None:
        """Let the network run and the view see the result."""
        raise NotImplementedError

    def advance(self, seconds: float) -> None:
        raise NotImplementedError

    def gateways(self) -> list[Any]:
        raise NotImplementedError

    def result(self, d: Deferred) -> Any:
        self.settle()
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def failure(self, d: Deferred, *errors: type[Exception]) -> Any:
        self.settle()
        return self.failureResultOf(d, *errors)  # type: ignore[attr-defined]

    def only_id(self) -> object:
        rows = self.view.session_rows()
        self.assertEqual(len(rows), 1, rows)  # type: ignore[attr-defined]
        return rows[0]["id"]

    def test_sessions_and_detail(self) -> None:
        """Rows, count and one session in full; an unknown id is a LookupError."""
        client = self.open()
        client.proto.sendMessage(b"hello")
        self.settle()
        sid = self.only_id()
        self.assertEqual(self.view.session_count(), 1)  # type: ignore[attr-defined]
        row = status.sessions(self.view)[0]
        self.assertEqual((row["route"], row["messages_up"]), ("/", 1))  # type: ignore[attr-defined]
        detail = self.result(self.view.session(sid))
        self.assertEqual(str(detail["id"]), str(sid))  # type: ignore[attr-defined]
        self.assertIn("request_headers", detail)  # type: ignore[attr-defined]
        self.failure(self.view.session("9:99"), LookupError)
        totals = self.view.totals()
        self.assertEqual((totals["messages_up"], totals["messages_down"]), (1, 1))  # type: ignore[attr-defined]

    def test_kick(self) -> None:
        """kick closes the client with the code and reason; a code that cannot be sent is a
        ValueError and changes nothing."""
        client = self.open()
        sid = self.only_id()
        self.failure(self.view.kick(sid, 1006, "", "test"), ValueError)
        self.assertIsNone(client.close)  # type: ignore[attr-defined]
        row = self.result(self.view.kick(sid, 4000, "bye", "test"))
        self.assertEqual(str(row["id"]), str(sid))  # type: ignore[attr-defined]
        self.settle()
        self.assertEqual(client.close, (4000, "bye"))  # type: ignore[attr-defined]
        self.failure(self.view.kick("1:999", 4000, "", "test"), LookupError)

    def test_push(self) -> None:
        """push sends the client text and binary messages, counted among the messages and bytes
        down; bad ones are ValueErrors."""
        client = self.open()
        sid = self.only_id()
        before = self.view.session_rows()[0]
        answer = self.result(self.view.push(sid, b"from the gate", False))
        self.assertEqual((answer["size"], answer["queued"]), (13, False))  # type: ignore[attr-defined]
        self.result(self.view.push(sid, b"\x00\xff", True))
        self.assertEqual(client.received[-2:], [(b"from the gate", False), (b"\x00\xff", True)])  # type: ignore[attr-defined]
        self.settle()
        after = self.view.session_rows()[0]
        self.assertEqual(
            (
                after["messages_down"] - before["messages_down"],
                after["bytes_down"] - before["bytes_down"],
            ),
            (2, 15),
        )
        self.failure(self.view.push(sid, b"\xff", False), ValueError)
        self.failure(self.view.push(sid, b"x" * (MAX_PUSH + 1), True), ValueError)
        self.failure(self.view.push("1:999", b"x", False), LookupError)

    def test_servers_named_per_upstream(self) -> None:
        """drain, undrain, weight, add and remove act on the named upstream's server."""
        self.open()
        count = self.result(self.view.drain("u", A))
        self.assertIn(count, (0, 1))  # type: ignore[attr-defined]
        self.settle()
        rows = {r["server"]: r for r in self.view.server_rows(0.0)}
        self.assertEqual(rows[A]["state"], "draining")  # type: ignore[attr-defined]
        self.result(self.view.undrain("u", A))
        self.result(self.view.set_weight("u", B, 3))
        self.result(self.view.add_server("u", "ws://c.test:3", 2))
        self.settle()
        rows = {r["server"]: r for r in self.view.server_rows(0.0)}
        self.assertEqual(  # type: ignore[attr-defined]
            (rows[A]["state"], rows[B]["weight"], rows["ws://c.test:3"]["weight"]), ("up", 3, 2)
        )
        self.result(self.view.remove_server("u", "ws://c.test:3"))
        self.settle()
        self.assertNotIn("ws://c.test:3", [r["server"] for r in self.view.server_rows(0.0)])  # type: ignore[attr-defined]
        self.failure(self.view.set_weight("u", B, 0), ValueError)
        self.failure(self.view.drain("nope", A), LookupError)
        self.failure(self.view.add_server("u", "http://x", 1), ValueError)
        self.assertEqual(find_server(self.view, "b.test"), ("u", B))  # type: ignore[attr-defined]
        for gateway in self.gateways():
            servers = {s.url: s for s in gateway.upstreams["u"].servers}
            self.assertEqual(servers[B].weight, 3)  # type: ignore[attr-defined]

    def test_tap(self) -> None:
        """A tap hands over both directions' messages; untap stops it."""
        client = self.open()
        sid = self.only_id()
        listener = _Listener()
        number, answer = self.view.tap(sid, listener)
        self.result(answer)
        client.proto.sendMessage(b"tapped")
        self.settle()
        self.advance(TAP_REFRESH)
        self.assertEqual(  # type: ignore[attr-defined]
            sorted((m[1], m[4]) for m in listener.messages),
            [("down", b"tapped"), ("up", b"tapped")],
        )
        self.view.untap(number)
        client.proto.sendMessage(b"not tapped")
        self.settle()
        self.advance(TAP_REFRESH)
        self.assertEqual(len(listener.messages), 2)  # type: ignore[attr-defined]

    def test_reload(self) -> None:
        """reload fires with the lines of what changed."""
        lines = self.result(self.view.reload())
        self.assertIsInstance(lines, list)  # type: ignore[attr-defined]
        self.assertTrue(all(isinstance(line, str) for line in lines))  # type: ignore[attr-defined]


class LocalViewTests(ViewContract, SynchronousTestCase):
    """The contract over one process's Gateway."""

    def setUp(self) -> None:
        self.net = Network(make_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        self.view = LocalView(
            self.net.gateway, lambda: self.net.gateway.reload(self.net.gateway.config)
        )

    def open(self) -> Any:
        return self.net.client("/")

    def settle(self) -> None:
        self.net.flush()

    def advance(self, seconds: float) -> None:
        self.net.advance(seconds)

    def gateways(self) -> list[Any]:
        return [self.net.gateway]

    def test_reload_refused(self) -> None:
        """A refused config fails the reload with its ConfigError."""

        def refused() -> list[str]:
            raise ConfigError(["x.toml: listen: required"])

        self.view = LocalView(self.net.gateway, refused)
        self.failure(self.view.reload(), ConfigError)


class AggregateViewTests(ViewContract, TwoWorkersCase):
    """The contract over the workers' parent: each verb reaches the right worker(s)."""

    def setUp(self) -> None:
        super().setUp()
        self.aggregate._reload = lambda: self._broadcast("reload").addCallback(lambda r: r[0])
        self.view = self.aggregate

    def open(self) -> Any:
        client = self.workers[1].net.client("/")
        self.settle()
        return client

    def settle(self) -> None:
        for worker in self.workers.values():
            worker.net.flush()
        self.poll()

    def advance(self, seconds: float) -> None:
        self.workers[1].net.advance(seconds)
        self.settle()

    def gateways(self) -> list[Any]:
        return [worker.gateway for worker in self.workers.values()]


class PushQueueTests(SynchronousTestCase):
    """A push while a fragmented message is in flight toward the client waits for its end."""

    def test_queued_until_the_message_ends(self) -> None:
        """The backend's first fragment has gone on: the push is queued, written right after the
        final fragment, and the client gets both messages whole, in that order; the queue is
        bounded."""
        net = Network(make_config([A]), {A: BackendFactory()})
        client = net.client("/")
        session = next(iter(net.gateway.sessions.values()))
        backend = net.backends[A].connections[0]
        backend.beginMessage(isBinary=False)
        backend.sendMessageFrame(b"first ")
        net.flush()
        self.assertFalse(session.push(b"pushed", False))
        for _ in range(PUSH_QUEUE - 1):
            session.push(b"x", False)
        self.assertRaises(OverflowError, session.push, b"x", False)
        backend.beginMessageFrame(4)
        backend.sendMessageFrameData(b"last")
        backend.endMessage()
        net.flush()
        self.assertEqual(client.received[:2], [(b"first last", False), (b"pushed", False)])
        self.assertEqual(len(client.received), 1 + PUSH_QUEUE)
        self.assertTrue(session.push(b"now", False))
        net.flush()
        self.assertEqual(client.received[-1], (b"now", False))

    def test_message_frame(self) -> None:
        """A whole text or binary frame, masked when asked."""
        self.assertEqual(message_frame(b"hi", False, False), b"\x81\x02hi")
        self.assertEqual(message_frame(b"\x00", True, False), b"\x82\x01\x00")
        masked = message_frame(b"hi", False, True)
        self.assertEqual((masked[:2], len(masked)), (b"\x81\x82", 8))


class RuntimeResetTests(SynchronousTestCase):
    """What a reload undoes of the operator's run-time changes, one line each."""

    def spec(self, servers: list[tuple[str, int]]) -> Any:
        data = {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u"}],
            "upstream": {"u": {"servers": [{"url": u, "weight": w} for u, w in servers]}},
        }
        return parse(data, "t.toml").upstreams["u"]

    def test_table(self) -> None:
        """Weight set at run time, server added and removed at run time; draining is kept."""
        upstream = Upstream(self.spec([(A, 1), (B, 1)]))
        self.assertEqual(runtime_resets(upstream, self.spec([(A, 1), (B, 1)])), [])
        upstream.find(A).weight = 5  # type: ignore[union-attr]
        upstream.set_draining(upstream.find(B), True)  # type: ignore[arg-type]
        self.assertEqual(
            runtime_resets(upstream, self.spec([(A, 3), (B, 1)])),
            [f"weight of {A} in upstream u set at run time to 5, reset to 3 by the file"],
        )
        self.assertEqual(runtime_resets(upstream, self.spec([(A, 5), (B, 1)])), [])
        upstream = Upstream(self.spec([(A, 1), (B, 1)]))
        upstream.add_server(self.spec([("ws://c.test:3", 1)]).servers[0])
        upstream.remove_server(B)
        self.assertEqual(
            runtime_resets(upstream, self.spec([(A, 1), (B, 1)])),
            [
                "server ws://c.test:3 in upstream u added at run time, removed by the file",
                f"server {B} in upstream u removed at run time, back from the file",
            ],
        )
        upstream.update(self.spec([(A, 1), (B, 1)]))
        self.assertEqual(sorted(s.url for s in upstream.servers if not s.retired), [A, B])

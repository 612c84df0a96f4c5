"""
``gate.tap`` with ``workers > 1``, in memory: the worker side (``tap``/``untap`` calls, the
``tapped`` and ``tap_ended`` events it sends, bounded per refresh), the parent side (the
Aggregate routing events to the console's view, ``untap``, a worker that is gone), and the console
over two real Gateways behind WorkerControls and Channels wired in memory.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import (
    A,
    BackendFactory,
    InMemoryWorker,
    Network,
    Terminal,
    TwoWorkersCase,
    assert_tapped_hello,
    make_config,
)
from wsgate.dataplane.tap import TAP_QUEUE, TAP_REFRESH
from wsgate.ops.console import Console
from wsgate.process.aggregate import Aggregate


class _Listener:
    """What the console's view is to the Aggregate: it records what it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, str, bool, int, bytes]] = []
        self.dropped = 0
        self.ended: list[str] = []

    def tapped(self, messages: list[tuple[float, str, bool, int, bytes]], dropped: int) -> None:
        self.messages += messages
        self.dropped += dropped

    def tap_ended(self, why: str) -> None:
        self.ended.append(why)


class WorkerSideTests(SynchronousTestCase):
    """The worker's end: WorkerControl's tap and untap, and the events it sends."""

    def setUp(self) -> None:
        self.worker = InMemoryWorker(Network(make_config([A]), {A: BackendFactory()}))
        self.events: list[dict[str, Any]] = []
        self.worker.control.send = self.events.append
        self.net = self.worker.net
        self.client = self.net.client("/")
        self.net.flush()
        self.sid = next(iter(self.worker.gateway.sessions))
        self.session = self.worker.gateway.sessions[self.sid]

    def tap(self, number: int = 7) -> Any:
        answer = self.worker.control("tap", {"id": self.sid, "tap": number})
        self.assertEqual(self.successResultOf(answer), {"client": self.session.client_address})
        control = self.worker.control
        return control.view._taps[control.taps[number]]

    def test_tapped_messages_each_refresh(self) -> None:
        """Both directions' messages go to the parent as one ``tapped`` event per refresh."""
        self.tap()
        self.assertIsNotNone(self.session.up.tap)
        self.client.proto.sendMessage(b"hello tap")
        self.client.proto.sendMessage(b"\x00\x01", isBinary=True)
        self.net.flush()
        self.assertEqual(self.events, [])
        self.net.advance(TAP_REFRESH)
        self.assertEqual(len(self.events), 1)
        event = self.events[0]
        self.assertEqual((event["tapped"], event["dropped"]), (7, 0))
        shown = [(d, b, s, base64.b64decode(f)) for _, d, b, s, f in event["messages"]]
        self.assertEqual(
            sorted(shown),
            sorted(
                [
                    ("up", False, 9, b"hello tap"),
                    ("down", False, 9, b"hello tap"),
                    ("up", True, 2, b"\x00\x01"),
                    ("down", True, 2, b"\x00\x01"),
                ]
            ),
        )
        self.net.advance(TAP_REFRESH)
        self.assertEqual(len(self.events), 1, "nothing new: nothing sent")

    def test_bounded_per_refresh(self) -> None:
        """More than the limit in one refresh: the rest are counted as dropped, not sent."""
        tap = self.tap()
        self.assertEqual(tap.limit, TAP_QUEUE)
        tap.limit = 3
        for i in range(5):
            self.client.proto.sendMessage(str(i).encode())
        self.net.flush()
        self.assertEqual(len(self.client.received), 5, "the session is not slowed")
        self.net.advance(TAP_REFRESH)
        self.assertEqual(len(self.events[0]["messages"]), 3)
        self.assertEqual(self.events[0]["dropped"], 7)

    def test_untap(self) -> None:
        """``untap`` removes the listeners and the timer; a second one finds nothing."""
        self.tap()
        self.assertTrue(self.worker.control("untap", {"tap": 7}))
        self.assertIsNone(self.session.up.tap)
        self.assertIsNone(self.session.down.tap)
        self.client.proto.sendMessage(b"x")
        self.net.flush()
        self.net.advance(1)
        self.assertEqual(self.events, [])
        self.assertFalse(self.worker.control("untap", {"tap": 7}))

    def test_session_end_ends_the_tap(self) -> None:
        """A closed session: the worker drops the tap itself and says why."""
        self.tap()
        self.client.proto.sendMessage(b"last")
        self.net.flush()
        self.client.proto.sendClose(1000, "done")
        self.net.flush()
        self.net.advance(TAP_REFRESH)
        self.assertEqual(len(self.events[0]["messages"]), 2)
        self.assertEqual(self.events[1]["tap_ended"], 7)
        self.assertIn("closed: client 1000 'done'", self.events[1]["why"])
        self.assertEqual(self.worker.control.taps, {})
        self.assertIsNone(self.session.up.tap)

    def test_unknown_session(self) -> None:
        """Tapping a session the worker does not have is an error, and installs nothing."""
        with self.assertRaises(LookupError):
            self.worker.control("tap", {"id": 99, "tap": 1})
        self.assertEqual(self.worker.control.taps, {})


class ParentSideTests(SynchronousTestCase):
    """The Aggregate's end: the calls it sends and the events it hands to a listener."""

    def setUp(self) -> None:
        self.sent: list[tuple[int, str, dict[str, Any]]] = []
        self.aggregate = Aggregate(make_config([A]), task.Clock(), self._send, self._broadcast)
        snapshot = {
            "counters": {},
            "closed": [],
            "connect_time": {"counts": [], "sum": 0, "count": 0},
            "session_duration": {"counts": [], "sum": 0, "count": 0},
            "session_count": 1,
            "sessions": [{"id": 4, "client": "127.0.0.1:5", "server": A}],
        }
        self.aggregate.update(2, snapshot)

    def _send(self, index: int, call: str, **args: Any) -> Deferred:
        self.sent.append((index, call, args))
        d: Deferred = Deferred()
        d.callback({"client": "127.0.0.1:5"})
        return d

    def _broadcast(self, call: str, **args: Any) -> Deferred:
        return gatherResults([])

    def test_tap_untap(self) -> None:
        """tap asks the session's worker, untap tells it to stop; events then go nowhere."""
        listener = _Listener()
        number, answer = self.aggregate.tap("2:4", listener)
        self.assertEqual(self.sent, [(2, "tap", {"id": 4, "tap": number})])
        self.successResultOf(answer)
        event = {
            "tapped": number,
            "messages": [[1.5, "up", False, 3, base64.b64encode(b"abc").decode()]],
            "dropped": 2,
        }
        self.aggregate.tap_event(2, event)
        self.assertEqual(listener.messages, [(1.5, "up", False, 3, b"abc")])
        self.assertEqual(listener.dropped, 2)
        self.aggregate.untap(number)
        self.assertEqual(self.sent[1:], [(2, "untap", {"tap": number})])
        self.aggregate.tap_event(2, event)
        self.assertEqual(len(listener.messages), 1)
        self.assertEqual(self.sent[2:], [(2, "untap", {"tap": number})], "a late event: untap")

    def test_session_ended(self) -> None:
        """``tap_ended`` ends the listener once and forgets the tap."""
        listener = _Listener()
        number, _ = self.aggregate.tap("2:4", listener)
        self.aggregate.tap_event(2, {"tap_ended": number, "why": "closed: client 1000"})
        self.assertEqual(listener.ended, ["closed: client 1000"])
        self.assertEqual(self.aggregate.taps, {})
        self.aggregate.untap(number)
        self.assertEqual([c for _, c, _ in self.sent], ["tap"], "no untap for an ended tap")

    def test_worker_died(self) -> None:
        """A worker that is gone ends its taps."""
        listener = _Listener()
        self.aggregate.tap("2:4", listener)
        self.aggregate.update(2, None)
        self.assertEqual(listener.ended, ["ended: worker 2 is gone"])
        self.assertEqual(self.aggregate.taps, {})

    def test_unknown_session(self) -> None:
        """An id that is not live (or not WORKER:ID) is refused before any worker is asked."""
        for bad in ("2:5", "4", 4):
            with self.assertRaises(LookupError):
                self.aggregate.tap(bad, _Listener())  # type: ignore[arg-type]
        self.assertEqual(self.sent, [])


class ConsoleTapTests(TwoWorkersCase):
    """gate.tap("W:ID") over real Gateways in memory: the same screen as with one process."""

    def setUp(self) -> None:
        super().setUp()
        self.client = self.workers[1].net.client("/")
        self.workers[2].net.client("/")
        self.poll()
        self.term = Terminal(Console(self.aggregate, self.clock))

    def advance(self) -> None:
        for _ in range(2):
            self.workers[1].net.advance(TAP_REFRESH)

    def relay(self) -> Any:
        return self.workers[1].gateway.sessions[1].up

    def test_tap_until_ctrl_c(self) -> None:
        """Messages of worker 1's session show as with one process; Ctrl-C untaps the worker."""
        screen = self.term.type('gate.tap("1:1")')
        self.assertIn("tapping session 1:1 (127.0.0.5:40000 <-> ws://", screen)
        self.assertIn("Ctrl-C to stop", screen)
        self.assertIsNotNone(self.relay().tap)
        self.assertIsNone(self.workers[2].gateway.sessions[1].up.tap)
        self.client.proto.sendMessage(b"hello tap")
        self.client.proto.sendMessage(b"\x00\x01\x02", isBinary=True)
        self.workers[1].net.flush()
        self.advance()
        screen = self.term.screen()
        assert_tapped_hello(self, screen)
        screen = self.term.key(b"\x03")
        self.assertIn("tap of session 1:1 stopped: 4 shown, 0 dropped", screen)
        self.assertIsNone(self.relay().tap)
        self.assertEqual(self.workers[1].control.taps, {})
        self.assertEqual(self.aggregate.taps, {})

    def test_drops_reported(self) -> None:
        """What the worker could not send is reported as on one process."""
        self.term.type('gate.tap("1:1")')
        control = self.workers[1].control
        control.view._taps[control.taps[1]].limit = 2
        for i in range(5):
            self.client.proto.sendMessage(str(i).encode())
        self.workers[1].net.flush()
        self.advance()
        self.assertIn("... 8 messages not shown", self.term.screen())
        self.assertIn("2 shown, 8 dropped", self.term.key(b"\x03"))

    def test_session_ends(self) -> None:
        """The session closes: the view ends by itself with how it closed; the worker untaps."""
        self.term.type('gate.tap("1:1")')
        self.client.proto.sendClose(1000, "done")
        self.workers[1].net.flush()
        self.advance()
        screen = self.term.screen()
        self.assertIn("tap of session 1:1 session 1:1 closed: client 1000 'done'", screen)
        self.assertIsNone(self.term.manhole.live)
        self.assertEqual(self.workers[1].control.taps, {})
        self.assertEqual(self.aggregate.taps, {})

    def test_worker_dies(self) -> None:
        """The worker is gone: the view ends and says so."""
        self.term.type('gate.tap("1:1")')
        self.channels[1].lost()
        self.aggregate.update(1, None)
        self.advance()
        self.assertIn("tap of session 1:1 session 1:1 ended: worker 1 is gone", self.term.screen())
        self.assertIsNone(self.term.manhole.live)

    def test_console_disconnects(self) -> None:
        """A console that goes away during a tap untaps the worker."""
        self.term.type('gate.tap("1:1")')
        self.term.protocol.connectionLost(None)
        self.assertIsNone(self.relay().tap)
        self.assertEqual(self.workers[1].control.taps, {})

    def test_unknown_session(self) -> None:
        """An unknown or unqualified id is a readable error, and no live view starts."""
        self.assertIn("no live session 1:9", self.term.type('gate.tap("1:9")'))
        self.assertIn("session ids are WORKER:ID", self.term.type("gate.tap(1)"))
        self.assertIsNone(self.term.manhole.live)

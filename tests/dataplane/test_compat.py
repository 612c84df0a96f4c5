"""
The reach-ins of ``wsgate/dataplane/_compat.py`` against the installed Twisted and Autobahn: each fails when an upstream
release changes what it relies on.  The fast paths' own tests switch them on, whatever
``WSGATE_FAST_PATHS`` says (the suite runs with them off too).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import socket
import subprocess
import sys
from typing import Any

from autobahn import util as autobahn_util
from autobahn.twisted import websocket as twisted_module
from autobahn.twisted.websocket import WebSocketAdapterProtocol, WebSocketServerProtocol
from autobahn.websocket import protocol as protocol_module
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import (
    base,
    defer,
    endpoints,
    epollreactor,
    error,
    posixbase,
    protocol,
    tcp,
)
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, make_config
from wsgate.dataplane import _compat
from wsgate.dataplane._compat import (
    READ_SIZE,
    adopt_port,
    autobahn_receive,
    dispatch_directly,
    hand_over,
    lazy_debug_arguments,
    plain_read,
    raise_listen_errors,
    read_more,
    read_through,
    release_connector,
    release_leg,
    send_data,
    send_fd,
    unwrap_endpoint,
    write_eagerly,
)
from wsgate.dataplane.bridge import BackendLeg, ClientLeg


class _Reader(FileDescriptor):
    def __init__(self, sock: socket.socket, reactor: object, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.closed = False  # its descriptor reads as -1
        self.reads = 0
        self.lost: list[object] = []

    def fileno(self) -> int:
        return -1 if self.closed else self.sock.fileno()

    def doRead(self) -> object:
        self.reads += 1
        data = self.sock.recv(100)
        if self.fail:
            raise ValueError("boom")
        return None if data else error.ConnectionDone()

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


class FastPathTestCase(SynchronousTestCase):
    """Tests of a fast path: it is on here, whatever the environment says."""

    def setUp(self) -> None:
        self.patch(_compat, "FAST_PATHS", True)


class DispatchDirectlyTests(FastPathTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.reactor = epollreactor.EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.left, self.right = socket.socketpair()
        self.addCleanup(self.left.close)
        self.addCleanup(self.right.close)

    def test_ready_connections_are_read(self) -> None:
        """After the patch, one reactor iteration reads each ready connection, once."""
        self.assertTrue(dispatch_directly(self.reactor))
        self.assertIn("doIteration", vars(self.reactor))  # the instance now has its own loop
        reader = _Reader(self.left, self.reactor)
        self.reactor.addReader(reader)
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, 0)  # nothing to read yet
        self.right.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, 1)

    def test_a_failing_read_loses_only_that_connection(self) -> None:
        """An exception in doRead disconnects that connection (Twisted's _doReadOrWrite does it,
        as callWithLogger did not need to) and the loop goes on."""
        dispatch_directly(self.reactor)
        reader = _Reader(self.left, self.reactor, fail=True)
        self.reactor.addReader(reader)
        self.right.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_other_reactors_untouched(self) -> None:
        """Only an EPollReactor is changed."""
        self.assertFalse(dispatch_directly(object()))

    def outcome(
        self, patched: bool, send: bytes, close: bool, fail: bool = False, gone: bool = False
    ) -> tuple:
        """What one iteration does to a reader, on a reactor with or without the patch."""
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        if patched:
            dispatch_directly(reactor)
        r = _Reader(left, reactor, fail)
        reactor.addReader(r)
        r.closed = gone
        right.send(send)
        if close:
            right.close()
        reactor.doIteration(0)
        errors = len(self.flushLoggedErrors(ValueError))
        lost = [type(reason.value) for reason in r.lost]  # type: ignore[attr-defined]
        return r.reads, lost, r in reactor.getReaders(), errors

    def test_reads_end_as_twisted_ends_them(self) -> None:
        """The inline read path does what Twisted's _doReadOrWrite does: data read and kept;
        the peer gone (a read of nothing: ConnectionDone); doRead raising (logged, and lost
        with that exception); a descriptor of -1 (never read, lost)."""
        cases = {
            "data": dict(send=b"x", close=False),
            "peer closed after data": dict(send=b"x", close=True),
            "peer closed": dict(send=b"", close=True),
            "raises": dict(send=b"x", close=False, fail=True),
            "no descriptor": dict(send=b"x", close=False, gone=True),
        }
        for name, case in cases.items():
            with self.subTest(name):
                twisted = self.outcome(False, **case)
                self.assertEqual(self.outcome(True, **case), twisted)
        self.assertEqual(self.outcome(True, **cases["data"]), (1, [], True, 0))
        self.assertEqual(self.outcome(True, **cases["raises"]), (1, [ValueError], False, 1))


class LegSlotsTests(SynchronousTestCase):
    """
    The legs' ``__slots__`` (``AUTOBAHN_STATE`` and its server and client parts) against the
    installed Autobahn.
    """

    def open_session(self) -> Any:
        backend = BackendFactory()
        net = Network(make_config(["ws://a.test:1"]), {"ws://a.test:1": backend})
        client = net.client("/", protocols=["v1"])
        client.proto.sendMessage(b"hi")
        net.flush()
        self.assertEqual(backend.received, [(b"hi", False)])
        return next(iter(net.gateway.sessions.values()))

    def test_every_state_attribute_is_slotted(self) -> None:
        """
        An open session's legs keep in their instance dict only names that are class attributes
        (Twisted's ``transport``, ``factory``...): a new per-connection attribute of Autobahn
        fails here, to be added to the lists.
        """
        session = self.open_session()
        for leg in (session.client, session.backend):
            unslotted = [
                name
                for name in vars(leg)
                if not any(name in vars(cls) for cls in type(leg).__mro__)
            ]
            self.assertEqual(unslotted, [], type(leg).__name__)

    def test_no_slot_hides_a_class_default(self) -> None:
        """A slot named like a class attribute of a base would hide its default (AttributeError
        where the base's value was read before): none is."""
        for leg in (ClientLeg, BackendLeg):
            bases = leg.__mro__[1:]
            hidden = [n for n in leg.__slots__ if any(n in vars(cls) for cls in bases)]
            self.assertEqual(hidden, [], leg.__name__)
            self.assertEqual(len(set(leg.__slots__)), len(leg.__slots__))


class QuietPoolTests(SynchronousTestCase):
    def test_connections_not_noisy(self) -> None:
        """The pool's connections are made by a factory class that does not log its start
        and stop (it relies on HTTPConnectionPool._factory)."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import HTTPConnectionPool

        from wsgate.dataplane._compat import quiet_pool

        pool = quiet_pool(MemoryReactorClock())
        self.assertIsInstance(pool, HTTPConnectionPool)
        self.assertFalse(pool._factory.noisy)
        self.assertTrue(HTTPConnectionPool._factory.noisy)  # the class itself is left alone


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


def _tcp_pair(test: SynchronousTestCase) -> tuple[tcp.Connection, socket.socket, _Collect]:
    """A Twisted TCP connection over one end of a socket pair (never added to a reactor)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    collect = _Collect()
    connection = tcp.Connection(ours, collect, MemoryReactorClock())
    return connection, theirs, collect


class ConnectionReachInTests(FastPathTestCase):
    """Twisted's TCP connection: its read size and its write queue."""

    def test_read_size(self) -> None:
        """doRead reads at most ``bufferSize`` bytes (READ_SIZE by default), and read_more's
        larger value is what the next read asks for."""
        connection, peer, collect = _tcp_pair(self)
        self.assertEqual(connection.bufferSize, READ_SIZE)
        connection.bufferSize = 3
        peer.sendall(b"abcdef")
        connection.doRead()
        self.assertEqual(collect.received, [b"abc"])
        connection.bufferSize = READ_SIZE
        read_more(connection)
        self.assertEqual(connection.bufferSize, 4 * READ_SIZE)

    def test_write_eagerly(self) -> None:
        """An empty queue: the bytes go out at once.  Queued bytes (``_tempDataLen``,
        ``dataBuffer`` and ``offset``, FileDescriptor's queue): the next write waits behind
        them, in order."""
        connection, peer, _ = _tcp_pair(self)
        connection.connected = True
        for name in ("_tempDataLen", "offset", "dataBuffer", "socket", "_writeDisconnected"):
            self.assertTrue(hasattr(connection, name), name)
        write_eagerly(connection)
        connection.write(b"now")
        self.assertEqual(peer.recv(100), b"now")
        # A subclass of the connection's own class, shared, and nothing on the instance.
        other, _, _ = _tcp_pair(self)
        write_eagerly(other)
        write_eagerly(other)
        self.assertIs(type(other), type(connection))
        self.assertIs(type(connection).__mro__[2], tcp.Connection)
        self.assertNotIn("write", vars(connection))
        connection._tempDataLen = 1  # as if something were queued
        connection._tempDataBuffer = [b"1"]
        connection.write(b"2")
        self.assertEqual(connection._tempDataBuffer, [b"1", b"2"])
        # Once the connection is lost Twisted deletes its socket: a late write is dropped, as
        # Twisted's own write drops it.
        connection._tempDataLen, connection._tempDataBuffer = 0, []
        connection.connectionLost(Failure(error.ConnectionDone()))
        self.assertFalse(hasattr(connection, "socket"))
        connection.write(b"late")
        self.assertEqual(connection._tempDataBuffer, [])

    def test_send_fd(self) -> None:
        """A relay may send straight to a connection's socket only while its eager write would:
        connected, writing, nothing queued (``_writeDisconnected``: Twisted drops writes after
        ``loseWriteConnection``)."""
        connection, peer, _ = _tcp_pair(self)
        connection.connected = True
        self.assertEqual(send_fd(connection), -1)  # Twisted's own write
        write_eagerly(connection)
        self.assertEqual(send_fd(connection), connection.socket.fileno())
        connection._writeDisconnected = True
        self.assertEqual(send_fd(connection), -1)
        connection.write(b"dropped")
        connection._writeDisconnected = False
        connection._tempDataLen, connection._tempDataBuffer = 1, [b"1"]
        self.assertEqual(send_fd(connection), -1)
        connection._tempDataLen, connection._tempDataBuffer = 0, []
        connection.connected = False
        self.assertEqual(send_fd(connection), -1)
        self.assertEqual(send_fd(StringTransport()), -1)
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 100)

    def test_read_through(self) -> None:
        """The reactor reads a connection by calling its ``doRead`` attribute (the epoll
        reactor's own dispatch and :func:`dispatch_directly`'s): read_through puts the relay's
        read there, plain_read still reaches Twisted's, release_leg takes it away."""
        self.assertIn("selectable.doRead()", inspect.getsource(posixbase._PollLikeMixin))
        connection, peer, collect = _tcp_pair(self)
        reads: list[str] = []
        read_through(connection, lambda: reads.append("relay"))
        connection.doRead()
        self.assertEqual(reads, ["relay"])
        peer.sendall(b"abc")
        self.assertIsNone(plain_read(connection))
        self.assertEqual(collect.received, [b"abc"])
        leg: Any = type("Leg", (), {})()
        leg.transport = connection
        release_leg(leg)
        self.assertNotIn("doRead", vars(connection))
        release_leg(leg)  # twice, and a leg without a transport: nothing to do
        release_leg(type("Leg", (), {})())
        # TLS and other transports keep their own read.
        other: Any = StringTransport()
        read_through(other, lambda: None)
        self.assertNotIn("doRead", vars(other))

    def test_connector_fields(self) -> None:
        """A client connection keeps its ``connector``; the connector its ``factory`` and
        ``transport``: release_connector cuts the connector's side of the cycle."""
        self.assertIn("connector", inspect.signature(tcp.Client.__init__).parameters)
        factory = protocol.ClientFactory()
        connector = tcp.Connector("127.0.0.1", 1, factory, 30, None, MemoryReactorClock())
        self.assertIs(connector.factory, factory)
        self.assertIn("self.transport", inspect.getsource(base.BaseConnector.connect))

        class Transport:
            pass

        transport = Transport()
        transport.connector = connector  # type: ignore[attr-defined]
        connector.transport = transport  # type: ignore[assignment]
        release_connector(transport)
        self.assertIsNone(connector.factory)
        self.assertIsNone(connector.transport)


class LazyDebugArgumentTests(FastPathTestCase):
    NAMES = ("pformat", "hltype", "hlval")
    MODULES = (protocol_module, twisted_module)

    def test_only_log_arguments(self) -> None:
        """In Autobahn's protocol modules, pformat, hltype and hlval are only ever arguments of
        a log call (but Timings.__str__'s pformat: timings are never tracked by the gate)."""
        found = 0
        for module in self.MODULES:
            tree = ast.parse(inspect.getsource(module))
            in_log = {
                id(inner)
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and ".log." in ast.unparse(node.func) + "."
                for inner in ast.walk(node)
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in self.NAMES:
                    found += 1
                    if id(node) not in in_log:
                        self.assertEqual(ast.unparse(node), "pformat(self._timings)")
        self.assertGreater(found, 20)

    def test_formatted_when_written(self) -> None:
        """After lazy_debug_arguments the modules' names give objects whose text is the same,
        computed only when asked (twice is harmless)."""
        for module in self.MODULES:
            for name, original in _compat._DEBUG_ARGUMENTS.items():
                if name in vars(module):  # as imported (a gate may have run); restored after
                    self.patch(module, name, original)
        lazy_debug_arguments()
        lazy_debug_arguments()
        self.assertEqual(
            str(protocol_module.hltype(self.test_formatted_when_written)),
            autobahn_util.hltype(self.test_formatted_when_written),
        )
        self.assertEqual(str(twisted_module.hlval(17)), autobahn_util.hlval(17))
        self.assertEqual(str(protocol_module.pformat({"a": 1})), "{'a': 1}")
        self.assertNotIsInstance(protocol_module.hltype(self), str)  # not formatted yet


class EndpointReachInTests(FastPathTestCase):
    def test_unwrap_endpoint(self) -> None:
        """A connection made through a client endpoint reaches its protocol through the
        endpoint's wrapper, and its connector holds the wrapping factory; unwrap_endpoint makes
        both point at the leg and its factory.  The connector, once connected, only calls its
        factory's clientConnectionLost and doStop."""
        reactor = MemoryReactorClock()
        leg = protocol.Protocol()
        leg.factory = protocol.ClientFactory()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", 1)
        endpoint.connect(protocol.Factory.forProtocol(lambda: leg))
        wrapping = reactor.tcpClients[0][2]
        wrapper = wrapping.buildProtocol(None)
        self.assertIs(wrapper._wrappedProtocol, leg)

        class Transport:
            pass

        transport: Any = Transport()
        transport.protocol = wrapper
        transport.connector = tcp.Connector("127.0.0.1", 1, wrapping, 30, None, reactor)
        unwrap_endpoint(transport, protocol.Protocol())  # another protocol: left alone
        self.assertIs(transport.protocol, wrapper)
        unwrap_endpoint(transport, leg)
        self.assertIs(transport.protocol, leg)
        self.assertIs(transport.connector.factory, leg.factory)
        calls = re.findall(
            r"self\.factory\.(\w+)", inspect.getsource(base.BaseConnector.connectionLost)
        )
        self.assertEqual(sorted(set(calls)), ["clientConnectionLost", "doStop"])


class AutobahnReachInTests(FastPathTestCase):
    """What the legs rely on in Autobahn's protocol."""

    def test_data_received_is_autobahn_receive(self) -> None:
        """Autobahn's Twisted dataReceived hands the bytes to ``_dataReceived``, which
        autobahn_receive calls directly (without its per-read debug-log arguments)."""
        calls: list[bytes] = []

        class Probe(ClientLeg):
            __slots__ = ()

        leg = Probe()
        leg._dataReceived = calls.append  # type: ignore[method-assign]
        WebSocketServerProtocol.dataReceived(leg, b"GET")
        self.assertEqual(calls, [b"GET"])
        wrapped: list[bytes] = []
        self.patch(WebSocketProtocol, "_dataReceived", lambda leg, data: calls.append(data))
        self.patch(WebSocketAdapterProtocol, "dataReceived", lambda leg, data: wrapped.append(data))
        autobahn_receive(Probe(), b"Host")
        self.assertEqual((calls, wrapped), ([b"GET", b"Host"], []))

    def test_send_data_signature(self) -> None:
        """The legs' sendData replaces Autobahn's, with the same arguments."""
        self.assertEqual(
            list(inspect.signature(WebSocketProtocol.sendData).parameters)[1:],
            list(inspect.signature(send_data).parameters)[1:],
        )
        leg: Any = type("Leg", (), {})()
        leg.send_queue = []
        leg.transport = StringTransport()
        send_data(leg, b"frame")
        self.assertEqual(leg.transport.value(), b"frame")

    def test_hand_over_frees_what_autobahn_set(self) -> None:
        """A fresh leg carries txaio's observer tables (``_results``, ``_valid_events``) and
        ``_transport_details``; hand_over frees them and makes the relay its reader."""
        leg = ClientLeg()
        for name in ("_results", "_valid_events", "_transport_details"):
            self.assertTrue(hasattr(leg, name), name)
        received: list[bytes] = []
        hand_over(leg, received.append)
        self.assertIsNone(leg._results)
        self.assertIsNone(leg._valid_events)
        leg.dataReceived(b"x")
        self.assertEqual(received, [b"x"])

    def test_hand_over_empties_the_negotiation_lists(self) -> None:
        """What Autobahn parsed and negotiated into lists becomes the shared empty tuple on
        both legs; the backend leg, which has no request fields, gets none added."""
        server, client = ClientLeg(), BackendLeg()
        server.websocket_protocols, server.websocket_extensions = ["chat"], [("x", {})]
        for leg in (server, client):
            leg.websocket_extensions_in_use = [object()]
            hand_over(leg, lambda data: None)
            self.assertEqual(leg.websocket_extensions_in_use, ())
        self.assertEqual((server.websocket_protocols, server.websocket_extensions), ((), ()))
        self.assertFalse({"websocket_protocols", "websocket_extensions"} & set(vars(client)))

    def test_open_close_futures_only_resolved(self) -> None:
        """Autobahn only creates and resolves ``is_open``/``is_closed`` (never chains on them),
        so a leg's shared stand-in takes the whole life of a session, and a closed leg keeps no
        Deferred (and no cycle through one)."""
        uses = [
            line
            for line in inspect.getsource(protocol_module).splitlines()
            if re.search(r"\.is_(open|closed)\b", line)
        ]
        self.assertGreaterEqual(len(uses), 4)  # made twice, resolved at the open and the close
        for line in uses:
            self.assertRegex(
                line.strip(),
                r"^(self\.is_(open|closed) = txaio\.create_future\(\)"
                r"|txaio\.resolve\(self\.is_(open|closed), (self|None)\))$",
            )
        net = Network(make_config(["ws://a.test:1"]), {"ws://a.test:1": BackendFactory()})
        client = net.client("/")
        net.flush()
        session = next(iter(net.gateway.sessions.values()))
        legs = (session.client, session.backend)
        client.proto.sendClose(1000)
        net.flush()
        net.clock.advance(1)
        self.assertEqual(net.gateway.sessions, {})
        for leg in legs:
            self.assertFalse(isinstance(leg.is_open, defer.Deferred))
            self.assertIs(leg.is_closed, leg.is_open)
            release_leg(leg)
            self.assertNotIn("dataReceived", vars(leg))


class FastPathSwitchTests(SynchronousTestCase):
    """``WSGATE_FAST_PATHS=0``: every fast path leaves Twisted's and Autobahn's own code."""

    def setUp(self) -> None:
        self.patch(_compat, "FAST_PATHS", False)

    def test_the_environment_switches_them(self) -> None:
        code = "from wsgate.dataplane import _compat; print(_compat.FAST_PATHS)"
        for value, expected in (("0", "False"), ("1", "True"), (None, "True")):
            env = {k: v for k, v in os.environ.items() if k != "WSGATE_FAST_PATHS"}
            if value is not None:
                env["WSGATE_FAST_PATHS"] = value
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            self.assertEqual(out.stdout.strip(), expected, value)

    def test_transports_and_reactor_keep_their_own(self) -> None:
        connection, peer, _ = _tcp_pair(self)
        write_eagerly(connection)
        read_more(connection)
        read_through(connection, lambda: None)
        self.assertNotIn("write", vars(connection))
        self.assertNotIn("doRead", vars(connection))
        self.assertEqual(connection.bufferSize, READ_SIZE)
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertFalse(dispatch_directly(reactor))
        self.assertNotIn("doIteration", vars(reactor))

    def test_legs_use_autobahn_entry_points(self) -> None:
        """Reads go through Autobahn's dataReceived, writes through its sendData."""
        reads: list[bytes] = []
        writes: list[bytes] = []
        self.patch(WebSocketAdapterProtocol, "dataReceived", lambda leg, data: reads.append(data))
        self.patch(WebSocketProtocol, "sendData", lambda leg, data, *_: writes.append(data))
        leg: Any = type("Leg", (), {})()
        leg.send_queue = []
        leg.transport = StringTransport()
        autobahn_receive(leg, b"GET")
        send_data(leg, b"frame")
        self.assertEqual((reads, writes, leg.transport.value()), ([b"GET"], [b"frame"], b""))

    def test_autobahn_and_endpoints_keep_their_own(self) -> None:
        """Autobahn's debug arguments stay eager and an endpoint's wrapper stays in place."""
        for name, original in _compat._DEBUG_ARGUMENTS.items():
            self.patch(protocol_module, name, original)  # as imported (a gate may have run)
        lazy_debug_arguments()
        self.assertIsInstance(protocol_module.hltype(self), str)

        class Transport:
            pass

        leg = protocol.Protocol()
        wrapper = endpoints._WrappingProtocol(defer.Deferred(), leg)
        transport: Any = Transport()
        transport.protocol = wrapper
        unwrap_endpoint(transport, leg)
        self.assertIs(transport.protocol, wrapper)


class ListenerReachInTests(SynchronousTestCase):
    def test_a_failed_bind_raises_from_the_start(self) -> None:
        """With raise_listen_errors, a listener whose endpoint fails at once raises from
        privilegedStartService; without, Twisted only logs it."""

        class Busy:
            def listen(self, factory: object) -> defer.Deferred:
                return defer.fail(OSError("address in use"))

        listener = raise_listen_errors(StreamServerEndpointService(Busy(), protocol.Factory()))
        self.assertRaises(OSError, listener.privilegedStartService)
        StreamServerEndpointService(Busy(), protocol.Factory()).privilegedStartService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_adopt_port_makes_our_port_class(self) -> None:
        """adopt_port listens on an inherited socket with a tcp.Port subclass."""

        class Ours(tcp.Port):
            pass

        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        listening.setblocking(False)
        reactor = MemoryReactorClock()
        port = adopt_port(Ours, reactor, listening.fileno(), socket.AF_INET, protocol.Factory())
        self.assertIsInstance(port, Ours)
        port.startListening()
        self.addCleanup(port.socket.close)
        self.assertEqual(port.getHost().port, listening.getsockname()[1])
        self.assertIn("numberAccepts", inspect.getsource(tcp.Port.doRead))  # _TakeTurnsPort's

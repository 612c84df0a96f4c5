"""
The session's relay in memory (iosim, one task.Clock): both modes run on the frame engine; pings,
closes and compression run end to end; every timeout fires when configured, to the millisecond;
a peer that stops reading is bounded and eventually closed.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections import deque
from typing import Any

from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import (
    BackendFactory,
    ClientFactory,
    Network,
    frame,
    make_config,
    upgrade_request,
)
from wsgate import config as configmod
from wsgate.core.frames import UTF8_CHECKS, FrameEngine
from wsgate.dataplane import _compat
from wsgate.dataplane._compat import CONNECTION_DONE, CONNECTION_LOST, read_through, write_eagerly
from wsgate.dataplane.relay import Relay

A = "ws://a.test:1"
MODES = ("message", "tunnel")


def with_limits(config: configmod.Config, **limits: Any) -> configmod.Config:
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **limits))


def with_upstream(config: configmod.Config, **options: Any) -> configmod.Config:
    upstreams = {n: dataclasses.replace(u, **options) for n, u in config.upstreams.items()}
    return dataclasses.replace(config, upstreams=upstreams)


def close_frames(data: bytes) -> list[tuple[int | None, bytes]]:
    """The Close frames (unmasked, from the gate) in ``data``: (code, reason)."""
    found = []
    i = 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        length = b1 & 0x7F
        head = 2
        if length == 126:
            length = struct.unpack("!H", data[i + 2 : i + 4])[0]
            head = 4
        payload = data[i + head : i + head + length]
        if b0 & 0x0F == 8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            found.append((code, payload[2:]))
        i += head + length
    return found


class _Recorder(Protocol):
    """A raw peer that records what it gets and whether its connection was lost."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class RawSession:
    """A raw client through the gate, past its 101, to a test backend."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.client = _Recorder()
        net._wire(net.factory.buildProtocol(None), self.client)
        self.client.transport.write(upgrade_request())
        net.flush()
        assert self.client.data.startswith(b"HTTP/1.1 101"), self.client.data
        self.client.data = self.client.data[self.client.data.index(b"\r\n\r\n") + 4 :]

    def send(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.net.flush()


class CloseTests(SynchronousTestCase):
    def test_invalid_close_frames_get_1002(self) -> None:
        """An invalid Close code or a 1-byte Close payload is answered 1002 (a reason that is not
        UTF-8: 1007), in both modes; the backend gets 1001 and nothing of the bad Close."""
        cases = [
            (struct.pack("!H", 999), 1002),
            (struct.pack("!H", 1005), 1002),
            (struct.pack("!H", 1006), 1002),
            (struct.pack("!H", 2999), 1002),
            (b"\x03", 1002),
            (struct.pack("!H", 1000) + b"\xff\xfe", 1007),
        ]
        for mode in MODES:
            for payload, code in cases:
                backend = BackendFactory()
                raw = RawSession(Network(make_config([A], mode=mode), {A: backend}))
                raw.send(frame(8, payload))
                self.assertEqual(close_frames(raw.client.data)[0][0], code, (mode, payload))
                self.assertEqual([c for c, _ in backend.closes], [1001], (mode, payload))

    def test_close_is_end_to_end(self) -> None:
        """The client's Close reaches the backend unchanged and the answer the client gets is the
        backend's own, as on a direct connection (here a backend that answers 1000)."""
        for mode in MODES:
            backend = BackendFactory()
            backend.setProtocolOptions(echoCloseCodeReason=False)
            net = Network(make_config([A], mode=mode), {A: backend})
            client = net.client()
            client.proto.sendClose(4000, "bye")
            net.flush()
            self.assertEqual(backend.closes, [(4000, "bye")], mode)
            self.assertEqual(client.close, (1000, None), mode)
            self.assertEqual(net.gateway.sessions, {}, mode)


class PingTests(SynchronousTestCase):
    def test_pings_run_end_to_end(self) -> None:
        """A client's Ping is answered by the backend, not by the gate, in both modes."""
        for mode in MODES:
            backend = BackendFactory()
            net = Network(make_config([A], mode=mode), {A: backend})
            client = net.client()
            pongs: list[bytes] = []
            client.proto.onPong = pongs.append
            pinged: list[bytes] = []
            (connection,) = backend.connections
            connection.onPing = lambda payload, c=connection, seen=pinged: (
                seen.append(payload),
                c.sendPong(payload + b"!"),
            )
            client.proto.sendPing(b"hello")
            net.flush()
            self.assertEqual(pinged, [b"hello"], mode)
            self.assertEqual(pongs, [b"hello!"], mode)  # the backend's own answer

    def test_pings_count_against_the_rate(self) -> None:
        """Pings count as messages for max_messages_per_second: a flood is closed 1008."""
        backend = BackendFactory()
        net = Network(make_config([A], max_messages_per_second=5), {A: backend})
        client = net.client()
        for _ in range(10):
            client.proto.sendPing(b"p")
        net.flush()
        self.assertEqual(client.close[0], 1008)


class CompressionTests(SynchronousTestCase):
    def check(self, compression: str) -> tuple[Any, Any, Any]:
        backend = BackendFactory()

        def accept(offers: list[Any]) -> Any:
            for offer in offers:
                if isinstance(offer, PerMessageDeflateOffer):
                    return PerMessageDeflateOfferAccept(offer)
            return None

        backend.setProtocolOptions(perMessageCompressionAccept=accept)
        net = Network(make_config([A], compression=compression), {A: backend})
        client = ClientFactory("/")
        client.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
        client.proto = client.buildProtocol(None)
        net._wire(net.factory.buildProtocol(None), client.proto)
        net.flush()
        return net, client, backend

    def test_deflate_negotiated_end_to_end(self) -> None:
        """The client's permessage-deflate offer reaches the backend, the backend's answer
        reaches the client, and compressed messages cross the gate both ways."""
        net, client, backend = self.check("pass")
        self.assertIn(
            "permessage-deflate", backend.requests[-1].headers["sec-websocket-extensions"]
        )
        self.assertEqual(len(client.proto.websocket_extensions_in_use), 1)
        message = b'{"key": "value"}' * 1000
        client.proto.sendMessage(message)
        net.flush()
        self.assertEqual(backend.received[-1], (message, False))
        self.assertEqual(client.received[-1], (message, False))
        session = list(net.gateway.sessions.values())[-1]
        self.assertLess(session.up.bytes, len(message) // 10)  # it crossed compressed

    def test_compression_off(self) -> None:
        """With compression = "off" the offer is withheld: the session is uncompressed."""
        net, client, backend = self.check("off")
        self.assertNotIn("sec-websocket-extensions", backend.requests[-1].headers)
        self.assertEqual(client.proto.websocket_extensions_in_use, [])


class HandshakeTests(SynchronousTestCase):
    def test_version_8_gets_426(self) -> None:
        """Sec-WebSocket-Version 8 is refused 426 with Sec-WebSocket-Version: 13."""
        net = Network(make_config([A]), {A: BackendFactory()})
        request = upgrade_request().replace(b"Version: 13", b"Version: 8")
        raw = net.raw(request)
        self.assertEqual(raw.status, 426)
        self.assertIn(b"\r\nSec-WebSocket-Version: 13\r\n", raw.data)


class TimeoutTests(SynchronousTestCase):
    """Each timeout fires when configured, on the reactor's clock (not txaio's whole seconds)."""

    def test_front_door_handshake_timeout(self) -> None:
        """A client whose request is incomplete after handshake_timeout is dropped, not before."""
        config = with_limits(make_config([A]), handshake_timeout=0.5)
        net = Network(config, {A: BackendFactory()})
        net.clock.advance(0.7)  # the timer must not depend on where in a second it starts
        client = _Recorder()
        net._wire(net.factory.buildProtocol(None), client)
        client.transport.write(b"GET / HTTP/1.1\r\n")
        net.flush()
        net.advance(0.499)
        self.assertFalse(client.lost)
        net.advance(0.002)
        self.assertTrue(client.lost)

    def test_backend_handshake_timeout(self) -> None:
        """A backend that accepts TCP but never answers the upgrade: 504 after exactly
        handshake_timeout."""
        config = with_upstream(make_config([A]), handshake_timeout=0.5, try_timeout=60.0)
        net = Network(config, {A: Factory.forProtocol(Protocol)})
        net.clock.advance(0.7)
        client = _Recorder()
        net._wire(net.factory.buildProtocol(None), client)
        client.transport.write(upgrade_request())
        net.flush()
        net.advance(0.499)
        self.assertEqual(client.data, b"")
        net.advance(0.002)
        self.assertTrue(client.data.startswith(b"HTTP/1.1 504"), client.data)


class SlowConsumerTests(SynchronousTestCase):
    def test_stuck_client_closed_1013(self) -> None:
        """A client whose send buffer stays full for send_timeout is closed 1013 and the backend
        gets 1001 "client error 1013: ..."; reading from the backend was paused meanwhile."""
        for mode in MODES:
            backend = BackendFactory()
            config = with_limits(make_config([A], mode=mode), send_timeout=30.0)
            net = Network(config, {A: backend})
            net.client()
            (session,) = net.gateway.sessions.values()
            session.throttles[0].pauseProducing()  # what Twisted does when the buffer fills
            net.advance(29.9)
            self.assertEqual(backend.closes, [], mode)
            net.advance(0.2)
            ((code, reason),) = backend.closes
            self.assertEqual(code, 1001, mode)
            self.assertIn("client error 1013", reason, mode)


class IdleTests(SynchronousTestCase):
    def test_pings_do_not_keep_an_idle_session(self) -> None:
        """The gate's own keepalive pings (answered by pongs it consumes) and a peer's pings do
        not count as activity: idle_timeout still closes a session that carries no message."""
        for mode in MODES:
            backend = BackendFactory()
            net = Network(
                make_config([A], mode=mode, idle_timeout="30s", ping_interval="5s"), {A: backend}
            )
            client = net.client()
            for _ in range(5):
                net.advance(5)
                client.proto.sendPing(b"still here")
                net.flush()
            self.assertIsNone(client.close, mode)
            for _ in range(2):
                net.advance(5)
            self.assertEqual(client.close, (1001, "idle timeout"), mode)


class _Owner:
    """The session's side of a relay, recorded."""

    def __init__(self) -> None:
        self.done: list[Relay] = []

    def relay_done(self, relay: Relay) -> None:
        self.done.append(relay)

    def pong_received(self, relay: Relay) -> None:
        pass

    def stuck(self, side: str) -> None:
        pass


class _Legs(Protocol):
    """What a leg does with its connection's bytes once relaying: hands them to the relay."""

    relay: Relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.dataReceived(data)


class ReadTests(SynchronousTestCase):
    """
    ``Relay.read``, the source connection's ``doRead`` over plain TCP, on real sockets: whole
    messages go from one socket to the other in one call, everything else the usual way, in
    both UTF-8 twins.  A fast path: on here, whatever the environment says.
    """

    def setUp(self) -> None:
        self.patch(_compat, "FAST_PATHS", True)

    def relay(self, utf8: type) -> tuple[Relay, socket.socket, socket.socket, _Owner]:
        pairs = [socket.socketpair() for _ in range(2)]
        for ours, theirs in pairs:
            ours.setblocking(False)
            theirs.settimeout(5)
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
        legs = _Legs()
        source = tcp.Connection(pairs[0][0], legs, MemoryReactorClock())
        sink = tcp.Connection(pairs[1][0], _Legs(), MemoryReactorClock())
        source.connected = sink.connected = True
        write_eagerly(sink)
        owner = _Owner()
        clock = [100.0]
        engine = FrameEngine(True, validate_utf8=True, utf8=utf8)
        relay = Relay(engine, source, sink, owner, lambda: clock[0])
        legs.relay = relay
        read_through(source, relay.read)
        clock[0] = 200.0
        return relay, pairs[0][1], pairs[1][1], owner

    def test_whole_messages_straight_through(self) -> None:
        for utf8 in UTF8_CHECKS:
            relay, client, backend, owner = self.relay(utf8)
            source = relay.source
            self.assertIsNone(source.doRead(), "nothing to read yet")
            two = frame(1, "é".encode()) + frame(2, b"\0" * 300)
            client.sendall(two)
            self.assertIsNone(source.doRead())
            self.assertEqual(backend.recv(1000), two)
            self.assertEqual((relay.engine.messages, relay.bytes, relay.last), (2, 302, 200.0))
            # A ping among messages: the rest of the read goes through the general parser.
            client.sendall(frame(2, b"a") + frame(9, b"p") + frame(2, b"b"))
            self.assertIsNone(source.doRead())
            self.assertEqual(backend.recv(1000), frame(2, b"a") + frame(9, b"p") + frame(2, b"b"))
            self.assertEqual((relay.engine.messages, relay.engine.controls), (4, 1))
            # Bad UTF-8 is not passed: the direction fails with 1007, nothing of it forwarded.
            client.sendall(frame(1, b"ok") + frame(1, b"\xff"))
            self.assertIsNone(source.doRead())
            self.assertEqual(backend.recv(1000), frame(1, b"ok"))
            self.assertEqual(relay.engine.failed, (1007, "invalid UTF-8 in a text message"))
            self.assertEqual(owner.done, [relay], utf8)

    def test_the_usual_way_when_the_engine_or_relay_asks(self) -> None:
        for utf8 in UTF8_CHECKS:
            relay, client, backend, _ = self.relay(utf8)
            # A message cut by the read: its rest arrives mid-frame, which only receive takes
            # (the engine forwards what came of it as a fragment of its own).
            whole = frame(2, b"x" * 200)
            client.sendall(whole[:50])
            relay.source.doRead()
            client.sendall(whole[50:])
            relay.source.doRead()
            received = b""
            while received.count(b"x") < 200:  # in two frames: what came, then the rest
                received += backend.recv(1000)
            self.assertEqual(received.count(b"x"), 200)
            self.assertEqual((relay.engine.messages, relay.bytes), (1, 200))
            # Pushed messages waiting: Twisted's read, then dataReceived.
            relay._pushed = deque()
            client.sendall(frame(2, b"y"))
            relay.source.doRead()
            self.assertEqual(backend.recv(1000), frame(2, b"y"))
            self.assertEqual(relay.engine.messages, 2)

    def test_end_and_errors(self) -> None:
        for utf8 in UTF8_CHECKS:
            relay, client, _, _ = self.relay(utf8)
            client.close()
            self.assertIs(relay.source.doRead(), CONNECTION_DONE)
            relay, client, _, _ = self.relay(utf8)
            relay.source.socket.close()  # a read that fails: EBADF
            self.assertIs(relay.source.doRead(), CONNECTION_LOST)

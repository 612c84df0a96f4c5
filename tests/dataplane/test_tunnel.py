"""
Tunnel mode in memory: frames relayed as bytes behave as they do directly (types, fragmentation,
control frames between fragments, close handshake, invalid UTF-8 rejected by the peer), and the
gate still counts, limits, closes, pings and taps.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, frame, make_config, upgrade_request
from wsgate.core.frames import FrameEngine, close_frame
from wsgate.dataplane import _compat
from wsgate.dataplane.bridge import READ_SIZE, Relay

A = "ws://a.test:1"


def tunnel_net(backend: Any, **route: Any) -> Network:
    return Network(make_config([A], mode="tunnel", **route), {A: backend})


def close_code(data: bytes) -> int | None:
    """The code of the first Close frame (unmasked, from the gate) in ``data``."""
    at = data.find(b"\x88")
    return struct.unpack("!H", data[at + 2 : at + 4])[0] if at >= 0 else None


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = tunnel_net(self.backend)
        self.client = self.net.client()
        (self.session,) = self.net.gateway.sessions.values()

    def test_is_a_tunnel(self) -> None:
        """The session relays through Relays that check framing but not UTF-8."""
        self.assertIsInstance(self.session.up, Relay)
        self.assertFalse(self.session.up.engine.validate_utf8)
        self.assertFalse(self.session.down.engine.validate_utf8)

    def test_types_sizes_fragments(self) -> None:
        """Text, binary, empty, large and fragmented messages arrive intact both ways."""
        messages = [(b"hello", False), (b"\x00\xff", True), (b"", False), (b"x" * 1_500_000, True)]
        for payload, binary in messages:
            self.client.proto.sendMessage(payload, binary)
        self.client.proto.sendMessage(("é" * 5000).encode(), False, fragmentSize=999)
        self.net.flush()
        expected = messages + [(("é" * 5000).encode(), False)]
        self.assertEqual(self.backend.received, expected)
        self.assertEqual(self.client.received, expected)
        info = self.session.describe()
        self.assertEqual(info["messages_up"], 5)
        self.assertEqual(info["bytes_up"], sum(len(p) for p, _ in expected))

    def test_close_end_to_end(self) -> None:
        """A Close travels to the other peer and that peer's own answer back; the session ends."""
        self.client.proto.sendClose(4001, "bye")
        self.net.flush()
        self.assertEqual(self.backend.closes, [(4001, "bye")])
        self.assertEqual(self.client.close, (1000, None))  # the test backend answers 1000
        self.assertEqual(self.net.gateway.sessions, {})
        self.assertEqual(self.session.client_close, "4001 'bye'")

    def test_backend_closes(self) -> None:
        """The backend's Close reaches the client."""
        self.client.proto.sendMessage(b"close 4002 done")
        self.net.flush()
        self.assertEqual(self.client.close, (4002, "done"))
        self.assertEqual(self.session.closed_by, "backend")

    def test_kick(self) -> None:
        """Session.close injects its code to the client and 1001 to the backend (masked)."""
        self.session.close(4009, "kicked")
        self.net.flush()
        self.assertEqual(self.client.close, (4009, "kicked"))
        self.assertEqual(self.backend.closes, [(1001, "kicked")])

    def test_drops(self) -> None:
        """In tunnel mode a backend that drops TCP drops the client too (1006 on its side), as on
        a direct connection: the gate makes up no Close the backend never sent."""
        self.backend.connections[0].transport.loseConnection()
        self.net.flush()
        self.assertEqual(self.client.close[0], 1006)
        self.assertEqual(self.net.gateway.sessions, {})

    def test_client_drop(self) -> None:
        """A dropped client gives the backend 1001."""
        self.client.proto.transport.loseConnection()
        self.net.flush()
        self.assertEqual(self.backend.closes, [(1001, "client went away")])
        self.assertEqual(self.net.gateway.sessions, {})

    def test_tap(self) -> None:
        """The tap sees each message's type, size and unmasked first bytes."""
        seen: list[tuple] = []
        self.session.up.tap = lambda *event: seen.append(event)
        self.client.proto.sendMessage(b"tap me")
        self.client.proto.sendMessage(b"\x07" * 100, True)
        self.net.flush()
        self.assertEqual(seen, [(False, 6, b"tap me"), (True, 100, b"\x07" * 64)])


class ConformanceTests(SynchronousTestCase):
    """Raw frames from the client, as in the Autobahn TestSuite's edge cases."""

    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = tunnel_net(self.backend, max_message_size="32KiB")
        self.raw = self.net.raw(upgrade_request())
        self.assertTrue(self.raw.data.startswith(b"HTTP/1.1 101"))
        self.raw.data = b""

    def send(self, data: bytes) -> bytes:
        self.raw.transport.write(data)
        self.net.flush()
        return self.raw.data

    def test_ping_between_fragments(self) -> None:
        """A ping between the fragments of a message is answered and the message arrives whole."""
        got = self.send(frame(1, b"hel", fin=False) + frame(9, b"p") + frame(0, b"lo"))
        self.assertEqual(self.backend.received, [(b"hello", False)])
        self.assertTrue(got.startswith(b"\x8a\x01p"))  # the backend's pong, forwarded
        self.assertIn(b"\x81\x05hello", got)

    def test_invalid_utf8_rejected_by_backend(self) -> None:
        """Invalid UTF-8 passes the tunnel; the backend closes 1007 and the client sees it."""
        self.assertEqual(close_code(self.send(frame(1, b"\xff\xfe"))), 1007)
        self.assertEqual(self.backend.received, [])

    def test_violations(self) -> None:
        """Frame-rule violations close 1002 to the client and 1001 to the backend."""
        for bad in [
            frame(1, b"x", masked=False),
            b"\xc1\x80\0\0\0\0",
            frame(3, b""),
            frame(9, b"", fin=False),
        ]:
            backend = BackendFactory()
            net = tunnel_net(backend)
            raw = net.raw(upgrade_request())
            raw.data = b""
            raw.transport.write(bad)
            net.flush()
            self.assertEqual(close_code(raw.data), 1002, bad)
            self.assertEqual([c for c, _ in backend.closes], [1001], bad)

    def test_too_big(self) -> None:
        """A message over max_message_size: 1009 to the client, 1001 to the backend, nothing forwarded."""
        self.assertEqual(close_code(self.send(frame(2, b"x" * 40000))), 1009)
        self.assertEqual(self.backend.received, [])
        self.assertEqual([c for c, _ in self.backend.closes], [1001])


class EarlyDataTests(SynchronousTestCase):
    def test_backend_greets_at_once(self) -> None:
        """A message the backend sends right after its 101 reaches the client."""
        backend = BackendFactory()
        backend.protocol = type(
            "Greeter", (backend.protocol,), {"onOpen": lambda s: s.sendMessage(b"hi")}
        )
        net = tunnel_net(backend)
        client = net.client()
        self.assertEqual(client.received, [(b"hi", False)])


class PingTests(SynchronousTestCase):
    def test_pings_consumed_and_dead_peer_found(self) -> None:
        """The gate's pings are answered and consumed; a peer that stops answering is dropped."""
        backend = BackendFactory()
        pongs: list[bytes] = []
        deaf = [False]

        def on_ping(proto: Any, payload: bytes) -> None:
            if not deaf[0]:
                proto.sendPong(payload)

        backend.protocol = type(
            "Pinged",
            (backend.protocol,),
            {"onPing": on_ping, "onPong": lambda s, p: pongs.append(p)},
        )
        net = tunnel_net(backend, ping_interval="10s", ping_timeout="5s")
        client = net.client()
        (session,) = net.gateway.sessions.values()
        for _ in range(30):  # one second at a time, so frames move between timer events
            net.advance(1)
        self.assertIsNone(client.close)
        self.assertEqual(pongs, [])  # the client's pongs to the gate are not forwarded
        self.assertIsNotNone(session.client.ping_rtt)
        self.assertIsNotNone(session.backend.ping_rtt)
        deaf[0] = True
        for _ in range(15):
            net.advance(1)
        self.assertEqual(client.close[0], 1011)
        self.assertEqual(net.gateway.sessions, {})


class _Sink:
    """The other leg's transport, as a Relay sees it: the writes, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class ReadSizeTests(SynchronousTestCase):
    def test_large_reads_grow_the_read_size(self) -> None:
        """A read that fills Twisted's buffer makes the source connection read 4x more at a time
        (a fast path: on here, whatever the environment says)."""
        self.patch(_compat, "FAST_PATHS", True)
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        source = tcp.Connection(left, Protocol(), MemoryReactor())
        sink = _Sink()
        engine = FrameEngine(True, validate_utf8=False)
        relay = Relay(engine, source, sink, cast(Any, None), lambda: 0.0)
        size = 3 * READ_SIZE  # a masked binary frame, key 0 (the payload as it is)
        stream = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", size) + bytes(4) + b"z" * size
        relay.dataReceived(stream[: READ_SIZE - 1])
        self.assertEqual(source.bufferSize, READ_SIZE)
        relay.dataReceived(stream[READ_SIZE - 1 : 2 * READ_SIZE - 1])
        self.assertEqual(source.bufferSize, 4 * READ_SIZE)
        self.assertEqual(engine.messages, 0)
        relay.dataReceived(stream[2 * READ_SIZE - 1 :])
        self.assertEqual(engine.messages, 1)
        self.assertEqual(engine.bytes, 3 * READ_SIZE)


class FrameHelperTests(SynchronousTestCase):
    def test_close_frame(self) -> None:
        """Close frames are built masked toward a backend and plain toward a client."""
        self.assertEqual(close_frame(1000, "ok", masked=False), b"\x88\x04\x03\xe8ok")
        masked = close_frame(1001, "", masked=True)
        self.assertEqual(masked[:2], b"\x88\x82")
        mask = masked[2:6]
        self.assertEqual(bytes(b ^ mask[i] for i, b in enumerate(masked[6:])), b"\x03\xe9")


class CloseTimeoutTests(SynchronousTestCase):
    """A kicked session whose peers never answer the Close ends after ``close_timeout`` anyway."""

    def check(self, mode: str, close_timeout: float | None) -> None:
        backend = BackendFactory()
        backend.protocol = type("Mute", (backend.protocol,), {"onCloseFrame": lambda s, c, r: None})
        config = make_config([A], mode=mode)
        if close_timeout is not None:
            limits = dataclasses.replace(config.limits, close_timeout=close_timeout)
            config = dataclasses.replace(config, limits=limits)
        net = Network(config, {A: backend})
        client = net.client()
        client.proto.onCloseFrame = lambda code, reason: None
        (session,) = net.gateway.sessions.values()
        session.close(4009, "kicked")
        wait = int(close_timeout or 5)
        for _ in range(wait - 1):
            net.advance(1)
        self.assertEqual(len(net.gateway.sessions), 1)
        for _ in range(2):
            net.advance(1)
        self.assertEqual(net.gateway.sessions, {})

    def test_tunnel_default(self) -> None:
        self.check("tunnel", None)

    def test_tunnel_configured(self) -> None:
        self.check("tunnel", 2.0)

    def test_message_configured(self) -> None:
        self.check("message", 2.0)

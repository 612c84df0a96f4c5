"""
Hardening in memory, the limits as a gate enforces them: admission limits, request limits, bad
frames, rate limits, trusted proxies, reload and graceful shutdown.  Admission, the message budget
and rate-limited warnings on their own are in ``tests/core/test_limits.py``.
"""

from __future__ import annotations

import struct
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, frame, make_config, upgrade_request
from wsgate import config as configmod
from wsgate.config import Limits
from wsgate.core.limits import client_address

A = "ws://a.test:1"
B = "ws://b.test:2"


def limited(limits: dict[str, Any], servers: list[str] = [A], **route: Any) -> configmod.Config:  # noqa: B006
    return configmod.parse(
        {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u", **route}],
            "upstream": {"u": {"servers": [{"url": u} for u in servers]}},
            "limits": limits,
        },
        "test.toml",
    )


class ClientAddressTests(SynchronousTestCase):
    def test_trusted_proxies(self) -> None:
        """X-Forwarded-For is believed only from trusted proxies, right to left."""
        limits = Limits(trusted_proxies=(ip_network("10.0.0.0/8"),))
        self.assertEqual(client_address("10.0.0.5", "203.0.113.9", limits), "203.0.113.9")
        self.assertEqual(
            client_address("10.0.0.5", "1.1.1.1, 203.0.113.9, 10.0.0.7", limits), "203.0.113.9"
        )
        self.assertEqual(client_address("192.0.2.1", "203.0.113.9", limits), "192.0.2.1")
        self.assertEqual(client_address("10.0.0.5", "garbage", limits), "10.0.0.5")
        self.assertEqual(client_address("10.0.0.5", None, limits), "10.0.0.5")
        self.assertEqual(client_address("10.0.0.5", "203.0.113.9", Limits()), "10.0.0.5")

    def test_real_ip_forwarded(self) -> None:
        """Behind a trusted proxy the backend's X-Real-IP is the real client; XFF gets the proxy."""
        backend = BackendFactory()
        net = Network(limited({"trusted_proxies": ["127.0.0.0/8"]}), {A: backend})
        net.raw(upgrade_request(extra="X-Forwarded-For: 198.51.100.7\r\n"))
        headers = backend.requests[0].headers
        self.assertEqual(headers["x-real-ip"], "198.51.100.7")
        self.assertEqual(headers["x-forwarded-for"], "198.51.100.7, 127.0.0.5")


class RequestLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(
            limited(
                {
                    "max_sessions_per_ip": 2,
                    "max_header_size": "1KiB",
                    "max_headers": 10,
                    "retry_after": 7,
                },
                allowed_origins=["https://app.test"],
            ),
            {A: self.backend},
        )

    def test_per_ip_sessions(self) -> None:
        """A third session from one address gets 429 with Retry-After; closing one frees a place."""
        origin = {"origin": "https://app.test"}
        first = self.net.client(**origin)
        self.net.client(**origin)
        raw = self.net.raw(upgrade_request(extra="Origin: https://app.test\r\n"))
        self.assertEqual(raw.status, 429)
        self.assertIn(b"\r\nRetry-After: 7\r\n", raw.data)
        first.proto.sendClose(1000)
        self.net.flush()
        self.assertTrue(self.net.client(**origin).opened)

    def test_origin(self) -> None:
        """An Origin not on the route's list gets 403."""
        self.assertEqual(
            self.net.raw(upgrade_request(extra="Origin: https://evil.test\r\n")).status, 403
        )
        self.assertEqual(self.backend.requests, [])

    def test_header_limits(self) -> None:
        """Oversized request headers or too many of them get 431, before any parsing."""
        big = upgrade_request(extra=f"X-Big: {'a' * 2000}\r\n")
        self.assertEqual(self.net.raw(big).status, 431)
        many = upgrade_request(extra="".join(f"X-{i}: 1\r\n" for i in range(20)))
        self.assertEqual(self.net.raw(many).status, 431)
        endless = self.net.raw(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 300)
        self.assertEqual(endless.status, 431)

    def test_bad_requests(self) -> None:
        """Malformed handshakes get the right HTTP answer and never reach a backend."""
        cases = {
            b"POST / HTTP/1.1\r\nHost: g\r\n\r\n": 405,
            b"GET / HTTP/1.0\r\nHost: g\r\n\r\n": 505,
            b"\x16\x03\x01\x02\x00garbage\r\n\r\n": 400,
            upgrade_request().replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""): 400,
        }
        for request, status in cases.items():
            self.assertEqual(self.net.raw(request).status, status, request)
        wrong_version = self.net.raw(upgrade_request().replace(b"Version: 13", b"Version: 7"))
        self.assertEqual(wrong_version.status, 426)
        self.assertIn(b"\r\nSec-WebSocket-Version: 13", wrong_version.data)
        self.assertEqual(self.backend.requests, [])

    def test_slowloris(self) -> None:
        """A client that never finishes its request headers is dropped after handshake_timeout."""
        raw = self.net.raw(b"GET / HTTP/1.1\r\nHost: g\r\n")
        self.net.advance(9)
        self.assertFalse(raw.transport.disconnecting)
        self.net.advance(2)
        self.assertTrue(raw.transport.disconnected)


class BadFrameTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(make_config([A], max_frame_size="1KiB"), {A: self.backend})
        self.healthy = self.net.client()
        self.healthy_session = next(iter(self.net.gateway.sessions.values()))

    def bad_session(self, data: bytes) -> tuple[Any, Any]:
        """A session whose client then sends ``data``; returns (client close, backend close)."""
        raw = self.net.raw(upgrade_request())
        self.assertTrue(raw.data.startswith(b"HTTP/1.1 101"))
        raw.data = b""
        seen = len(self.backend.closes)
        raw.transport.write(data)
        for _ in range(7):  # the raw client never answers the gate's Close: dropped after 5 s
            self.net.advance(1)
        code = struct.unpack("!H", raw.data[2:4])[0] if raw.data[:1] == b"\x88" else None
        self.assertEqual(len(self.backend.closes), seen + 1, "the backend leg was not closed once")
        return code, self.backend.closes[seen][0]

    def test_table(self) -> None:
        """Each protocol error closes only its session, with the right code each side."""
        cases = [
            (frame(1, b"\xff\xfe"), 1007),  # invalid UTF-8 text
            (frame(1, b"hi", masked=False), 1002),  # unmasked client frame
            (frame(3, b"x"), 1002),  # reserved opcode
            (frame(2, b"x" * 2000), 1009),  # frame over max_frame_size
            (frame(9, b"p" * 10, fin=False), 1002),  # fragmented control frame
            (frame(0, b"x"), 1002),  # continuation without a message
            (bytes([0x31, 0x81]) + b"\0\0\0\0", 1002),  # RSV bits, fragment cut short
        ]
        for data, code in cases:
            self.assertEqual(self.bad_session(data), (code, 1001), data)
        self.healthy.proto.sendMessage(b"still fine")
        self.net.flush()
        self.assertEqual(self.healthy.received, [(b"still fine", False)])
        self.assertEqual(list(self.net.gateway.sessions.values()), [self.healthy_session])
        self.assertEqual(self.backend.received, [(b"still fine", False)])


class CutShortTests(SynchronousTestCase):
    def test_client_vanishes_mid_frame(self) -> None:
        """A client gone in the middle of a frame: what had arrived of it was relayed as a
        fragment of its own, so the backend still gets a proper Close 1001, and the session ends."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        raw = net.raw(upgrade_request())
        header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 200_000) + b"\0\0\0\0"
        raw.transport.write(header + bytes(50_000))
        net.flush()
        raw.transport.loseConnection()
        net.flush()
        self.assertEqual([code for code, _ in backend.closes], [1001])
        self.assertEqual(net.gateway.sessions, {})


class RateLimitTests(SynchronousTestCase):
    def test_close_1008(self) -> None:
        """Over max_messages_per_second the sender's session is closed 1008."""
        backend = BackendFactory()
        net = Network(make_config([A], max_messages_per_second=5), {A: backend})
        client = net.client()
        for i in range(6):
            client.proto.sendMessage(b"m%d" % i)
        net.flush()
        self.assertEqual(client.close[0], 1008)
        self.assertEqual(len(backend.received), 5)

    def test_throttle(self) -> None:
        """With throttle = true the sender is paused until the second is over, not closed."""
        backend = BackendFactory()
        net = Network(make_config([A], max_messages_per_second=5, throttle=True), {A: backend})
        client = net.client()
        session = next(iter(net.gateway.sessions.values()))
        paused: list[str] = []
        transport = session.client.transport
        transport.pauseProducing = lambda: paused.append("pause")
        transport.resumeProducing = lambda: paused.append("resume")
        for i in range(6):
            client.proto.sendMessage(b"m%d" % i)
        net.flush()
        self.assertEqual(paused, ["pause"])
        net.advance(1)
        self.assertEqual(paused, ["pause", "resume"])
        self.assertIsNone(client.close)
        self.assertEqual(len(backend.received), 6)


class ReloadTests(SynchronousTestCase):
    def test_swap_keeps_live_sessions(self) -> None:
        """A reload sends new sessions to the new upstream; the live one stays on its server."""
        a, b = BackendFactory(), BackendFactory()
        net = Network(make_config([A]), {A: a, B: b})
        old = net.client()
        changes = net.gateway.reload(make_config([B], idle_timeout="1h"))
        self.assertIn("upstream u: server ws://b.test:2 added", changes)
        self.assertIn("upstream u: server ws://a.test:1 removed (drained)", changes)
        self.assertIn("route */ changed", changes)
        new = net.client()
        self.assertTrue(new.opened)
        self.assertEqual((len(a.requests), len(b.requests)), (1, 1))
        old.proto.sendMessage(b"old")
        net.flush()
        self.assertEqual(old.received, [(b"old", False)])
        self.assertEqual(a.received, [(b"old", False)])

    def test_reload_limits(self) -> None:
        """New limits apply to the next handshake."""
        net = Network(make_config([A]), {A: BackendFactory()})
        net.client()
        net.gateway.reload(limited({"max_sessions": 1}))
        self.assertEqual(net.raw(upgrade_request()).status, 503)

    def test_refused_file_keeps_config(self) -> None:
        """The service's reload refuses a bad file with file, key and reason; the old config stays."""
        from twisted.internet.testing import MemoryReactorClock

        from wsgate.service import Options, makeService

        path = Path(self.mktemp())
        good = '[[listen]]\nendpoint = "tcp:0"\n[[route]]\nupstream = "u"\n[upstream.u]\nservers = [{ url = "ws://a:1" }]\n'
        path.write_text(good)
        options = Options()
        options.parseOptions(["--config", str(path)])
        top = makeService(options, MemoryReactorClock())
        path.write_text(good.replace('"u"\n[upstream', '"nope"\n[upstream'))
        e = self.assertRaises(configmod.ConfigError, top.reload)
        self.assertEqual(e.problems, [f"{path}: route[0].upstream: no upstream named 'nope'"])
        self.assertEqual(top.gateway.config.routes[0].upstream, "u")
        path.write_text(good.replace("ws://a:1", "ws://b:1"))
        self.assertIn("upstream u: server ws://b:1 added", top.reload())


class ShutdownTests(SynchronousTestCase):
    def test_close_all_then_fire(self) -> None:
        """Shutdown closes every session 1001 and fires once all are gone; new ones get 503."""
        backend = BackendFactory()
        net = Network(make_config([A]), {A: backend})
        clients = [net.client() for _ in range(3)]
        done: list[None] = []
        net.gateway.shutdown().addCallback(done.append)
        self.assertEqual(done, [])
        net.flush()
        self.assertEqual([c.close for c in clients], [(1001, "gateway shutting down")] * 3)
        self.assertEqual(len(done), 1)
        self.assertEqual(net.raw(upgrade_request()).status, 503)

    def test_spread_and_grace(self) -> None:
        """Closes are spread over shutdown_spread; the grace bounds the wait for stuck peers."""
        backend = BackendFactory()
        net = Network(limited({"shutdown_spread": "10s", "shutdown_grace": "30s"}), {A: backend})
        clients = [net.client() for _ in range(2)]
        done: list[None] = []
        net.gateway.shutdown().addCallback(done.append)
        net.flush()
        self.assertEqual([c.close for c in clients], [(1001, "gateway shutting down"), None])
        clients[1].proto.transport.write = lambda data: None  # a peer that never answers
        clients[1].proto.transport.pauseProducing = lambda: None
        net.advance(5)
        self.assertEqual(done, [])
        net.advance(30)
        self.assertEqual(len(done), 1)


class ConservationTests(SynchronousTestCase):
    def test_kicks_and_reloads(self) -> None:
        """
        Numbered messages through sessions that are kicked and a gate that is reloaded, in both
        modes: every echo a client got is the next one it sent, once; every session the gate ended
        reached its client as a close code.
        """
        for mode in ("message", "tunnel"):
            backend = BackendFactory()
            net = Network(make_config([A], mode=mode), {A: backend})
            clients = [net.client() for _ in range(6)]
            for round_ in range(30):
                for n, client in enumerate(clients):
                    if client.close is None:
                        client.proto.sendMessage(b"%d:%d" % (n, round_))
                if round_ == 10:
                    net.gateway.reload(make_config([A], mode=mode, idle_timeout="1h"))
                if round_ in (5, 15, 25):
                    victim = next(iter(net.gateway.sessions.values()))
                    victim.close(4003, "kicked")
                net.flush()
            kicked = [c for c in clients if c.close is not None]
            self.assertEqual(len(kicked), 3, mode)
            for n, client in enumerate(clients):
                got = [p for p, _ in client.received]
                self.assertEqual(got, [b"%d:%d" % (n, r) for r in range(len(got))], mode)
                if client.close is not None:
                    self.assertEqual(client.close, (4003, "kicked"), mode)
                else:
                    self.assertEqual(len(got), 30, mode)

"""
Plain HTTP on routes with ``http = true``: requests that are not upgrades are reverse-proxied to
the route's upstream (bodies streamed both ways, hop-by-hop headers removed, forwarded headers
added); without ``http = true`` they keep getting 426.  Real loopback sockets, one reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tests.helpers import BackendFactory
from wsgate import config as configmod
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.dataplane.gateway import Gateway
from wsgate.dataplane.httpproxy import parse_head

BIG = 2 * 1024 * 1024


class Echo(resource.Resource):
    """Answers with what it got; /big answers 2 MiB."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[Any] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append(
            (request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders()), body)
        )
        request.setHeader(b"x-server", self.name.encode())
        request.setHeader(b"keep-alive", b"timeout=5")
        if request.uri == b"/big":
            return b"y" * BIG
        if request.uri.startswith(b"/fail"):
            request.setResponseCode(404)
        return f"{self.name} {request.method.decode()} {len(body)}".encode()


class RawHttp(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


def connect(spec: Any, factory: Any, timeout: float) -> Deferred:
    return HostnameEndpoint(reactor, spec.host, spec.port, timeout=timeout).connect(factory)


class HttpProxyTests(TestCase):
    def start(self, servers: list[str], http: bool = True, **upstream: Any) -> None:
        config = configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [
                    {"path": "/", "upstream": "u", "http": http},
                    {"path": "/ws-only", "upstream": "u"},
                ],
                "upstream": {"u": {"servers": [{"url": u} for u in servers], **upstream}},
            },
            "test.toml",
        )
        self.gateway = Gateway(config, reactor)
        port = reactor.listenTCP(0, ClientLegFactory(self.gateway, connect), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def backend(self, name: str) -> tuple[str, Echo]:
        echo = Echo(name)
        port = reactor.listenTCP(0, server.Site(echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"ws://127.0.0.1:{port.getHost().port}", echo

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        proto = RawHttp(raw)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), proto)
        data = await proto.done
        head, _, body = data.partition(b"\r\n\r\n")
        line, headers = parse_head(head)
        return int(line.split()[1]), {n.lower(): v for n, v in headers}, body

    async def test_get_with_forwarded_headers(self) -> None:
        """A GET is proxied: the server sees the forwarded headers and its own Host, and not the
        hop-by-hop ones; the client gets the answer without the server's hop-by-hop headers."""
        url, echo = self.backend("one")
        self.start([url])
        status, headers, body = await self.request(
            b"GET /page?x=1 HTTP/1.1\r\nHost: gate.test\r\nConnection: keep-alive, X-Hop\r\n"
            b"X-Hop: secret\r\nKeep-Alive: timeout=9\r\nX-Forwarded-For: 10.1.1.1\r\n"
            b"Cookie: a=b\r\n\r\n"
        )
        self.assertEqual((status, body), (200, b"one GET 0"))
        self.assertEqual(headers["x-server"], "one")
        self.assertEqual(headers["connection"], "close")
        self.assertNotIn("keep-alive", headers)
        method, uri, seen, _ = echo.seen[0]
        self.assertEqual((method, uri), (b"GET", b"/page?x=1"))
        self.assertEqual(seen[b"Host"], [url.removeprefix("ws://").encode()])
        self.assertEqual(seen[b"X-Forwarded-For"], [b"10.1.1.1, 127.0.0.1"])
        self.assertEqual(seen[b"X-Forwarded-Host"], [b"gate.test"])
        self.assertEqual(seen[b"X-Forwarded-Proto"], [b"http"])
        self.assertEqual(seen[b"Cookie"], [b"a=b"])
        self.assertNotIn(b"X-Hop", seen)
        self.assertNotIn(b"Keep-Alive", seen)
        self.assertEqual(self.gateway.counters["http.200"], 1)

    async def test_bodies_stream(self) -> None:
        """A 1 MiB POST body reaches the server whole; a 2 MiB answer reaches the client whole."""
        url, echo = self.backend("one")
        self.start([url])
        payload = b"p" * (1024 * 1024)
        status, _, body = await self.request(
            b"POST /upload HTTP/1.1\r\nHost: gate.test\r\nContent-Type: application/octet-stream"
            b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        self.assertEqual((status, body), (200, b"one POST 1048576"))
        self.assertEqual(echo.seen[0][3], payload)
        status, _, body = await self.request(b"GET /big HTTP/1.1\r\nHost: gate.test\r\n\r\n")
        self.assertEqual((status, len(body)), (200, BIG))

    async def test_chunked_request(self) -> None:
        """A chunked request body passes through with its framing."""
        url, echo = self.backend("one")
        self.start([url])
        status, _, body = await self.request(
            b"POST /c HTTP/1.1\r\nHost: gate.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        self.assertEqual((status, body), (200, b"one POST 11"))
        self.assertEqual(echo.seen[0][3], b"hello world")

    async def test_failover_and_errors(self) -> None:
        """A refused server is skipped; all refused: 502; status codes pass through."""
        url, _ = self.backend("two")
        self.start(["ws://127.0.0.1:1", url])
        for _ in range(3):
            status, headers, _ = await self.request(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
            self.assertEqual((status, headers["x-server"]), (200, "two"))
        status, _, _ = await self.request(b"GET /fail HTTP/1.1\r\nHost: g\r\n\r\n")
        self.assertEqual(status, 404)

    async def test_all_refused(self) -> None:
        """With no server accepting, the client gets 502."""
        self.start(["ws://127.0.0.1:1", "ws://127.0.0.1:2"])
        status, _, _ = await self.request(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
        self.assertEqual(status, 502)

    async def test_without_http_426(self) -> None:
        """Without http = true a plain request still gets 426 (and a POST 405)."""
        url, echo = self.backend("one")
        self.start([url], http=False)
        status, _, _ = await self.request(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
        self.assertEqual(status, 426)
        status, _, _ = await self.request(
            b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(status, 405)
        self.assertEqual(echo.seen, [])

    async def test_websocket_still_works(self) -> None:
        """An upgrade on an http = true route is still a WebSocket session (101)."""
        backend = BackendFactory()
        port = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.start([f"ws://127.0.0.1:{port.getHost().port}"])
        proto = RawHttp(
            b"GET /chat HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), proto)
        for _ in range(100):
            if b"\r\n\r\n" in proto.data:
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(proto.data.startswith(b"HTTP/1.1 101"), proto.data)
        proto.transport.abortConnection()
        await proto.done
        for _ in range(100):  # the gate closes the backend leg in turn
            if backend.closes and not self.gateway.sessions:
                break
            await deferLater(reactor, 0.02, lambda: None)
        await deferLater(reactor, 1.2, lambda: None)  # Autobahn drops the TCP after 1 s

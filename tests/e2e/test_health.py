"""
The real health probes (WebSocket handshake, TCP connect, HTTP GET) against servers on loopback.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from wsgate.config import HealthSpec, ServerSpec
from wsgate.control.health import Probes
from wsgate.core.upstream import Server

A, B = "ws://a.test:1", "ws://b.test:2"


class _Ok(WebSocketServerProtocol):
    pass


class _HttpAnswer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        status = b"200 OK" if b"GET /ok " in data else b"503 Unavailable"
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")


def connect(spec: ServerSpec, factory: Any, timeout: float) -> Deferred:
    return HostnameEndpoint(reactor, spec.host, spec.port, timeout=timeout).connect(factory)


class ProbesTests(TestCase):
    """The real probes against servers on loopback."""

    def listen(self, factory: Any) -> Server:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return Server(ServerSpec(url=f"ws://127.0.0.1:{port.getHost().port}"), lambda: 0.0)

    async def test_tcp(self) -> None:
        """tcp: a listening port passes, a closed one fails."""
        server = self.listen(Factory.forProtocol(Protocol))
        await Probes(connect)(server, HealthSpec(type="tcp"))
        closed = Server(ServerSpec(url="ws://127.0.0.1:1"), lambda: 0.0)
        with self.assertRaises(ConnectionRefusedError):
            await Probes(connect)(closed, HealthSpec(type="tcp"))

    async def test_http(self) -> None:
        """http: a 2xx answer passes, a 503 fails."""
        server = self.listen(Factory.forProtocol(_HttpAnswer))
        self.assertEqual(await Probes(connect)(server, HealthSpec(type="http", path="/ok")), 200)
        with self.assertRaises(ValueError):
            await Probes(connect)(server, HealthSpec(type="http", path="/bad"))

    async def test_websocket(self) -> None:
        """websocket: a completed opening handshake passes; a plain TCP server fails."""
        factory = WebSocketServerFactory()
        factory.protocol = _Ok
        server = self.listen(factory)
        await Probes(connect)(server, HealthSpec(type="websocket", path="/health"))
        http = self.listen(Factory.forProtocol(_HttpAnswer))
        with self.assertRaises(ConnectionError):
            await Probes(connect)(http, HealthSpec(type="websocket", path="/", timeout=2.0))

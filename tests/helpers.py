"""
Shared builders and fakes for in-memory tests: a gate, its backends and its clients wired with
``twisted.test.iosim`` on one ``task.Clock`` (no sockets, no sleeps).
"""

from __future__ import annotations

from typing import Any

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.test import iosim

from wsgate import config as configmod
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.dataplane.gateway import Gateway

txaio.use_twisted()

CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.5", 40000)


def make_config(servers: list[str], **route: Any) -> configmod.Config:
    """A config with one listener, one route ``/`` (with ``route`` options) and one upstream."""
    return configmod.parse(
        {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u", **route}],
            "upstream": {"u": {"servers": [{"url": u} for u in servers]}},
        },
        "test.toml",
    )


class Backend(WebSocketServerProtocol):
    """
    A scriptable backend: echoes every message, records the handshake request, picks the last
    subprotocol offered, and on the text message ``close <code> <reason>`` closes with them.
    """

    def onConnect(self, request: Any) -> Any:
        self.factory.requests.append(request)
        self.factory.connections.append(self)
        if self.factory.deny:
            raise ConnectionDeny(self.factory.deny, "denied by test backend")
        return request.protocols[-1] if request.protocols else None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))
        if not isBinary and payload.startswith(b"close "):
            _, code, reason = payload.decode().split(" ", 2)
            self.sendClose(int(code), reason)
            return
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closes.append((code, reason))


class BackendFactory(WebSocketServerFactory):
    protocol = Backend

    def __init__(self, deny: int = 0) -> None:
        super().__init__()
        self.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0, maxFramePayloadSize=0)
        self.deny = deny
        self.requests: list[Any] = []
        self.connections: list[Backend] = []
        self.received: list[tuple[bytes, bool]] = []
        self.closes: list[tuple[Any, Any]] = []


class Client(WebSocketClientProtocol):
    """A test client that records what it gets."""

    def onOpen(self) -> None:
        self.factory.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.close = (code, reason)


class ClientFactory(WebSocketClientFactory):
    protocol = Client

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(f"ws://gate.test{path}", **kwargs)
        self.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0, maxFramePayloadSize=0)
        self.opened = False
        self.received: list[tuple[bytes, bool]] = []
        self.close: tuple[Any, Any] | None = None
        self.proto: Any = None


class RawClient(Protocol):
    """Sends raw bytes and records the raw answer (for HTTP-level checks)."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])


def upgrade_request(path: str = "/", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: gate.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


class Network:
    """
    A gate with in-memory backends.  ``backends`` maps server URLs to a ``BackendFactory``, or to
    ``"refuse"`` (connect fails at once) or ``"hang"`` (connect never completes).
    """

    def __init__(self, config: configmod.Config, backends: dict[str, Any]) -> None:
        self.clock = task.Clock()
        txaio.config.loop = self.clock
        self.gateway = Gateway(config, self.clock)
        self.backends = backends
        self.pumps: list[iosim.IOPump] = []
        self.hanging: list[Deferred] = []
        self.cancelled: list[Deferred] = []
        self.factory = ClientLegFactory(self.gateway, self.connect)

    def connect(self, server: Any, factory: Any, timeout: float) -> Deferred:
        backend = self.backends[server.url]
        if backend == "refuse":
            return fail(ConnectionRefusedError())
        if backend == "hang":
            d: Deferred = Deferred(self.cancelled.append)
            self.hanging.append(d)
            return d
        leg = factory.buildProtocol(None)
        server_protocol = backend.buildProtocol(None)
        self._wire(server_protocol, leg)
        return succeed(leg)

    def _wire(self, server: Any, client: Any, peer: Any = None) -> iosim.IOPump:
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, peerAddress=peer),
            client,
            iosim.FakeTransport(client, False),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        return pump

    def client(self, path: str = "/", **kwargs: Any) -> ClientFactory:
        """Connect a WebSocket client to the gate and let the handshakes run."""
        factory = ClientFactory(path, **kwargs)
        factory.proto = factory.buildProtocol(None)
        self._wire(self.factory.buildProtocol(CLIENT_ADDRESS), factory.proto, CLIENT_ADDRESS)
        self.flush()
        return factory

    def raw(self, data: bytes) -> RawClient:
        raw = RawClient()
        self._wire(self.factory.buildProtocol(CLIENT_ADDRESS), raw, CLIENT_ADDRESS)
        raw.transport.write(data)
        self.flush()
        return raw

    def flush(self) -> None:
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump() or moved
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.flush()

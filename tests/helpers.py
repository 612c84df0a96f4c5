"""
Shared builders and fakes for in-memory tests: a gate, its backends and its clients wired with
``twisted.test.iosim`` on one ``task.Clock`` (no sockets, no sleeps); a client frame, a GET on the
admin resource tree, a console terminal, a parent's Aggregate over two in-memory workers, JSON Web
Tokens signed with keys made at import, and the request and session row a connect webhook reads.
Tests import these from here, never from another test module.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.conch.insults import insults
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from tests.certs import CA
from wsgate import config as configmod
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.dataplane.gateway import Gateway
from wsgate.ops.console import Console, ConsoleManhole
from wsgate.process.aggregate import Aggregate
from wsgate.process.channel import Channel
from wsgate.process.worker import WorkerControl

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


def get(root: Any, path: str, headers: dict[str, str] | None = None) -> tuple[DummyRequest, bytes]:
    """GET ``path`` (with request ``headers``) from the resource tree; the request (for the
    answer's code and headers) and the body."""
    segments, _, query = path.lstrip("/").partition("?")
    request = DummyRequest([s.encode() for s in segments.split("/")])
    request.uri = path.encode()
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    if query:
        for pair in query.split("&"):
            k, _, v = pair.partition("=")
            request.addArg(k.encode(), v.encode())
    child = getChildForRequest(root, request)
    body = child.render(request)
    if body == 1:  # NOT_DONE_YET: static.File writes the body itself
        body = b"".join(request.written)
    return request, body


def frame(opcode: int, payload: bytes, masked: bool = True, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (payload unchanged) unless ``masked`` is False."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    else:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    return head + (b"\0\0\0\0" if masked else b"") + payload


_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def assert_tapped_hello(case: SynchronousTestCase, screen: str) -> None:
    """The tap's lines for a text "hello tap" echoed back and a 3-byte binary message sent."""
    case.assertRegex(screen, r"client->backend text\s+9 B\s+'hello tap'")
    case.assertRegex(screen, r"backend->client text\s+9 B\s+'hello tap'")
    case.assertRegex(screen, r"client->backend binary\s+3 B\s+00 01 02")


class Terminal:
    """A console session as a user sees it: type lines and keys, read the screen as text."""

    def __init__(self, console: Console, user: str = "alice") -> None:
        self.transport = StringTransport()
        self.protocol = insults.ServerProtocol(ConsoleManhole, console, user)
        self.protocol.makeConnection(self.transport)
        self.manhole: ConsoleManhole = self.protocol.terminalProtocol

    def type(self, text: str) -> str:
        """Type ``text`` and Enter; return what the screen showed since the last call."""
        self.transport.clear()
        self.protocol.dataReceived(text.encode() + b"\r")
        return self.screen()

    def key(self, data: bytes) -> str:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.screen()

    def screen(self) -> str:
        return _ANSI.sub(b"", self.transport.value()).decode("utf-8", "replace")


A = "ws://a.test:1"


B = "ws://b.test:2"


def channel_pair(
    clock: Clock, answer: Any, on_event: Callable[[dict[str, Any]], None] | None = None
) -> tuple[Channel, Channel]:
    """A parent channel and a worker channel, connected in memory (parent events to on_event)."""
    parent: Channel
    worker: Channel
    parent = Channel(lambda data: worker.data_received(data), clock, on_event=on_event)
    worker = Channel(lambda data: parent.data_received(data), clock, answer)
    return parent, worker


class InMemoryWorker:
    """A real Gateway in memory, as a worker process holds it, behind a WorkerControl."""

    def __init__(self, clock_net: Network) -> None:
        self.net = clock_net
        self.gateway = clock_net.gateway
        self.reloads = 0
        self.stops = 0
        self.control = WorkerControl(self, self._stop)

    def reload(self) -> list[str]:
        self.reloads += 1
        return ["nothing changed"]

    def _stop(self) -> None:
        self.stops += 1


class TwoWorkersCase(SynchronousTestCase):
    """
    The parent's Aggregate over two workers, each a real Gateway behind a WorkerControl, reached
    through a Channel; workers' events (a tap's) go to the Aggregate.  A base: no tests of its own.
    """

    def setUp(self) -> None:
        self.workers = {
            1: InMemoryWorker(
                Network(make_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
            ),
            2: InMemoryWorker(
                Network(make_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
            ),
        }
        self.clock = self.workers[1].net.clock
        self.channels: dict[int, Channel] = {}
        for index, worker in self.workers.items():

            def event(message: dict[str, Any], index: int = index) -> None:
                self.aggregate.tap_event(index, message)

            self.channels[index], child = channel_pair(self.clock, worker.control, event)
            worker.control.send = child.send
        self.aggregate = Aggregate(make_config([A, B]), self.clock, self._send, self._broadcast)

    def _send(self, index: int, call: str, **args: Any) -> Deferred:
        return self.channels[index].request(call, **args)

    def _broadcast(self, call: str, **args: Any) -> Deferred:
        from twisted.internet.defer import gatherResults

        calls = [c.request(call, **args) for c in self.channels.values()]
        return gatherResults(calls, consumeErrors=True)  # as WorkerPool.broadcast

    def poll(self) -> None:
        for index, channel in self.channels.items():
            channel.request("snapshot").addCallback(
                lambda snap, index=index: self.aggregate.update(index, snap)
            )


class Certs:
    """A CA and certificate files in one directory."""

    def __init__(self, directory: str, ca: CA | None = None) -> None:
        self.dir = Path(directory)
        self.ca = ca or CA()
        self.ca_file = self.ca.write(self.dir, "ca")

    def server(self, stem: str, *names: str, **kwargs: Any) -> dict[str, str]:
        cert, key = self.ca.issue(*names, **kwargs).write(self.dir, stem)
        return {"cert": cert, "key": key}

    def client(self, stem: str = "client") -> dict[str, str]:
        cert, key = self.ca.issue("gate client", client=True).write(self.dir, stem)
        return {"client_cert": cert, "client_key": key}


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_config(
    path: str,
    listen: list[dict[str, Any]],
    servers: list[dict[str, Any]] | None = None,
    redirects: list[dict[str, Any]] | None = None,
) -> str:
    lines = []
    for item in listen:
        lines += ["[[listen]]"] + [f"{k} = {_toml(v)}" for k, v in item.items()]
    for item in redirects or []:
        lines += ["[[redirect]]"] + [f"{k} = {_toml(v)}" for k, v in item.items()]
    lines += ["[[route]]", 'path = "/"', 'upstream = "b"', "[upstream.b]", "tries = 1"]
    lines.append(f"servers = {_toml(servers or [{'url': 'ws://127.0.0.1:9'}])}")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


# Signing keys made at import, their JWK and JWKS forms, and a signed token (claims to override).
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    if isinstance(key, bytes):
        item: dict[str, Any] = json.loads(jwt.algorithms.HMACAlgorithm.to_jwk(key))
    elif isinstance(key, rsa.RSAPrivateKey):
        item = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        item = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    item["kid"] = kid
    if alg:
        item["alg"] = alg
    return item


def jwks(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "k1", **claims: Any) -> str:
    body = {"sub": "alice", "iss": "https://id.test", "aud": "chat", "exp": 1000, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


class HandshakeRequest:
    """A client's handshake request, as the connect webhook's facts read it."""

    host = "chat.example"
    path = "/chat"
    origin = "https://app.example"
    protocols = ["v1"]
    headers = {"authorization": "Bearer t", "cookie": "c=1", "user-agent": "ua"}


# A session's row, the facts both webhooks send about it.
SESSION_ROW = {
    "session_id": 7,
    "request_id": "r7",
    "client": "127.0.0.5",
    "client_port": 40000,
    "route": "/chat",
    "upstream": "u",
    "tls": False,
}

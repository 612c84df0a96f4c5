"""
A finished session is freed by reference counting alone: the session, both legs, their relays or
tunnels and both connections.  Were any of them in a reference cycle, every session would wait
for a full run of the cycle collector, which visits every live object (see ``service.tune_gc``).
Real loopback sockets, a real Autobahn backend and client, one reactor; the collector is off
while the session runs and ends.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from wsgate import config as configmod
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.dataplane.gateway import Gateway
from wsgate.demo import EchoBackendFactory
from wsgate.net.tls import BackendConnector


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.proto = self
        self.sendMessage(b"hello", isBinary=True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.answered.callback(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.closed.callback(code)


class ReleaseTests(TestCase):
    def setUp(self) -> None:
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        backend = reactor.listenTCP(0, EchoBackendFactory(), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.backend_url = f"ws://127.0.0.1:{backend.getHost().port}"

    def gate(self, mode: str) -> Gateway:
        config = configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [{"path": "/", "upstream": "u", "mode": mode}],
                "upstream": {"u": {"servers": [{"url": self.backend_url}]}},
            },
            "test.toml",
        )
        gateway = Gateway(config, reactor)
        port = reactor.listenTCP(
            0, ClientLegFactory(gateway, BackendConnector(reactor)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.url = f"ws://127.0.0.1:{port.getHost().port}/"
        return gateway

    async def check(self, mode: str, closer: str) -> None:
        """One session in ``mode``, ended by ``closer``: nothing of it outlives its end."""
        gateway = self.gate(mode)
        factory: Any = WebSocketClientFactory(self.url)
        factory.protocol = _Client
        factory.answered, factory.closed = Deferred(), Deferred()
        connectWS(factory)
        self.assertEqual(await factory.answered, b"Server received from client: hello")
        (session,) = gateway.sessions.values()
        parts = [session, session.client, session.backend, session.up, session.down]
        parts += [session.client.transport, session.backend.transport]
        refs = [weakref.ref(part) for part in parts]
        if closer == "client":
            factory.proto.sendClose(1000)
        else:
            session.close(4000, "kicked")
        del session, parts
        self.assertEqual(await factory.closed, 1000 if closer == "client" else 4000)
        for _ in range(50):  # the legs' ends and the release run on later reactor turns
            if not gateway.sessions and all(ref() is None for ref in refs):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(gateway.sessions, {})
        self.assertEqual([type(ref()).__name__ for ref in refs if ref() is not None], [])

    async def test_message_mode_client_closes(self) -> None:
        await self.check("message", "client")

    async def test_message_mode_gate_closes(self) -> None:
        await self.check("message", "gate")

    async def test_tunnel_mode_client_closes(self) -> None:
        await self.check("tunnel", "client")

    async def test_tunnel_mode_gate_closes(self) -> None:
        await self.check("tunnel", "gate")

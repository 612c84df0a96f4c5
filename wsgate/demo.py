"""
The demo echo backend of ``twistd wsgate --demo``: the reference scenario's ``server.js``, built in.

Every message is answered with ``Server received from client: <message>`` on the same connection.
It must not be used for anything but demonstrations and tests.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

__all__ = ["EchoBackend", "EchoBackendFactory"]


class EchoBackend(WebSocketServerProtocol):
    log = Logger()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.sendMessage(b"Server received from client: " + payload, isBinary=True)
            return
        text = payload.decode("utf-8")
        self.log.info("Received from client: {message}", message=text[:200])
        self.sendMessage(f"Server received from client: {text}".encode(), isBinary=False)


class EchoBackendFactory(WebSocketServerFactory):
    protocol = EchoBackend

    def __init__(self) -> None:
        super().__init__(server="wsgate-demo")
        self.setProtocolOptions(failByDrop=False, maxMessagePayloadSize=0, maxFramePayloadSize=0)

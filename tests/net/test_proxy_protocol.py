"""
PROXY protocol listeners: headers split over several reads are still understood.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from wsgate.net.proxy_protocol import proxy_protocol_endpoint

V2 = (
    b"\r\n\r\n\x00\r\nQUIT\n"  # signature
    + b"\x21\x11\x00\x0c"  # v2, PROXY, TCP over IPv4, 12 address bytes
    + bytes([127, 0, 0, 9, 127, 0, 0, 1])
    + (40001).to_bytes(2, "big")
    + (8020).to_bytes(2, "big")
)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class FakeEndpoint:
    def listen(self, factory: Factory) -> object:
        self.factory = factory
        return succeed(None)


def connect(chunks: list[bytes]) -> tuple[Recorder, StringTransport, object]:
    inner = FakeEndpoint()
    recorder = Recorder()
    proxy_protocol_endpoint(inner).listen(Factory.forProtocol(lambda: recorder))
    protocol = inner.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    protocol.makeConnection(transport)
    for chunk in chunks:
        protocol.dataReceived(chunk)
    return recorder, transport, protocol


class SplitHeaderTests(SynchronousTestCase):
    def test_v1_split(self) -> None:
        """A v1 header arriving as "PROX" and the rest is understood."""
        recorder, transport, protocol = connect(
            [b"PROX", b"Y TCP4 127.0.0.9 127.0.0.1 40001 8020\r\nGET"]
        )
        self.assertFalse(transport.disconnecting)
        self.assertEqual(recorder.data, b"GET")
        self.assertEqual(recorder.transport.getPeer().host, "127.0.0.9")

    def test_v2_split(self) -> None:
        """A v2 header split after 10 bytes is understood."""
        recorder, transport, _ = connect([V2[:10], V2[10:] + b"GET"])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(recorder.data, b"GET")
        self.assertEqual(recorder.transport.getPeer().port, 40001)

    def test_v1_whole(self) -> None:
        """A v1 header and data in one read go through at once."""
        recorder, transport, _ = connect([b"PROXY TCP4 127.0.0.9 127.0.0.1 40001 8020\r\nGET"])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(recorder.data, b"GET")

    def test_no_header(self) -> None:
        """Bytes that are no PROXY header close the connection."""
        _, transport, _ = connect([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
        self.assertTrue(transport.disconnecting)

"""
Fuzzing the listener: random and mutated handshakes and frames never raise, never log an
unhandled error, and never disturb a healthy session running alongside.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, make_config, upgrade_request

A = "ws://a.test:1"
VALID = upgrade_request("/room?x=1", "Origin: https://app.test\r\nSec-WebSocket-Protocol: v1\r\n")


@st.composite
def mutated_handshakes(draw: st.DrawFn) -> bytes:
    """A valid upgrade request with bytes replaced, inserted or deleted."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if action == "replace":
            data[at] = byte
        elif action == "insert":
            data.insert(at, byte)
        elif len(data) > 1:
            del data[at]
    return bytes(data)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One WebSocket frame with arbitrary header bits, mask and (possibly lying) length."""
    payload = draw(st.binary(max_size=300))
    b0 = draw(st.integers(0, 255))
    masked = draw(st.booleans())
    length = draw(
        st.sampled_from([len(payload), len(payload) + 1, max(0, len(payload) - 1), 70000])
    )
    if length < 126:
        head = bytes([b0, (0x80 if masked else 0) | length])
    elif length < 65536:
        head = bytes([b0, (0x80 if masked else 0) | 126]) + struct.pack("!H", length)
    else:
        head = bytes([b0, (0x80 if masked else 0) | 127]) + struct.pack("!Q", length)
    return head + (draw(st.binary(min_size=4, max_size=4)) if masked else b"") + payload


inputs = st.one_of(
    st.binary(max_size=600).map(lambda b: ("raw", b)),
    mutated_handshakes().map(lambda b: ("handshake", b)),
    st.lists(frames(), min_size=1, max_size=6).map(lambda fs: ("frames", b"".join(fs))),
)


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(inputs)
    def test_listener_survives(self, case: tuple[str, bytes]) -> None:
        """Whatever arrives, only that connection is affected and nothing escapes unhandled."""
        kind, data = case
        event(kind)
        backend = BackendFactory()
        net = Network(make_config([A], max_message_size="64KiB"), {A: backend})
        healthy = net.client()
        (healthy_session,) = net.gateway.sessions.values()
        raw = net.raw(VALID if kind == "frames" else b"")
        if kind == "frames":
            self.assertTrue(raw.data.startswith(b"HTTP/1.1 101"))
        raw.transport.write(data)
        net.flush()
        net.advance(11)  # past every handshake and close timeout
        self.assertEqual(self.flushLoggedErrors(), [])
        healthy.proto.sendMessage(b"ping")
        net.flush()
        self.assertEqual(healthy.received[-1:], [(b"ping", False)])
        self.assertIsNone(healthy.close)
        # The gate never passes a protocol violation on: the backend never had to fail a leg.
        self.assertEqual([c for c, _ in backend.closes if c in (1002, 1007, 1009)], [])
        # The fuzzed session is either still open (harmless input) or fully gone: no half leg.
        fuzzed = [s for s in net.gateway.sessions.values() if s is not healthy_session]
        for session in fuzzed:
            self.assertEqual(session.state, "OPEN")

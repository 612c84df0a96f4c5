"""
The fleet's logic without sockets: the RESP parser, the fleet vocabulary (keys, envelopes, per-IP
messages, the remote tally), fleet-wide admission, and the frames a push to any gate sends.  The
Redis link and the cluster over a fake Redis are in ``tests/control/test_cluster.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from wsgate.config import Limits
from wsgate.core import fleet
from wsgate.core.limits import Admission
from wsgate.core.resp import RedisError, RespParser, RespProtocolError, encode


class RespTests(SynchronousTestCase):
    REPLIES = [
        (b"+OK\r\n", b"OK"),
        (b"-ERR wrong type\r\n", RedisError("ERR wrong type")),
        (b":42\r\n", 42),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"*0\r\n", []),
        (b"*2\r\n$1\r\na\r\n*2\r\n:1\r\n$0\r\n\r\n", [b"a", [1, b""]]),
        (b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nhey\r\n", [b"message", b"ch", b"hey"]),
    ]

    def _same(self, got: list[Any], expected: Any) -> None:
        self.assertEqual(len(got), 1)
        if isinstance(expected, RedisError):
            self.assertIsInstance(got[0], RedisError)
            self.assertEqual(str(got[0]), str(expected))
        else:
            self.assertEqual(got[0], expected)

    def test_replies_whole_and_byte_by_byte(self) -> None:
        """Every reply type parses the same whether it arrives whole or one byte at a time."""
        for data, expected in self.REPLIES:
            self._same(RespParser().feed(data), expected)
            parser, got = RespParser(), []
            for i in range(len(data)):
                got += parser.feed(data[i : i + 1])
            self._same(got, expected)

    def test_several_replies_in_one_read(self) -> None:
        """Replies that share a read come out in order, and a partial one waits for the rest."""
        parser = RespParser()
        self.assertEqual(parser.feed(b"+A\r\n:1\r\n*2\r\n$1\r\nx"), [b"A", 1])
        self.assertEqual(parser.feed(b"\r\n$1\r\ny\r\n+B\r\n"), [[b"x", b"y"], b"B"])

    def test_bad_and_oversized_replies(self) -> None:
        """Bytes that are not RESP, or over the bounds, raise RespProtocolError."""
        for data in (
            b"?what\r\n",
            b"\r\n",
            b":x\r\n",
            b"$3\r\nabcXY",
            b"$999\r\n",
            b"*99\r\n",
            b"*1\r\n" * 9,
            b"+" + b"a" * 70000,
        ):
            self.assertRaises(RespProtocolError, RespParser(max_bulk=100, max_items=10).feed, data)

    def test_encode(self) -> None:
        """Commands are arrays of bulk strings; numbers are written in decimal."""
        self.assertEqual(encode("SET", b"k", 5), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n")
        self.assertRaises(TypeError, encode, "SET", True)


class FleetVocabularyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """Keys and channels live under the prefix; a gate key gives back the gate's name."""
        keys = fleet.Keys("p:")
        self.assertEqual(keys.sessions("h:1"), "p:sessions:h:1")
        self.assertEqual(keys.gate_name(keys.gate("h:1").encode()), "h:1")
        self.assertEqual(keys.inbox("g"), "p:to:g")

    def test_targets(self) -> None:
        """GATE:ID splits at the last colon; anything else is refused."""
        self.assertEqual(fleet.parse_target("host:123:7"), ("host:123", 7))
        for bad in ("7", "g:", ":7", "g:x", "g:-1"):
            self.assertRaises(ValueError, fleet.parse_target, bad)

    def test_request_and_reply_round_trip(self) -> None:
        """Requests and replies survive encoding; pushes carry text or base64 binary."""
        args = fleet.push_args(3, b"\x00\xff")
        request = fleet.Request("r1", "g1", "push", args)
        decoded = fleet.decode_envelope(fleet.encode_request(request))
        self.assertEqual(
            decoded, fleet.Request("r1", "g1", "push", {"session": 3, "binary": b"\x00\xff"})
        )
        self.assertEqual(fleet.push_payload(decoded.args), (b"\x00\xff", True))  # type: ignore[union-attr]
        text = fleet.decode_envelope(
            fleet.encode_request(fleet.Request("r2", "g1", "push", fleet.push_args(3, "hé")))
        )
        self.assertEqual(fleet.push_payload(text.args), ("hé".encode(), False))  # type: ignore[union-attr]
        for reply in (fleet.Reply("r", True, {"n": 1}), fleet.Reply("r", False, error="no")):
            self.assertEqual(fleet.decode_envelope(fleet.encode_reply(reply)), reply)
        kick = {"rid": "r", "from": "g", "op": "kick", "session": 1, "reason": "x" * 500}
        self.assertEqual(len(fleet.decode_envelope(json.dumps(kick).encode()).args["reason"]), 123)  # type: ignore[union-attr]

    def test_bad_envelopes(self) -> None:
        """Malformed or oversized messages from the channel are refused with ValueError."""
        good = {"rid": "r", "from": "g", "op": "kick", "session": 1}
        for bad in (
            b"not json",
            b"[1]",
            b"\xff",
            json.dumps({**good, "rid": ""}).encode(),
            json.dumps({**good, "from": None}).encode(),
            json.dumps({**good, "op": "explode"}).encode(),
            json.dumps({**good, "session": True}).encode(),
            json.dumps({**good, "session": 0}).encode(),
            json.dumps({**good, "code": "1000"}).encode(),
            json.dumps({**good, "op": "push"}).encode(),
            json.dumps({**good, "op": "push", "binary": "!!"}).encode(),
            json.dumps({**good, "op": "push", "text": "x" * (fleet.MAX_PUSH + 1)}).encode(),
            json.dumps({**good, "op": "drain", "server": ""}).encode(),
            json.dumps({**good, "op": "drain", "server": "ws://a", "deadline": -1}).encode(),
            b" " * (fleet.MAX_ENVELOPE + 1),
        ):
            self.assertRaises(ValueError, fleet.decode_envelope, bad)
        self.assertRaises(ValueError, fleet.push_args, 1, b"x" * (fleet.MAX_PUSH + 1))
        self.assertRaises(TypeError, fleet.push_args, 1, 5)

    def test_ip_changes_and_messages(self) -> None:
        """Only changed counts go out (0 for an address gone), 1000 addresses a message; a
        reset goes out even when empty and marks only the first message."""
        self.assertEqual(fleet.ip_changes({"a": 1, "b": 2}, {"b": 2, "c": 1}), {"a": 1, "c": 0})
        sessions = {f"10.0.{i // 256}.{i % 256}": 1 for i in range(1500)}
        messages = [fleet.decode_ips(m) for m in fleet.ip_messages("g", sessions, {"x": 2}, True)]
        self.assertEqual(len(messages), 2)
        self.assertEqual([m[3] for m in messages], [True, False])
        merged = {**messages[0][1], **messages[1][1]}
        self.assertEqual(merged, sessions)
        self.assertEqual(messages[1][2], {"x": 2})
        self.assertEqual(fleet.ip_messages("g", {}, {}), [])
        self.assertEqual(
            [fleet.decode_ips(m) for m in fleet.ip_messages("g", {}, {}, True)],
            [("g", {}, {}, True)],
        )
        for bad in (b'{"s":{}}', b'{"gate":"g","s":{"a":-1}}', b'{"gate":"g","h":{"a":true}}'):
            self.assertRaises(ValueError, fleet.decode_ips, bad)

    def test_remote_tally(self) -> None:
        """The tally sums other gates' counts per address and forgets a gate whole."""
        tally = fleet.RemoteTally()
        tally.update("g1", {"a": 2, "b": 1})
        tally.update("g2", {"a": 1})
        self.assertEqual(tally.total, {"a": 3, "b": 1})
        tally.update("g1", {"a": 0})
        self.assertEqual(tally.total, {"a": 1, "b": 1})
        tally.replace("g2", {"b": 4})
        self.assertEqual(tally.total, {"b": 5})
        tally.forget("g1")
        self.assertEqual((tally.total, tally.gates()), ({"b": 4}, {"g2"}))
        self.assertEqual(fleet.hash_counts([b"a", b"3", b"b", b"x", b"c", b"0"]), {"a": 3})


class FleetAdmissionTests(SynchronousTestCase):
    def test_remote_sessions_count_against_the_address(self) -> None:
        """Sessions from an address on other gates count toward max_sessions_per_ip."""
        admission = Admission(Limits(max_sessions_per_ip=3), lambda: 0.0)
        admission.remote = {"1.2.3.4": 2}
        self.assertIsNone(admission.admit("1.2.3.4"))
        self.assertEqual(admission.admit("1.2.3.4"), (429, "Too many sessions from this address"))
        self.assertIsNone(admission.admit("5.6.7.8"))

    def test_handshakes_counted_and_charged(self) -> None:
        """Admitted handshakes are counted for the fleet; other gates' handshakes take tokens,
        down to -burst, and the bucket refills at the rate."""
        now = [0.0]
        admission = Admission(Limits(handshake_rate=1.0, handshake_burst=2), lambda: now[0])
        admission.taken = Counter()
        self.assertIsNone(admission.admit("a"))
        admission.release("a")
        self.assertEqual(admission.taken, {"a": 1})
        admission.charge("a", 10)
        self.assertEqual(admission.admit("a"), (429, "Too many handshakes from this address"))
        now[0] = 3.0  # -2 + 3 tokens
        self.assertIsNone(admission.admit("a"))


class PushFrameTests(SynchronousTestCase):
    def test_message_frame_passes_an_engine(self) -> None:
        """The gate's own messages are valid frames of every length form, masked toward a
        backend and unmasked toward a client."""
        from wsgate.core.frames import FrameEngine, message_frame

        for size in (0, 125, 126, 65535, 65536):
            for masked in (False, True):
                engine = FrameEngine(from_client=masked, validate_utf8=True)
                frame = message_frame(b"a" * size, size % 2 == 1, masked)
                self.assertEqual(len(engine.receive(frame)), len(frame))
                self.assertEqual((engine.messages, engine.failed), (1, None))

    def test_in_message(self) -> None:
        """in_message holds from a message's first frame until its final frame has passed."""
        from wsgate.core.frames import FrameEngine

        engine = FrameEngine(from_client=False, validate_utf8=True)
        engine.receive(b"\x01\x02ab")  # text, not final
        self.assertTrue(engine.in_message)
        engine.receive(b"\x80\x03c")  # final continuation, cut by the read
        self.assertTrue(engine.in_message)
        engine.receive(b"de")
        self.assertFalse(engine.in_message)

"""
The sans-IO frame engine (wsgate/core/frames.py) against an independent reading of RFC 6455.

Frames are built here, and the engine's output is parsed here, by code of this file only (the
engine's helpers are not used), so a misreading of the RFC shared by builder and engine does not
hide.  Four parts:

1. a table of every rule of RFC 6455 5.1-5.8 and 7.4 an endpoint enforces, each row run in both
   modes (message: UTF-8 checked; tunnel: not) and both directions (client frames masked,
   backend frames not), fed in one read and byte by byte;
2. Close, ``sink_open`` and ``expect_pong``;
3. a property: any valid stream, cut anywhere, is forwarded as the same messages and control
   frames, with every output ending at a frame boundary;
4. a property: a valid prefix and one offending frame, cut anywhere, forwards the prefix and
   never the offending frame, nor the end of the message it belongs to.
"""

from __future__ import annotations

import random
import socket
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsgate.core import frames
from wsgate.core.frames import FrameEngine

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
RESERVED_OPCODES = [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]
CLOSE_CODES_OK = [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 3999, 4000, 4999]
CLOSE_CODES_BAD = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
MODES = {"message": True, "tunnel": False}
DIRECTIONS = {"from_client": True, "from_backend": False}
KEY = b"\x9a\x51\x0c\xe7"  # four different bytes: a key rotated the wrong way shows


@pytest.fixture(autouse=True, scope="module", params=frames.UTF8_CHECKS, ids=lambda c: c.__name__)
def utf8_twin(request: pytest.FixtureRequest):  # noqa: ANN201
    """Every test runs with each UTF-8 twin the engine may use (C, and its pure-Python twin)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frames, "UTF8_CHECKS", (request.param,))
        yield request.param


def test_c_twin_built_where_a_compiler_is() -> None:
    """pip install builds the C twin when a C compiler is there (as on CI and a fresh machine)."""
    import shutil
    import sysconfig

    if shutil.which(sysconfig.get_config_var("CC").split()[0]) is None:
        pytest.skip("no C compiler: the pure-Python twin is the only one")
    from wsgate.core import _utf8  # noqa: F401


@st.composite
def scan_inputs(draw: st.DrawFn) -> tuple[bytes, bool, bool, int, int, bool]:
    """Bytes for the engine's fast-path scan, mostly frames it takes, some it must stop at."""
    payloads = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100).map(str.encode),
        st.sampled_from([b"\xed\xa0\x80", b"a\xc3", b"\xf4\x90\x80\x80", b"\xe2\x82\xac" * 50]),
    )
    frame = st.builds(
        F,
        op=st.sampled_from([1, 1, 2, 2, 0, 8, 9, 3]),
        payload=payloads,
        fin=st.booleans() | st.just(True),
        rsv=st.sampled_from([0, 0, 0, 0x40, 0x20, 0x10]),
        wrong_mask=st.integers(0, 9).map(lambda k: k == 0),
        wide=st.booleans(),
        key=st.binary(min_size=4, max_size=4),
    )
    masked = draw(st.booleans())
    frames_ = draw(st.lists(frame, max_size=6))
    wire = build_all(frames_, masked)
    wire = wire[: draw(st.integers(0, len(wire)))] if draw(st.booleans()) else wire
    # no limit, or one at a frame's own size (taken) or just below it (the scan stops there)
    sizes = [len(f.payload) for f in frames_]
    limit = draw(st.sampled_from([1 << 63, *sizes, *(size - 1 for size in sizes if size)]))
    return wire, masked, draw(st.booleans()), limit, draw(st.integers(0, 8)), draw(st.booleans())


@pytest.mark.skipif(frames.CUtf8 not in frames.UTF8_CHECKS, reason="the C twin was not built")
@settings(max_examples=400, deadline=None)
@given(args=scan_inputs())
def test_twins_scan_alike(args: tuple[bytes, bool, bool, int, int, bool]) -> None:
    """The fast path's walk over whole messages stops at the same byte with the same counts in C
    as in Python, whatever it is given (cut frames, limits, quotas, bad UTF-8, RSV bits)."""
    c, py = frames.CUtf8().scan(*args), frames.PyUtf8().scan(*args)
    assert c == py
    end, count, total = py
    assert 0 <= end <= len(args[0]) and count <= args[4] and (count == 0) == (end == 0)


# -- an independent frame builder and decoder -----------------------------------------------------


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3: octet i of the payload XOR octet i mod 4 of the key (its own inverse)."""
    n = len(payload)
    if n < 4096:
        return bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


@dataclass(frozen=True)
class F:
    """One frame to build: ``wrong_mask`` breaks 5.1, ``length``/``wide`` write the length field."""

    op: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    wrong_mask: bool = False
    length: int | None = None  # the length field, if not len(payload)
    wide: bool = False  # the 64-bit length form whatever the length
    key: bytes = KEY


def build(f: F, from_client: bool) -> bytes:
    """The bytes of ``f`` as a client (masked) or a backend (unmasked) sends it (RFC 6455 5.2)."""
    masked = from_client != f.wrong_mask
    n = len(f.payload) if f.length is None else f.length
    b0 = (0x80 if f.fin else 0) | f.rsv | f.op
    bit = 0x80 if masked else 0
    if f.wide or n > 0xFFFF:
        head = bytes((b0, bit | 127)) + n.to_bytes(8, "big")
    elif n > 125:
        head = bytes((b0, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, bit | n))
    return head + f.key + mask(f.payload, f.key) if masked else head + f.payload


def build_all(frames: list[F], from_client: bool) -> bytes:
    return b"".join(build(f, from_client) for f in frames)


class Decoder:
    """
    A strict parser of what the engine forwards: every frame must be well formed for its
    direction (the engine may re-fragment, but never break a rule).  ``events`` are
    ``("msg", opcode, rsv1, payload)`` for each completed message and ``("ctl", opcode, payload)``
    for each control frame, in order; ``open`` is the message in progress
    ``[opcode, rsv1, payload]``; ``buf`` is an incomplete frame (empty at a frame boundary).
    """

    def __init__(self, masked: bool) -> None:
        self.masked = masked
        self.buf = b""
        self.events: list[tuple] = []
        self.open: list | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self._frame():
            pass

    def _frame(self) -> bool:
        buf = self.buf
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return False
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return False
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
            assert not n >> 63, "64-bit length with the top bit set"
        assert bool(b1 & 0x80) == self.masked, "wrong masking"
        key = None
        if self.masked:
            if len(buf) < at + 4:
                return False
            key, at = buf[at : at + 4], at + 4
        if len(buf) < at + n:
            return False
        payload = buf[at : at + n]
        if key is not None:
            payload = mask(payload, key)
        self.buf = buf[at + n :]
        fin, rsv, op = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
        assert not rsv & (RSV2 | RSV3), "RSV2/RSV3 set"
        if op >= 8:
            assert op in (CLOSE, PING, PONG), f"reserved opcode {op}"
            assert fin and n <= 125 and not rsv, "bad control frame"
            self.events.append(("ctl", op, payload))
            return True
        if op == CONT:
            assert self.open is not None, "continuation outside a message"
            assert not rsv, "RSV1 on a continuation"
            self.open[2] += payload
        else:
            assert op in (TEXT, BINARY), f"reserved opcode {op}"
            assert self.open is None, "new message inside a fragmented one"
            self.open = [op, bool(rsv), bytearray(payload)]
        if fin:
            op, rsv1, data = self.open
            self.events.append(("msg", op, rsv1, bytes(data)))
            self.open = None
        return True


def decode(data: bytes, masked: bool) -> Decoder:
    d = Decoder(masked)
    d.feed(data)
    return d


def utf8_error_at(data: bytes, final: bool) -> int | None:
    """
    Where ``data`` stops being (a prefix of) valid UTF-8 by RFC 3629's grammar: the index of the
    first byte no valid text can have there, ``len(data)`` if ``final`` and it ends inside a
    character, or None.
    """
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif b == 0xE0:
            need, lo, hi = 2, 0xA0, 0xBF
        elif 0xE1 <= b <= 0xEC or b in (0xEE, 0xEF):
            need, lo, hi = 2, 0x80, 0xBF
        elif b == 0xED:
            need, lo, hi = 2, 0x80, 0x9F
        elif b == 0xF0:
            need, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= b <= 0xF3:
            need, lo, hi = 3, 0x80, 0xBF
        elif b == 0xF4:
            need, lo, hi = 3, 0x80, 0x8F
        else:
            return i
        for k in range(1, need + 1):
            if i + k >= n:
                return n if final else None
            c = data[i + k]
            if not (lo <= c <= hi if k == 1 else 0x80 <= c <= 0xBF):
                return i + k
        i += need + 1
    return None


def test_own_utf8_reading_agrees_with_python() -> None:
    samples = [b"", b"ab", "é€𝄞".encode(), b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xf4\x8f\xbf\xbf"]
    bad = [b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xf5", b"\x80"]
    for s in samples:
        assert utf8_error_at(s, True) is None
        s.decode()
    for s in bad:
        assert utf8_error_at(s, True) is not None
        with pytest.raises(UnicodeDecodeError):
            s.decode()
    assert utf8_error_at(b"a\xe2\x82", False) is None and utf8_error_at(b"a\xe2\x82", True) == 3


def check_failed_output(dec: Decoder, good: bytes, bad: F, code: int, from_client: bool) -> None:
    """
    What a failing engine forwarded (parsed by ``dec``): exactly the frames before the offending
    one, ending at a frame boundary, and the offending message never completed.  One exception,
    by design of a streaming check: invalid UTF-8 inside a data frame cut by reads lets the valid
    head of that frame out as non-final fragments (never the byte that makes it invalid).
    """
    ref = decode(good, from_client)
    assert ref.buf == b""
    assert dec.buf == b"", "an output did not end at a frame boundary"
    assert dec.events == ref.events
    if code == 1007 and bad.op in (TEXT, CONT):
        before = bytes(ref.open[2]) if ref.open else b""
        if dec.open is None:
            assert ref.open is None
            return
        assert dec.open[:2] == (ref.open[:2] if ref.open else [TEXT, False])
        got = bytes(dec.open[2])
        full = before + bad.payload
        assert got.startswith(before) and full.startswith(got)
        error = utf8_error_at(full, bad.fin)
        assert error is not None and len(got) <= error
        assert len(got) == len(before) or len(got) < len(full), "the offending frame went out"
    else:
        assert dec.open == ref.open


# -- 1. the table -------------------------------------------------------------------------------


def text(p: bytes, fin: bool = True, **kw) -> F:
    return F(TEXT, p, fin, **kw)


def binary(p: bytes, fin: bool = True, **kw) -> F:
    return F(BINARY, p, fin, **kw)


def cont(p: bytes, fin: bool = True, **kw) -> F:
    return F(CONT, p, fin, **kw)


def ping(p: bytes = b"", fin: bool = True, **kw) -> F:
    return F(PING, p, fin, **kw)


def pong(p: bytes = b"", fin: bool = True, **kw) -> F:
    return F(PONG, p, fin, **kw)


def close(p: bytes = b"", fin: bool = True, **kw) -> F:
    return F(CLOSE, p, fin, **kw)


def code_bytes(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class Row:
    frames: list[F]  # a failing row's offending frame is its last
    message: int | None  # the expected failure code in message mode (None: accepted)
    tunnel: int | None | str = "same"  # in tunnel mode
    kw: dict | None = None  # FrameEngine keyword arguments
    closed: tuple | None = None  # the expected ``closed``


DEFLATE = {"deflate": True}
OK = text(b"ok")
ROWS: dict[str, Row] = {
    # valid framing, forwarded as it came
    "text": Row([text(b"hello")], None),
    "empty-binary": Row([binary(b"")], None),
    "empty-text": Row([text(b"")], None),
    "text-16bit-length": Row([text(b"a" * 126)], None),
    "binary-16bit-max": Row([binary(bytes(range(256)) * 255 + bytes(range(255)))], None),
    "binary-64bit-length": Row([binary(bytes(range(256)) * 256)], None),
    "length-64bit-non-minimal-accepted": Row([binary(b"abc", wide=True)], None),
    "multibyte-text": Row([text("héllo €𝄞".encode())], None),
    "fragmented-text": Row([text(b"he", False), cont(b"l", False), cont(b"lo")], None),
    "fragmented-binary": Row([binary(b"\xff", False), cont(b"\x00")], None),
    "char-split-across-fragments": Row([text(b"\xe2\x82", False), cont(b"\xac")], None),
    "4-byte-char-in-4-fragments": Row(
        [text(b"\xf0", False), cont(b"\x9f", False), cont(b"\x98", False), cont(b"\x80")], None
    ),
    "text-with-empty-final-fragment": Row([text(b"abc", False), cont(b"")], None),
    "all-fragments-empty": Row([text(b"", False), cont(b"", False), cont(b"")], None),
    "ping-interleaved-in-fragmented-message": Row(
        [text(b"ab", False), ping(b"x"), cont(b"cd", False), pong(b""), cont(b"e")], None
    ),
    "ping-between-split-char": Row([text(b"\xe2", False), ping(b"p"), cont(b"\x82\xac")], None),
    "ping-125": Row([ping(b"p" * 125)], None),
    "pong-125": Row([pong(b"p" * 125)], None),
    "pong-unsolicited": Row([pong(b"whatever")], None),
    # 5.1, 5.3: masking
    "wrong-mask-text": Row([OK, text(b"bad", wrong_mask=True)], 1002),
    "wrong-mask-empty-binary": Row([OK, binary(b"", wrong_mask=True)], 1002),
    "wrong-mask-continuation": Row([text(b"a", False), cont(b"b", wrong_mask=True)], 1002),
    "wrong-mask-ping": Row([OK, ping(b"p", wrong_mask=True)], 1002),
    "wrong-mask-pong": Row([OK, pong(b"", wrong_mask=True)], 1002),
    "wrong-mask-close": Row([OK, close(code_bytes(1000), wrong_mask=True)], 1002),
    # 5.2: RSV bits (RSV1 per RFC 7692 6: first frame of a message, with deflate only)
    "rsv1-without-deflate-text": Row([OK, text(b"x", rsv=RSV1)], 1002),
    "rsv1-without-deflate-binary": Row([OK, binary(b"x", rsv=RSV1)], 1002),
    "rsv1-without-deflate-first-fragment": Row([OK, text(b"x", False, rsv=RSV1)], 1002),
    "rsv1-deflate-first-frame": Row([text(b"\x01\x02", rsv=RSV1)], None, kw=DEFLATE),
    "rsv1-deflate-binary": Row([binary(b"\x01\x02", rsv=RSV1)], None, kw=DEFLATE),
    "rsv1-deflate-first-fragment": Row(
        [text(b"x", False, rsv=RSV1), ping(b""), cont(b"y")], None, kw=DEFLATE
    ),
    "rsv1-deflate-continuation": Row(
        [text(b"x", False, rsv=RSV1), cont(b"y", rsv=RSV1)], 1002, kw=DEFLATE
    ),
    "rsv1-deflate-continuation-of-plain": Row(
        [text(b"x", False), cont(b"y", rsv=RSV1)], 1002, kw=DEFLATE
    ),
    "rsv1-deflate-ping": Row([OK, ping(b"", rsv=RSV1)], 1002, kw=DEFLATE),
    "rsv1-deflate-pong": Row([OK, pong(b"x", rsv=RSV1)], 1002, kw=DEFLATE),
    "rsv1-deflate-close": Row([OK, close(code_bytes(1000), rsv=RSV1)], 1002, kw=DEFLATE),
    "rsv2-text": Row([OK, text(b"x", rsv=RSV2)], 1002),
    "rsv3-text": Row([OK, text(b"x", rsv=RSV3)], 1002),
    "rsv2-binary-deflate": Row([OK, binary(b"x", rsv=RSV2)], 1002, kw=DEFLATE),
    "rsv3-binary-deflate": Row([OK, binary(b"x", rsv=RSV3)], 1002, kw=DEFLATE),
    "rsv1-rsv2-deflate": Row([OK, binary(b"x", rsv=RSV1 | RSV2)], 1002, kw=DEFLATE),
    "rsv2-continuation": Row([text(b"a", False), cont(b"b", rsv=RSV2)], 1002),
    "rsv3-continuation": Row([text(b"a", False), cont(b"b", rsv=RSV3)], 1002),
    "rsv2-ping": Row([OK, ping(b"", rsv=RSV2)], 1002),
    "rsv3-close": Row([OK, close(b"", rsv=RSV3)], 1002),
    # 5.2: opcodes
    **{f"reserved-opcode-{op}": Row([OK, F(op, b"x")], 1002) for op in RESERVED_OPCODES},
    **{f"reserved-opcode-{op}-fin0": Row([OK, F(op, b"", False)], 1002) for op in (3, 11)},
    "reserved-opcode-inside-message": Row([text(b"a", False), F(7, b"x")], 1002),
    # 5.2: 64-bit length
    "length-64bit-top-bit": Row([OK, binary(b"abc", length=(1 << 63) | 3, wide=True)], 1002),
    "length-64bit-all-ones": Row([OK, binary(b"abc", length=(1 << 64) - 1, wide=True)], 1002),
    "length-64bit-top-bit-control": Row([OK, ping(b"", length=1 << 63, wide=True)], 1002),
    # 5.4: fragmentation
    "continuation-outside-message": Row([cont(b"x")], 1002),
    "continuation-after-whole-message": Row([OK, cont(b"x")], 1002),
    "continuation-fin0-outside-message": Row([OK, cont(b"x", False)], 1002),
    "empty-continuation-outside-message": Row([OK, cont(b"")], 1002),
    "continuation-after-finished-fragments": Row([text(b"a", False), cont(b"b"), cont(b"c")], 1002),
    "text-inside-fragmented-text": Row([text(b"a", False), text(b"b")], 1002),
    "binary-inside-fragmented-text": Row([text(b"a", False), binary(b"b", False)], 1002),
    "text-inside-fragmented-binary": Row([binary(b"a", False), cont(b"", False), text(b"b")], 1002),
    "new-message-after-ping-inside-message": Row([text(b"a", False), ping(b""), binary(b"")], 1002),
    # 5.5: control frames
    "ping-fin0": Row([OK, ping(b"x", False)], 1002),
    "pong-fin0": Row([OK, pong(b"", False)], 1002),
    "close-fin0": Row([OK, close(code_bytes(1000), False)], 1002),
    "ping-fin0-inside-message": Row([text(b"a", False), ping(b"x", False)], 1002),
    "ping-126": Row([OK, ping(b"p" * 126)], 1002),
    "pong-126": Row([OK, pong(b"p" * 126)], 1002),
    "close-126": Row([OK, close(code_bytes(1000, b"r" * 124))], 1002),
    "ping-65536": Row([OK, ping(b"p" * 65536)], 1002),
    # 5.6, 8.1: UTF-8 of text messages
    "text-invalid-byte": Row([OK, text(b"\xff")], 1007, None),
    "text-invalid-c3-28": Row([OK, text(b"ab\xc3\x28cd")], 1007, None),
    "text-lone-continuation": Row([OK, text(b"a\x80")], 1007, None),
    "text-overlong-2": Row([OK, text(b"\xc0\xaf")], 1007, None),
    "text-overlong-3": Row([OK, text(b"\xe0\x80\xaf")], 1007, None),
    "text-overlong-4": Row([OK, text(b"\xf0\x80\x80\xaf")], 1007, None),
    "text-above-10ffff": Row([OK, text(b"\xf4\x90\x80\x80")], 1007, None),
    "text-f5": Row([OK, text(b"\xf5\x80\x80\x80")], 1007, None),
    "text-surrogate-d800": Row([OK, text(b"\xed\xa0\x80")], 1007, None),
    "text-surrogate-dfff": Row([OK, text(b"\xed\xbf\xbf")], 1007, None),
    "text-invalid-first-fragment": Row([OK, text(b"\xff", False)], 1007, None),
    "text-invalid-in-continuation": Row([text(b"ab", False), cont(b"c\xff")], 1007, None),
    "text-invalid-split-across-fragments": Row(
        [text(b"ab\xe2\x82", False), cont(b"\x28")], 1007, None
    ),
    "text-surrogate-split-across-fragments": Row(
        [text(b"\xed", False), cont(b"\xa0\x80")], 1007, None
    ),
    "text-truncated-at-end": Row([OK, text(b"ab\xe2\x82")], 1007, None),
    "text-truncated-before-empty-final": Row([text(b"ab\xe2", False), cont(b"")], 1007, None),
    "text-truncated-across-ping": Row(
        [text(b"\xe2", False), ping(b"p"), cont(b"\x82", False), cont(b"")], 1007, None
    ),
    "binary-invalid-utf8-is-fine": Row([binary(b"\xff\xed\xa0\x80\xc0")], None),
    "binary-fragmented-invalid-utf8-is-fine": Row([binary(b"\xed", False), cont(b"\xa0")], None),
    "compressed-text-not-validated": Row(
        [text(b"\xff\xfe\xed\xa0\x80", rsv=RSV1)], None, kw=DEFLATE
    ),
    "compressed-fragmented-text-not-validated": Row(
        [text(b"\xff", False, rsv=RSV1), cont(b"\xfe\xe2")], None, kw=DEFLATE
    ),
    "plain-text-after-compressed-is-validated": Row(
        [text(b"\xff", rsv=RSV1), text(b"\xff")], 1007, None, kw=DEFLATE
    ),
    "text-after-binary-is-validated": Row(
        [binary(b"\xff", False), cont(b""), text(b"\xff")], 1007, None
    ),
    # 1009: the endpoint's limits (max_frame: one frame's payload; max_message: the message's)
    "max-frame-exact": Row([binary(b"x" * 10)], None, kw={"max_frame": 10}),
    "max-frame-over": Row([binary(b"x" * 10), binary(b"x" * 11)], 1009, kw={"max_frame": 10}),
    "max-frame-over-continuation": Row(
        [text(b"x" * 10, False), cont(b"x" * 11)], 1009, kw={"max_frame": 10}
    ),
    "max-frame-fragments-within": Row(
        [text(b"x" * 10, False), cont(b"x" * 10)], None, kw={"max_frame": 10}
    ),
    "max-message-exact": Row(
        [text(b"x" * 10, False), cont(b"x" * 5)], None, kw={"max_message": 15}
    ),
    "max-message-over": Row([text(b"x" * 10, False), cont(b"x" * 6)], 1009, kw={"max_message": 15}),
    "max-message-over-single": Row([OK, binary(b"x" * 16)], 1009, kw={"max_message": 15}),
    "max-message-per-message": Row(
        [binary(b"x" * 15), text(b"x" * 15)], None, kw={"max_message": 15}
    ),
    "max-message-compressed": Row(
        [text(b"x" * 16, rsv=RSV1)], 1009, kw={"max_message": 15, **DEFLATE}
    ),
    "max-both-over-64bit": Row(
        [OK, binary(b"x" * 70000)], 1009, kw={"max_message": 65536, "max_frame": 65536}
    ),
    # 5.5.1, 7.4: Close
    **{
        f"close-code-{c}": Row([OK, close(code_bytes(c))], None, closed=(c, ""))
        for c in CLOSE_CODES_OK
    },
    **{f"close-bad-code-{c}": Row([OK, close(code_bytes(c))], 1002) for c in CLOSE_CODES_BAD},
    "close-empty": Row([close()], None, closed=(None, "")),
    "close-reason": Row([close(code_bytes(1000, "bye €".encode()))], None, closed=(1000, "bye €")),
    "close-reason-123": Row([close(code_bytes(4000, b"r" * 123))], None, closed=(4000, "r" * 123)),
    "close-inside-fragmented-message": Row(
        [text(b"a", False), close(code_bytes(1001))], None, closed=(1001, "")
    ),
    "close-1-byte": Row([OK, close(b"\x03")], 1002),
    "close-reason-invalid-utf8": Row([OK, close(code_bytes(1000, b"\xff"))], 1007),
    "close-reason-surrogate": Row([OK, close(code_bytes(1000, b"\xed\xa0\x80"))], 1007),
    "close-reason-truncated": Row([OK, close(code_bytes(1000, b"ok\xe2\x82"))], 1007),
}
AFTER = text(b"after")  # sent after a failure or a Close: must be ignored


def row_params():
    for name, row in ROWS.items():
        for mode in MODES:
            for direction in DIRECTIONS:
                yield pytest.param(row, mode, direction, id=f"{name}-{mode}-{direction}")


@pytest.mark.parametrize(("row", "mode", "direction"), list(row_params()))
def test_rule(row: Row, mode: str, direction: str) -> None:
    validate, from_client = MODES[mode], DIRECTIONS[direction]
    code = row.message if validate or row.tunnel == "same" else row.tunnel
    kw = row.kw or {}
    wires = [build(f, from_client) for f in row.frames]
    ends = code is not None or row.closed is not None
    data = b"".join(wires) + (build(AFTER, from_client) if ends else b"")
    bad = len(wires) - 1 if code is not None else len(wires)

    # one read: the frames before the offending one come out byte for byte, nothing else
    e = FrameEngine(from_client, validate_utf8=validate, **kw)
    out = e.receive(data)
    assert (e.failed or (None,))[0] == code, e.failed
    assert out == b"".join(wires[:bad])
    assert e.closed == (row.closed if code is None else None)
    assert e.done == ends
    if ends:
        assert e.receive(build(OK, from_client)) == b""

    # byte by byte (or in small reads for the big rows): the same outcome, at frame boundaries
    step = 1 if len(data) < 4096 else 997
    e = FrameEngine(from_client, validate_utf8=validate, **kw)
    dec = Decoder(from_client)
    for i in range(0, len(data), step):
        dec.feed(e.receive(data[i : i + step]))
        assert dec.buf == b""
    assert (e.failed or (None,))[0] == code, e.failed
    assert e.closed == (row.closed if code is None else None)
    if code is None:
        ref = decode(b"".join(wires), from_client)
        assert (dec.events, dec.open) == (ref.events, ref.open)
    else:
        check_failed_output(dec, b"".join(wires[:bad]), row.frames[bad], code, from_client)


# invalid UTF-8 fails on the byte that makes it invalid, not later (Autobahn 6.4: "fail fast")
FAIL_FAST = [
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xe0\x80\x80",
    b"\xf0\x80\x80\x80",
    b"\xc0\xaf",
    b"\xf5",
    b"\xff",
    b"\x80",
    b"\xce(",
    b"\xe2\x82(",
]


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("bad", FAIL_FAST, ids=[b.hex() for b in FAIL_FAST])
def test_utf8_fails_fast(bad: bytes, direction: str, fragmented: bool) -> None:
    from_client = DIRECTIONS[direction]
    payload = "κό".encode() + bad + b"tail"
    error = utf8_error_at(payload, final=True)
    assert error is not None
    if fragmented:  # one fragment per byte, so the check runs across fragment boundaries
        frames = [text(payload[:1], False)] + [
            cont(payload[k : k + 1], False) for k in range(1, len(payload))
        ]
        frames.append(cont(b""))
    else:
        frames = [text(payload)]
    for validate in (True, False):
        e = FrameEngine(from_client, validate_utf8=validate)
        fed = 0  # payload bytes fed so far
        for f in frames:
            wire = build(f, from_client)
            head = len(wire) - len(f.payload)
            e.receive(wire[:head])
            for k in range(len(f.payload)):
                assert e.failed is None, (validate, fed)
                e.receive(wire[head + k : head + k + 1])
                fed += 1
                if validate and fed == error + 1:
                    assert e.failed is not None and e.failed[0] == 1007
                    break
            if e.failed:
                break
        assert (e.failed is not None) == validate


# -- 2. Close, sink_open, expect_pong -------------------------------------------------------------


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_close_forwarded_and_ends_the_direction(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    frame = build(close(code_bytes(1001, "gone €".encode()), key=b"\x01\x02\x03\x04"), from_client)
    e = FrameEngine(from_client, validate_utf8=True)
    out = e.receive(frame + build(OK, from_client) + b"\xff\xff junk")
    assert out == frame
    assert e.closed == (1001, "gone €") and e.done and e.failed is None
    assert e.receive(build(OK, from_client)) == b""
    assert (e.messages, e.controls) == (0, 1)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_empty_close(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    frame = build(close(), from_client)
    e = FrameEngine(from_client, validate_utf8=False)
    assert e.receive(frame[:1]) == b""
    assert e.receive(frame[1:]) == frame
    assert e.closed == (None, "") and e.done


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_close_in_pieces(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    frame = build(close(code_bytes(1000, b"bye")), from_client)
    e = FrameEngine(from_client, validate_utf8=True)
    out = b"".join(e.receive(frame[k : k + 1]) for k in range(len(frame)))
    assert out == frame and e.closed == (1000, "bye")


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_sink_closed_parses_but_forwards_nothing(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    frames = [
        text(b"hello"),
        binary(b"x" * 300, False),
        ping(b"p"),
        cont(b"y" * 70000),
        pong(b""),
        text("é".encode(), False),
        cont(b""),
    ]
    data = build_all(frames, from_client)
    for step in (len(data), 1000, 7):
        e = FrameEngine(from_client, validate_utf8=True)
        e.sink_open = False
        out = b"".join(e.receive(data[k : k + step]) for k in range(0, len(data), step))
        assert out == b"" and e.failed is None and not e.done
        assert (e.messages, e.bytes, e.controls) == (3, 5 + 70300 + 2, 2)
        end = build(close(code_bytes(1000, b"x")), from_client) + build(OK, from_client)
        assert e.receive(end) == b""
        assert e.closed == (1000, "x") and e.done and e.controls == 3
    # and it still finds violations
    e = FrameEngine(from_client, validate_utf8=True)
    e.sink_open = False
    assert e.receive(build_all([text(b"a", False), text(b"\xff")], from_client)) == b""
    assert e.failed is not None and e.failed[0] == 1002


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_sink_closed_in_the_middle_of_a_frame(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    data = build(binary(b"0123456789"), from_client)
    e = FrameEngine(from_client, validate_utf8=True)
    dec = Decoder(from_client)
    dec.feed(e.receive(data[:-4]))
    assert dec.buf == b"" and bytes(dec.open[2]) == b"012345"
    e.sink_open = False
    assert e.receive(data[-4:]) == b""
    assert e.messages == 1 and e.bytes == 10


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_expect_pong_consumes_only_the_answer(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    e = FrameEngine(from_client, validate_utf8=True)
    e.expect_pong = b"gate-1"
    other = build(pong(b"gate-2"), from_client)
    assert e.receive(other) == other
    same_ping = build(ping(b"gate-1"), from_client)
    assert e.receive(same_ping) == same_ping  # a Ping, not the answer
    answer = build(pong(b"gate-1"), from_client)
    frames = build_all([text(b"a", False), pong(b"gate-1"), cont(b"b")], from_client)
    out = e.receive(frames[:9]) + e.receive(frames[9:])
    assert e.expect_pong is None
    assert decode(out, from_client).events == [("msg", TEXT, False, b"ab")]
    assert e.receive(answer) == answer  # only one answer is consumed
    assert e.controls == 4 and e.failed is None


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_expect_empty_pong(direction: str) -> None:
    from_client = DIRECTIONS[direction]
    e = FrameEngine(from_client, validate_utf8=False)
    e.expect_pong = b""
    wire = build(pong(b"x"), from_client) + build(pong(b""), from_client)
    assert e.receive(wire) == build(pong(b"x"), from_client)
    assert e.expect_pong is None


# -- regressions found by these tests ------------------------------------------------------------


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_control_payload_that_looks_like_frames(direction: str) -> None:
    """
    A Ping cut after its header: the next read is the rest of the Ping, whatever its bytes look
    like (here: on the wire, two empty binary frames).
    """
    from_client = DIRECTIONS[direction]
    key = b"\x11\x22\x33\x44"
    lookalike = build(binary(b"", key=b"\0\0\0\0"), from_client) * 2
    payload = mask(lookalike, key) if from_client else lookalike  # so the wire shows `lookalike`
    frame = build(ping(payload, key=key), from_client)
    head = 6 if from_client else 2
    assert frame[head:] == lookalike
    e = FrameEngine(from_client, validate_utf8=True)
    out = e.receive(frame[:head]) + e.receive(frame[head:])
    assert out == frame
    assert (e.messages, e.controls) == (0, 1)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_control_frame_completed_by_a_read_of_its_own_size(direction: str) -> None:
    """
    A Ping (or Close) cut by a read, whose second read (the rest of it and then something that
    forwards nothing: half a header, bytes after a Close) is as long as the whole frame.
    """
    from_client = DIRECTIONS[direction]
    frame = build(ping(b"ABCDEFGH"), from_client)
    nxt = build(binary(b"x" * 70000), from_client)
    cut = (6 if from_client else 2) + 2  # in the payload
    e = FrameEngine(from_client, validate_utf8=True)
    out = e.receive(frame[:cut]) + e.receive(frame[cut:] + nxt[:cut])
    assert out == frame

    frame = build(close(code_bytes(1000, b"bye")), from_client)
    e = FrameEngine(from_client, validate_utf8=True)
    out = e.receive(frame[:cut]) + e.receive(frame[cut:] + b"\0" * cut)
    assert out == frame


# -- 3. valid streams, any chunking --------------------------------------------------------------

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
BIG_SIZES = [125, 126, 127, 300, 65535, 65536, 70000]


@dataclass
class Ctx:
    draw: st.DrawFn
    rnd: random.Random
    from_client: bool
    deflate: bool
    big: bool  # whether payloads over 125 bytes may be drawn
    frames: list[F]
    events: list[tuple]


def draw_payload(c: Ctx, is_text: bool) -> bytes:
    if c.big and c.draw(st.integers(0, 9)) == 0:
        n = c.draw(st.sampled_from(BIG_SIZES))
        if is_text:
            return ("aé€𝄞" * (n // 10 + 1)).encode()
        return (bytes(range(256)) * (n // 256 + 1))[:n]
    if is_text:
        return c.draw(st.text(max_size=40)).encode()
    return c.draw(st.binary(max_size=80))


def add_control(c: Ctx, ops: tuple[int, ...] = (PING, PONG)) -> None:
    op = c.draw(st.sampled_from(ops))
    key = c.rnd.randbytes(4)
    if c.draw(st.integers(0, 3)) == 0:
        # a payload that shows frames on the wire (as the engine reads them)
        inner = build(binary(b"", key=c.rnd.randbytes(4)), c.from_client)
        wire = (inner * 20)[: c.draw(st.integers(0, 125))]
        payload = mask(wire, key) if c.from_client else wire
    else:
        payload = c.draw(st.binary(max_size=125))
    c.frames.append(F(op, payload, key=key))
    c.events.append(("ctl", op, payload))


def add_message(c: Ctx, finish: bool = True) -> tuple[list, list[int], bool]:
    """
    Add a text or binary message, maybe compressed, maybe fragmented (empty fragments included),
    with controls between its fragments.  Without ``finish`` its final fragment is left out.
    Returns ``[opcode, rsv1, payload sent]``, the frame sizes, and whether it was one frame.
    """
    draw = c.draw
    op = draw(st.sampled_from([TEXT, BINARY]))
    compressed = c.deflate and draw(st.booleans())
    payload = draw_payload(c, op == TEXT and not compressed)
    if finish and not draw(st.booleans()):
        pieces = [payload]
    else:
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), min_size=1, max_size=5)))
        bounds = [0, *cuts, len(payload)]
        pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        if not finish:
            pieces = pieces[:-1]
    rsv = RSV1 if compressed else 0
    for k, piece in enumerate(pieces):
        if k and draw(st.integers(0, 3)) == 0:
            add_control(c)
        fin = finish and k == len(pieces) - 1
        c.frames.append(
            F(CONT if k else op, piece, fin, rsv if not k else 0, key=c.rnd.randbytes(4))
        )
    sent = b"".join(pieces)
    if finish:
        c.events.append(("msg", op, compressed, payload))
    if not finish and draw(st.booleans()):
        add_control(c)
    return [op, compressed, sent], [len(p) for p in pieces], len(pieces) == 1


def boundaries(frames: list[F], from_client: bool) -> list[int]:
    """Where each frame and each payload starts in the built stream: the cuts worth trying."""
    marks, at = [], 0
    for f in frames:
        wire = build(f, from_client)
        marks += [at, at + len(wire) - len(f.payload)]
        at += len(wire)
    return marks


def draw_chunks(draw: st.DrawFn, wire: bytes, marks: list[int]) -> list[bytes]:
    n = len(wire)
    if n <= 1500 and draw(st.integers(0, 4)) == 0:
        cuts: list[int] = list(range(1, n))
    else:
        where = st.integers(0, n)
        if marks:
            near = st.tuples(st.sampled_from(marks), st.integers(-2, 2)).map(sum)
            where = st.one_of(where, near.map(lambda k: min(max(k, 0), n)))
        cuts = sorted(draw(st.lists(where, max_size=30)))
    bounds = [0, *cuts, n]
    return [wire[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass
class Stream:
    from_client: bool
    validate: bool
    kw: dict
    tap: bool
    wire: bytes
    chunks: list[bytes]
    forwarded: bytes = b""  # the expected output of a valid stream
    events: list | None = None
    counts: tuple = ()
    closed: tuple | None = None
    whole_only: bool = False  # only whole single-frame messages
    # an invalid stream
    prefix: bytes = b""
    bad: F | None = None
    code: int = 0
    kind: str = ""

    def engine(self) -> FrameEngine:
        e = FrameEngine(self.from_client, validate_utf8=self.validate, **self.kw)
        if self.tap:
            e.tap = []
        return e


@st.composite
def valid_streams(draw: st.DrawFn) -> Stream:
    from_client, validate, deflate = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    c = Ctx(draw, random.Random(draw(st.integers(0, 2**32))), from_client, deflate, True, [], [])
    whole_only = True
    frame_sizes, message_sizes, messages = [0], [0], []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 3)) == 0:
            add_control(c)
            whole_only = False
        else:
            msg, sizes, single = add_message(c)
            whole_only &= single
            frame_sizes += sizes
            message_sizes.append(len(msg[2]))
            messages.append(msg)
    closed = None
    ending = draw(st.integers(0, 3))
    if ending >= 2:
        if ending == 2:
            payload, closed = b"", (None, "")
        else:
            code = draw(st.sampled_from(CLOSE_CODES_OK))
            reason = draw(st.text(max_size=50))
            while len(reason.encode()) > 123:
                reason = reason[:-1]
            payload, closed = code_bytes(code, reason.encode()), (code, reason)
        c.frames.append(F(CLOSE, payload, key=c.rnd.randbytes(4)))
        c.events.append(("ctl", CLOSE, payload))
        whole_only = False
    forwarded = build_all(c.frames, from_client)
    wire = forwarded + (draw(st.binary(max_size=20)) if closed else b"")
    kw: dict = {"deflate": deflate}
    if draw(st.booleans()):  # limits just large enough
        kw["max_frame"] = max(frame_sizes) + draw(st.integers(0, 1))
        kw["max_message"] = max(message_sizes) + draw(st.integers(0, 1))
    tap = draw(st.booleans())
    data_frames = [f for f in c.frames if f.op < 8]
    counts = (
        len(messages),
        sum(len(f.payload) for f in data_frames),
        len(c.frames) - len(data_frames),
    )
    return Stream(
        from_client, validate, kw, tap, wire, draw_chunks(draw, wire, boundaries(c.frames, from_client)),
        forwarded, c.events,
        counts, closed, whole_only and not tap,
    )  # fmt: skip


@SETTINGS
@given(s=valid_streams())
def test_valid_stream_any_chunking(s: Stream) -> None:
    # in one read: the same bytes, and the same object when only whole messages came
    e = s.engine()
    out = e.receive(s.wire)
    assert e.failed is None
    assert out == s.forwarded
    if s.whole_only:
        assert out is s.wire
    one_read = (e.messages, e.bytes, e.controls)
    assert one_read == s.counts
    assert e.closed == s.closed and e.done == (s.closed is not None)

    # in any reads: every output ends at a frame boundary, and the same messages come out
    e = s.engine()
    dec = Decoder(s.from_client)
    for chunk in s.chunks:
        dec.feed(e.receive(chunk))
        assert dec.buf == b"", "an output did not end at a frame boundary"
    assert e.failed is None
    assert dec.events == s.events
    assert dec.open is None
    assert (e.messages, e.bytes, e.controls) == one_read
    assert e.closed == s.closed and e.done == (s.closed is not None)
    if s.tap:
        msgs = [ev for ev in s.events if ev[0] == "msg"]
        assert e.tap == [(op == BINARY, len(p), p[:64]) for _, op, _, p in msgs]


def pumped(e: FrameEngine, chunks: list[bytes], direct: bool) -> tuple[bytes, int]:
    """
    Drive ``e`` as a relay reading one socket and writing another (``Relay.read``): each chunk
    arrives on a socket the engine pumps (or, when it declines, reads and ``receive``s); what it
    sends the sink directly (``direct``) and what it hands back are put together in order.
    Returns what reached the sink and how many reads the engine pumped.
    """
    source_in, source = socket.socketpair()
    sink, sink_out = socket.socketpair()
    with source_in, source, sink, sink_out:
        source.setblocking(False)
        sink.setblocking(False)
        sink_out.setblocking(False)
        arrived, pumps = b"", 0

        def drain() -> bytes:
            got = b""
            while True:
                try:
                    more = sink_out.recv(1 << 20)
                except BlockingIOError:
                    return got
                got += more

        for chunk in filter(None, chunks):
            source_in.sendall(chunk)
            got = e.pump(source.fileno(), sink.fileno() if direct else -1, len(chunk))
            if got is None:
                out = e.receive(source.recv(len(chunk)))
            else:
                pumps += 1
                n, out = got
                assert n == len(chunk)
            arrived += drain() + out
        return arrived, pumps


@SETTINGS
@given(s=valid_streams(), direct=st.booleans())
def test_valid_stream_pumped(s: Stream, direct: bool) -> None:
    """A valid stream read through ``pump`` where the engine takes it, in any reads, reaches the
    sink as the same messages and control frames, counted the same, as through ``receive``."""
    e = s.engine()
    arrived, pumps = pumped(e, s.chunks, direct)
    assert e.failed is None
    dec = Decoder(s.from_client)
    dec.feed(arrived)
    assert dec.buf == b"" and dec.open is None
    assert dec.events == s.events
    assert (e.messages, e.bytes, e.controls) == s.counts
    assert e.closed == s.closed and e.done == (s.closed is not None)
    if s.chunks and not s.tap and s.wire:
        assert pumps, "the first read starts between messages: the engine pumps it"


def test_pump_io(utf8_twin: type[frames.Utf8Check]) -> None:
    """What ``pump`` reports of its socket I/O, the same in both twins: nothing to read, whole
    messages sent on at once or handed back, a walk cut short (nothing sent), a dead sink (nothing
    sent, all handed back) and the source's end."""
    twin = utf8_twin()
    two = build(binary(b"ab"), False) + build(text("é".encode()), False)
    args = (False, False, 1 << 63, 1 << 62, True)
    source_in, source = socket.socketpair()
    sink, sink_out = socket.socketpair()
    with source_in, source, sink, sink_out:
        source.setblocking(False)
        sink.setblocking(False)
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args) == (-1, 0, 0, 0, b"")
        source_in.sendall(two)
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args) == (
            len(two),
            len(two),
            2,
            4,
            b"",
        )
        assert sink_out.recv(100) == two
        source_in.sendall(two)
        assert twin.pump(source.fileno(), -1, 100, *args) == (len(two), len(two), 2, 4, two)
        ping = build(F(PING, b"p"), False)
        source_in.sendall(two + ping)
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args) == (
            len(two) + len(ping),
            len(two),
            2,
            4,
            two + ping,
        )
        source_in.sendall(two)
        assert twin.pump(source.fileno(), sink.fileno(), 3, *args) == (3, 0, 0, 0, two[:3])
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args)[1:] == (0, 0, 0, two[3:])
        sink_out.close()
        source_in.sendall(two)
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args) == (
            len(two),
            len(two),
            2,
            4,
            two,
        )
        source_in.close()
        assert twin.pump(source.fileno(), sink.fileno(), 100, *args) == (0, 0, 0, 0, b"")


def tcp_pair(buffer: int = 0) -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection, the second non-blocking; with ``buffer``, both
    ends' kernel buffers that small (so that a large send is taken only in part)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.socket()
        if buffer:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        near.connect(listener.getsockname())
        far, _ = listener.accept()
    if buffer:
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    near.setblocking(False)
    return far, near


def test_pump_partial_send(utf8_twin: type[frames.Utf8Check]) -> None:
    """A sink that takes part of a read of whole messages: the rest is handed back, in order."""
    twin = utf8_twin()
    wire = build(binary(bytes(range(256)) * 4), False) * 64  # 64 KiB and a bit
    source_in, source = socket.socketpair()
    sink_out, sink = tcp_pair(buffer=4096)
    with source_in, source, sink, sink_out:
        source.setblocking(False)
        source_in.sendall(wire)
        flags = (False, False, 1 << 63, 1 << 62, False)
        n, end, count, _, rest = twin.pump(source.fileno(), sink.fileno(), 1 << 20, *flags)
        assert (n, end, count) == (len(wire), len(wire), 64)
        assert 0 < len(rest) < n, "a 4 KiB send buffer takes some of 64 KiB, not all of it"
        sink_out.settimeout(5)
        arrived = b""
        while len(arrived) < n - len(rest):
            arrived += sink_out.recv(1 << 20)
        assert arrived + rest == wire


# -- 4. a valid prefix and one offending frame, any chunking --------------------------------------

INVALID_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                b"\xf4\x90\x80\x80", b"\xf5", b"\xe2\x82(", b"\xe2\x82"]  # fmt: skip


def offending_frame(c: Ctx, kind: str, open_msg: list | None) -> tuple[F, int]:
    """The offending frame of ``kind`` (it breaks that rule only) and the code it fails with."""
    draw, key = c.draw, c.rnd.randbytes(4)
    data_op = CONT if open_msg else draw(st.sampled_from([TEXT, BINARY]))
    ctl_op = draw(st.sampled_from([PING, PONG, CLOSE]))
    ctl_payload = code_bytes(1000, b"x") if ctl_op == CLOSE else b"p"
    small = draw(st.binary(max_size=8))  # never read: every rule but UTF-8 is in the header
    fin = draw(st.booleans())
    if kind == "mask":
        if draw(st.booleans()):
            return F(data_op, small, fin, wrong_mask=True, key=key), 1002
        return F(ctl_op, ctl_payload, wrong_mask=True, key=key), 1002
    if kind in ("rsv2", "rsv3"):
        rsv = RSV2 if kind == "rsv2" else RSV3
        if draw(st.booleans()):
            return F(data_op, small, fin, rsv=rsv, key=key), 1002
        return F(ctl_op, ctl_payload, rsv=rsv, key=key), 1002
    if kind == "rsv1_no_deflate":
        return F(data_op, small, fin, rsv=RSV1, key=key), 1002
    if kind == "rsv1_continuation":
        return F(CONT, small, fin, rsv=RSV1, key=key), 1002
    if kind == "rsv1_control":
        return F(ctl_op, ctl_payload, rsv=RSV1, key=key), 1002
    if kind == "opcode":
        return F(draw(st.sampled_from(RESERVED_OPCODES)), small, fin, key=key), 1002
    if kind == "control_fin0":
        return F(ctl_op, ctl_payload, False, key=key), 1002
    if kind == "control_long":
        n = draw(st.integers(126, 300))
        return F(ctl_op, (ctl_payload + b"r" * n)[:n], key=key), 1002
    if kind == "continuation_outside":
        return F(CONT, small, fin, key=key), 1002
    if kind == "new_inside":
        return F(draw(st.sampled_from([TEXT, BINARY])), b"", fin, key=key), 1002
    if kind == "length_top_bit":
        length = (1 << 63) | draw(st.integers(0, (1 << 63) - 1))
        return F(data_op, small, fin, length=length, wide=True, key=key), 1002
    if kind == "close_code":
        return F(CLOSE, code_bytes(draw(st.sampled_from(CLOSE_CODES_BAD)), b"why"), key=key), 1002
    if kind == "close_1_byte":
        return F(CLOSE, draw(st.binary(min_size=1, max_size=1)), key=key), 1002
    if kind == "close_reason":
        reason = b"ok" + draw(st.sampled_from(INVALID_UTF8))
        return F(CLOSE, code_bytes(draw(st.sampled_from(CLOSE_CODES_OK)), reason), key=key), 1007
    assert kind == "utf8"
    bad = draw(st.sampled_from(INVALID_UTF8))
    head = draw(st.text(max_size=10)).encode()
    tail = b"" if bad == b"\xe2\x82" else draw(st.text(max_size=10)).encode()
    fin = True if bad == b"\xe2\x82" else fin
    payload = head + bad + tail
    sent = bytes(open_msg[2]) if open_msg else b""
    assume(utf8_error_at(sent + payload, fin) is not None)
    return F(CONT if open_msg else TEXT, payload, fin, key=key), 1007


@st.composite
def invalid_streams(draw: st.DrawFn) -> Stream:
    from_client, validate, deflate = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    c = Ctx(draw, random.Random(draw(st.integers(0, 2**32))), from_client, deflate, False, [], [])
    frame_sizes, message_sizes = [0], [0]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 3)) == 0:
            add_control(c)
        else:
            msg, sizes, _ = add_message(c)
            frame_sizes += sizes
            message_sizes.append(len(msg[2]))
    open_msg = None
    if draw(st.booleans()):
        open_msg, sizes, _ = add_message(c, finish=False)
        frame_sizes += sizes
        message_sizes.append(len(open_msg[2]))
    kinds = ["mask", "rsv2", "rsv3", "rsv1_control", "opcode", "control_fin0", "control_long",
             "length_top_bit", "close_code", "close_1_byte", "close_reason", "max_frame",
             "max_message"]  # fmt: skip
    if open_msg:
        kinds += ["rsv1_continuation", "new_inside"]
        if validate and open_msg[0] == TEXT and not open_msg[1]:
            kinds.append("utf8")
    else:
        kinds.append("continuation_outside")
        if not deflate:
            kinds.append("rsv1_no_deflate")
        if validate:
            kinds.append("utf8")
    kind = draw(st.sampled_from(kinds))
    open_size = len(open_msg[2]) if open_msg else 0
    kw: dict = {"deflate": deflate}
    if kind in ("max_frame", "max_message"):
        kw[kind] = max(frame_sizes if kind == "max_frame" else message_sizes) + draw(
            st.integers(0, 3)
        )
        kw[kind] = max(kw[kind], 1)
        if kind == "max_frame":
            n = kw[kind] + 1
        else:
            n = kw[kind] - open_size + 1
        op = CONT if open_msg else draw(st.sampled_from([TEXT, BINARY]))
        fill = b"x" * n
        bad, code = F(op, fill, draw(st.booleans()), key=c.rnd.randbytes(4)), 1009
    else:
        bad, code = offending_frame(c, kind, open_msg)
        if draw(st.booleans()):  # limits that the offending frame keeps to
            size = len(bad.payload) if bad.op < 8 and bad.length is None else 0
            kw["max_frame"] = max(*frame_sizes, size, 1) + draw(st.integers(0, 3))
            kw["max_message"] = max(*message_sizes, open_size + size, 1) + draw(st.integers(0, 3))
    prefix = build_all(c.frames, from_client)
    after = build(AFTER, from_client) + draw(st.binary(max_size=16))
    wire = prefix + build(bad, from_client) + after
    return Stream(
        from_client, validate, kw, draw(st.booleans()), wire,
        draw_chunks(draw, wire, boundaries([*c.frames, bad], from_client)),
        prefix=prefix, bad=bad, code=code, kind=kind,
    )  # fmt: skip


@SETTINGS
@given(s=invalid_streams())
def test_invalid_stream_any_chunking(s: Stream) -> None:
    assert s.bad is not None
    e = s.engine()
    out = e.receive(s.wire)
    assert e.failed is not None and e.failed[0] == s.code, (s.kind, e.failed)
    assert out == s.prefix
    assert e.done and e.closed is None
    assert e.receive(build(OK, s.from_client)) == b""

    e = s.engine()
    dec = Decoder(s.from_client)
    for chunk in s.chunks:
        dec.feed(e.receive(chunk))
        assert dec.buf == b"", "an output did not end at a frame boundary"
    assert e.failed is not None and e.failed[0] == s.code, (s.kind, e.failed)
    check_failed_output(dec, s.prefix, s.bad, s.code, s.from_client)

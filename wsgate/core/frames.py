"""
The frame engine: one direction of an open WebSocket session, as bytes in and bytes out.

A :class:`FrameEngine` is fed the bytes one peer sent, in whatever chunks the network delivered
them, and returns the bytes to write to the other peer.  It knows RFC 6455 framing and nothing
else: no sockets, no clock, no Twisted, no Autobahn.  The session's driver (``wsgate/dataplane/bridge.py``)
calls :meth:`FrameEngine.receive` for every read and writes what it returns.

What happens to every byte
==========================

The engine walks the stream frame by frame.  For each frame header it checks the rules an
endpoint enforces (RFC 6455 5.1-5.8), then:

- **Data frames** (text, binary, continuation) are forwarded with their payload untouched: client
  frames stay masked toward the backend (with the client's own key), backend frames stay unmasked
  toward the client.  A frame that arrived whole goes out as the same bytes.  A frame cut by the
  end of a read is forwarded *as a fragment* of what has arrived (a new header for the piece, the
  mask key rotated to where the piece starts), and the rest follows as continuation fragments.  So
  whatever the engine returns always ends at a frame boundary: the gate can send its own Close or
  Ping between two reads without waiting for a frame to finish, and a frame is never held whole
  in memory.  (An intermediary may change fragmentation, RFC 6455 5.4; with permessage-deflate
  RSV1 stays on the first fragment only, as RFC 7692 6.1 asks.)
- **Control frames** (at most 125 bytes) are buffered until whole, then:
  Ping is forwarded (pings run end to end: the far endpoint answers, and the answer comes back the
  other way); Pong is forwarded unless it answers the gate's own Ping (``expect_pong``), which is
  consumed; a valid Close is forwarded and ends the direction (``closed``), so the close handshake
  runs end to end and the answer comes from the other endpoint.
- Once the sink has been sent a Close (``sink_open`` is False), frames are still parsed (to find
  the source's own Close) but nothing more is forwarded.
- After the source's Close, or a violation, the rest of its bytes are ignored (``done``).

Validation
==========

``validate_utf8`` selects the route's mode: ``message`` (True) checks everything an endpoint
checks; ``tunnel`` (False) checks the same framing and Close rules but not the UTF-8 of text
messages.  Every check, with the code an endpoint closes with:

=========================================================  ======
rule                                                        code
=========================================================  ======
client frames masked, backend frames not (5.1, 5.3)         1002
RSV1 only on a message's first frame, only with deflate;    1002
RSV2 and RSV3 never (5.2, RFC 7692)
opcode is 0-2 or 8-10 (5.2)                                 1002
control frames: fin set, payload at most 125 bytes (5.5)    1002
continuation only inside a message, and no new message      1002
inside one (5.4)
64-bit length with the top bit clear (5.2)                  1002
Close payload: empty, or a valid code (7.4) and a reason    1002
Close reason is UTF-8 (5.5.1)                               1007
text message is UTF-8, checked as fragments arrive          1007
(message mode; not for compressed messages, see below)
a frame over ``max_frame`` or a message over                1009
``max_message`` bytes (0: no limit)
=========================================================  ======

A violation sets ``failed`` to ``(code, reason)``; what was returned before it (whole frames, and
fragments of the message in progress) has been forwarded, and the message the offending frame
belongs to is never completed toward the sink: the driver closes the sink next, so its endpoint
never delivers that message.  Nothing of the offending frame is forwarded, with one exception that
streaming cannot avoid: invalid UTF-8 in a text frame cut by reads is found only when its bytes
arrive, after the valid start of that frame went on as non-final fragments.  A frame header that
breaks a rule, or a frame over a limit, is refused before any of its bytes go on.

UTF-8 is checked by one of two twins with the same verdicts at the same bytes (the tests run the
engine with each): :class:`CUtf8`, a small C validator (``_utf8.c``) that reads masked payloads in
place without copying, 32 bytes at a time with AVX2 (16 with SSSE3; a scalar state machine
elsewhere): 64 KiB of accented JSON in 2.9 us; and :class:`PyUtf8`, used when the C module could
not be built, which unmasks and feeds CPython's incremental UTF-8 decoder (itself faster than
Autobahn's NVX validator here: 64 KiB in 26 us against 129 us) and checks at once the one rule
that decoder leaves pending (a surrogate's first two bytes, ``ED A0``-``ED BF``), so invalid text
fails as early as an endpoint fails it.
The same twins walk the engine's fast path (:meth:`Utf8Check.scan`): the leading run of whole
single-frame messages of a read, which is what an open session's reads nearly always are.  In C
that walk costs 0.4 us for a read of four 1 KiB messages against 1.7 us in Python; the tests
check that both stop at the same byte with the same counts.  A driver that reads one socket and
writes another can let the engine do both (:meth:`FrameEngine.pump`, :meth:`Utf8Check.pump`):
in C the read lands in one reused buffer, is walked there and sent on when it is whole messages,
and only what is left becomes a bytes object; the pure-Python twin does the same with
``os.read`` and ``os.write``.
Compressed (RSV1) text is not inflated: validating it would cost each session two zlib streams
with their 32 KiB windows (context takeover), several times what a whole session costs today; the
endpoints inflate it and check it themselves.

Counters: ``messages`` and ``bytes`` (data payload bytes) and ``controls`` (control frames) grow
as frames complete; the driver reads them for the registry, the access log, idle timers and rates.
While ``tap`` is a list, each completed message appends ``(is_binary, size, first bytes)``.

Close to 600 lines on purpose: the engine is one state machine whose rules (the table above), fast
path and partial-frame path must be read together to be checked against RFC 6455.
"""

from __future__ import annotations

import codecs
import os
import struct
from typing import Protocol

from autobahn.websocket.xormasker import create_xor_masker

try:
    from wsgate.core import _utf8  # type: ignore[attr-defined]
except ImportError:  # not compiled: the pure-Python twin does the work
    _utf8 = None

__all__ = [
    "CLOSE",
    "PING",
    "PONG",
    "UTF8_CHECKS",
    "CUtf8",
    "FrameEngine",
    "PyUtf8",
    "Utf8Check",
    "close_frame",
    "control_frame",
    "message_frame",
    "valid_close_code",
    "xor_mask",
]

CLOSE, PING, PONG = 8, 9, 10
_PREVIEW = 64
# Payloads up to this size are (un)masked with Python's big integers; larger ones with Autobahn's
# C masker, whose set-up costs more than a small XOR (64 B: 0.45 us against 2.2 us; 64 KiB: 86 us
# against 3.4 us).
_SMALL_XOR = 1024
_Piece = bytes | memoryview


def xor_mask(payload: bytes | memoryview, key: bytes | None, offset: int = 0) -> bytes:
    """Mask or unmask ``payload`` with a 4-byte ``key``, starting ``offset`` bytes into the key."""
    if key is None or not payload:
        return bytes(payload)
    n = len(payload)
    if offset % 4:
        offset %= 4
        key = key[offset:] + key[:offset]
    if n > _SMALL_XOR:
        return create_xor_masker(key, n).process(bytes(payload))  # type: ignore[no-any-return]
    stream = key * (n // 4 + 1)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream[:n], "big")).to_bytes(n, "big")


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a Close frame (RFC 6455 7.4, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def control_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    """A complete control frame (payload at most 125 bytes), masked with a random key if asked."""
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + xor_mask(payload, key)


def message_frame(payload: bytes, binary: bool, masked: bool) -> bytes:
    """A whole, unfragmented data message (text or binary), masked with a random key if asked."""
    key = os.urandom(4) if masked else None
    head = _header(0x82 if binary else 0x81, len(payload), key)
    return head + (payload if key is None else xor_mask(payload, key))


def close_frame(code: int | None, reason: str, masked: bool) -> bytes:
    """A Close frame; the reason is cut to fit 123 bytes without splitting a character."""
    if code is None:
        return control_frame(CLOSE, b"", masked)
    raw = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return control_frame(CLOSE, struct.pack("!H", code) + raw, masked)


class Utf8Check(Protocol):
    """
    An incremental UTF-8 check of one message's (possibly masked) text at a time, and the
    engine's fast path, which checks whole text messages on its way (:meth:`scan`).
    """

    def scan(
        self, data: bytes, masked: bool, deflate: bool, limit: int, quota: int, check: bool
    ) -> tuple[int, int, int]:
        """
        Walk the leading run of complete single-frame text and binary messages of ``data``: fin
        set, no RSV bit (RSV1 allowed with ``deflate``), masked exactly when ``masked``, payload
        at most ``limit`` bytes, text valid UTF-8 when ``check``; at most ``quota`` of them.
        Return where the run ends, its messages and their payload bytes.
        """

    def pump(
        self,
        source: int,
        sink: int,
        size: int,
        masked: bool,
        deflate: bool,
        limit: int,
        quota: int,
        check: bool,
    ) -> tuple[int, int, int, int, bytes]:
        """
        Read at most ``size`` bytes from the socket ``source``, walk them as :meth:`scan` does
        and, when they are whole messages only and ``sink`` is a socket (not -1), send them to it
        at once.  Return what was read (-1: nothing was there; 0: the stream's end), where the
        walk ended, its messages and payload bytes, and what is left for the caller: the bytes
        the sink did not take, or the whole read when the walk stopped short of its end.  A
        failed read raises :class:`OSError`; a failed send sends nothing (the caller's queued
        write meets the error again).
        """

    def whole(self, data: bytes, start: int, end: int, key: bytes | None) -> bool:
        """Whether ``data[start:end]`` (unmasked with ``key``) is a whole valid text."""

    def reset(self) -> None:
        """Start a new message."""

    def feed(self, chunk: _Piece, key: bytes | None, offset: int) -> bool:
        """Take the message's next bytes (masked with ``key`` from ``offset``); False when the
        text can no longer be valid."""

    def finish(self) -> bool:
        """Whether the message ends between two characters."""


class PyUtf8:
    """The pure-Python twin: unmask, then CPython's incremental UTF-8 decoder."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def scan(
        self, data: bytes, masked: bool, deflate: bool, limit: int, quota: int, check: bool
    ) -> tuple[int, int, int]:
        n = len(data)
        bit, key = (0x80, 4) if masked else (0, 0)
        first_bytes = (0x81, 0x82, 0xC1, 0xC2) if deflate else (0x81, 0x82)
        whole = self.whole
        i = count = total = 0
        while n - i >= 2 and count < quota:
            b0, b1 = data[i], data[i + 1]
            if b0 not in first_bytes or b1 & 0x80 != bit:
                break
            length = b1 & 0x7F
            start = i + 2
            if length == 126:
                if n - i < 4:
                    break
                length = data[i + 2] << 8 | data[i + 3]
                start += 2
            elif length == 127:
                if n - i < 10 or data[i + 2] & 0x80:
                    break
                length = int.from_bytes(data[i + 2 : i + 10], "big")
                start += 8
            end = start + key + length
            if end > n or length > limit:
                break
            if check and b0 == 0x81:
                mask = data[start : start + 4] if key else None
                if not whole(data, start + key, end, mask):
                    break
            count += 1
            total += length
            i = end
        return i, count, total

    def pump(
        self,
        source: int,
        sink: int,
        size: int,
        masked: bool,
        deflate: bool,
        limit: int,
        quota: int,
        check: bool,
    ) -> tuple[int, int, int, int, bytes]:
        try:
            data = os.read(source, size)  # a socket's read(2) is its recv(2) without flags
        except BlockingIOError:
            return -1, 0, 0, 0, b""
        n = len(data)
        i, count, total = self.scan(data, masked, deflate, limit, quota, check)
        sent = 0
        if i == n and n and sink >= 0:
            try:
                sent = os.write(sink, data)
            except OSError:
                sent = 0
        return n, i, count, total, data[sent:]

    def whole(self, data: bytes, start: int, end: int, key: bytes | None) -> bool:
        text = data[start:end] if key is None else xor_mask(data[start:end], key)
        if text.isascii():
            return True
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def reset(self) -> None:
        self._decoder.reset()

    def feed(self, chunk: _Piece, key: bytes | None, offset: int) -> bool:
        plain = xor_mask(chunk, key, offset)
        decoder = self._decoder
        if plain.isascii() and not decoder.getstate()[0]:
            return True
        try:
            decoder.decode(plain, False)
        except UnicodeDecodeError:
            return False
        pending = decoder.getstate()[0]
        # the decoder waits for a third byte before refusing a surrogate; an endpoint does not
        return not (len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0)

    def finish(self) -> bool:
        try:
            self._decoder.decode(b"", True)
        except UnicodeDecodeError:
            return False
        return True


class CUtf8:
    """The C twin (``_utf8.c``): checks masked bytes where they are, with SIMD where it can."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = 0  # 0: between characters; 8: invalid; else inside a character

    if _utf8 is not None:  # the walks are the C functions themselves: no Python call before them
        scan = staticmethod(_utf8.scan)
        pump = staticmethod(_utf8.pump)

    def whole(self, data: bytes, start: int, end: int, key: bytes | None) -> bool:
        return _utf8.check(data, start, end, key, 0, 0) == 0  # type: ignore[no-any-return]

    def reset(self) -> None:
        self._state = 0

    def feed(self, chunk: _Piece, key: bytes | None, offset: int) -> bool:
        self._state = _utf8.check(chunk, 0, len(chunk), key, offset, self._state)
        return self._state != 8

    def finish(self) -> bool:
        return self._state == 0


# The implementations available here, the fastest first: the engine uses the first.
UTF8_CHECKS: tuple[type[Utf8Check], ...] = (PyUtf8,) if _utf8 is None else (CUtf8, PyUtf8)


def _header(b0: int, length: int, key: bytes | None) -> bytes:
    """A frame header with first byte ``b0`` and the mask ``key`` (None: unmasked)."""
    bit = 0 if key is None else 0x80
    if length < 126:
        head = bytes((b0, bit | length))
    elif length < 65536:
        head = struct.pack("!BBH", b0, bit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, length)
    return head if key is None else head + key


class FrameEngine:
    """
    One direction of a session: ``receive(data)`` parses the source's bytes and returns those to
    write to the sink.  See the module docstring for what it forwards and checks.

    The driver reads, after each call: ``done`` (stop feeding it), ``closed`` (the source's Close:
    code or None, reason), ``failed`` (a violation: code, reason), and the counters.  It sets
    ``sink_open = False`` when it sends the sink a Close of the gate's own, ``expect_pong`` to the
    payload of a Ping the gate sent the *source* (its answer comes through this engine and is
    consumed), and ``tap`` to a list to collect message previews.
    """

    __slots__ = (
        "from_client", "validate_utf8", "deflate", "max_message", "max_frame", "messages",
        "bytes", "controls", "done", "closed", "failed", "sink_open", "expect_pong", "tap",
        "forwarded_close", "quota", "hold", "held",
        "_limit", "_head", "_remaining", "_control", "_key", "_offset", "_b0",
        "_fresh", "_fin", "_in_message", "_binary", "_check", "_utf8", "_size", "_preview",
        "_frame_head", "_control_size",
    )  # fmt: skip

    def __init__(
        self,
        from_client: bool,
        *,
        validate_utf8: bool,
        deflate: bool = False,
        max_message: int = 0,
        max_frame: int = 0,
        utf8: type[Utf8Check] | None = None,
    ) -> None:
        self.from_client = from_client  # client frames must be masked, backend frames must not
        self.validate_utf8 = validate_utf8
        self.deflate = deflate  # permessage-deflate was negotiated: RSV1 may mark a message
        self.max_message = max_message
        self.max_frame = max_frame
        self.messages = 0
        self.bytes = 0
        self.controls = 0
        self.done = False
        self.closed: tuple[int | None, str] | None = None
        self.failed: tuple[int, str] | None = None
        self.sink_open = True
        self.expect_pong: bytes | None = None
        self.tap: list[tuple[bool, int, bytes]] | None = None
        self.forwarded_close = False  # the source's Close went on to the sink
        # Messages (data and control) the source may still start: the driver's rate limit.  At
        # zero, a new message fails the direction with 1008, or with ``hold`` set is kept unread
        # (``held``) until the driver raises the quota and calls ``receive(b"")``.
        self.quota = 1 << 62
        self.hold = False
        self.held = False
        # the largest single-frame message the fast path may pass: both limits apply to it
        self._limit = min((x for x in (max_message, max_frame) if x > 0), default=1 << 63)
        self._head = b""  # a frame header (or control frame) not complete yet
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._control: bytearray | None = None  # the control frame being collected
        self._control_size = 0  # its whole size, header included
        self._frame_head = b""  # the current frame's header, as received
        self._key: bytes | None = None  # the current frame's mask key
        self._offset = 0  # payload bytes of the current frame already passed
        self._b0 = 0  # the current frame's first byte
        self._fresh = True  # no piece of the current data frame has been forwarded yet
        self._fin = False
        self._in_message = False  # between a message's first frame and its final one
        self._binary = False
        self._check = False  # the current message is text whose UTF-8 is checked
        self._utf8: Utf8Check = (utf8 or UTF8_CHECKS[0])()
        self._size = 0  # payload bytes of the current message so far
        self._preview = b""

    @property
    def in_message(self) -> bool:
        """Whether a message of the source is half relayed: no message of the gate's own may
        go to the sink now (control frames may)."""
        return self._in_message

    # -- bytes in, bytes out ----------------------------------------------------------------------

    def receive(self, data: bytes) -> bytes:
        """Take the source's next bytes; return what goes to the sink (possibly ``data`` itself)."""
        if self.done:
            return b""
        self.held = False
        if self._head:
            data, self._head = self._head + data, b""
        if self._between_messages():
            # The fast path: the leading run of complete single-frame text and binary messages
            # within the limits (text checked when the mode asks), walked by the UTF-8 twin
            # (in C with the C twin) and counted; the general parser takes over where it ends.
            i, count, total = self._utf8.scan(
                data, self.from_client, self.deflate, self._limit, self.quota, self.validate_utf8
            )
            return self._walked(data, i, len(data), count, total)
        return self._parse(data, 0)

    def pump(self, source: int, sink: int, size: int) -> tuple[int, bytes] | None:
        """
        :meth:`receive` with its I/O, for a driver reading one socket and writing another:
        read at most ``size`` bytes from the socket ``source`` and, when they are whole messages
        only (the fast path's), send them to the socket ``sink`` (-1: none may be written to
        directly) without a copy.  Returns what was read (-1: nothing was there; 0: the stream's
        end) and what the driver still writes to the sink; None, reading nothing, when the
        engine is not between messages (the driver then reads and calls :meth:`receive`).  A
        failed read raises :class:`OSError`.
        """
        if self.done or self._head or not self._between_messages():
            return None
        n, i, count, total, rest = self._utf8.pump(
            source,
            sink,
            size,
            self.from_client,
            self.deflate,
            self._limit,
            self.quota,
            self.validate_utf8,
        )
        if n <= 0:  # nothing to read, or the stream's end
            return n, b""
        return n, self._walked(rest, i, n, count, total)

    def _walked(self, data: bytes, i: int, n: int, count: int, total: int) -> bytes:
        """
        After the fast path's walk over a read of ``n`` bytes: count its ``count`` messages of
        ``total`` payload bytes, and return what goes to the sink: ``data`` itself when the walk
        reached the end (the common case: whole messages only, nothing to copy or change; for
        :meth:`pump`, what the sink did not take of them), else ``data`` (then the whole read)
        through the general parser from ``i``.
        """
        if count:
            self.messages += count
            self.bytes += total
            self.quota -= count
        return data if i == n else self._parse(data, i)

    def _between_messages(self) -> bool:
        """Whether the next byte starts a frame of a new message, which the fast path may take."""
        return (
            not (self._remaining or self._in_message or self.tap is not None)
            and self._control is None  # not inside a control frame cut by the last read
            and self.sink_open
        )

    def _parse(self, data: bytes, i: int) -> bytes:
        """The general parser, from ``data[i]``: what goes to the sink of ``data`` (``data[:i]``,
        whole messages the fast path counted, included)."""
        n = len(data)
        view = memoryview(data)
        out: list[_Piece] = [view[:i]] if i else []
        while i < n and not self.done:
            if self._remaining:
                take = min(self._remaining, n - i)
                self._payload(view[i : i + take], out)
                i += take
                continue
            if self._control is not None:
                take = min(self._control_size - len(self._control), n - i)
                self._control += view[i : i + take]
                i += take
                if len(self._control) == self._control_size:
                    self._control_done(out)
                continue
            i = self._frame_header(data, i, out)
            if i < 0:  # an incomplete header: kept for the next read
                break
        return b"".join(out)  # one bytes piece comes back as itself

    def _frame_header(self, data: bytes, i: int, out: list[_Piece]) -> int:
        """Parse the frame header at ``i``; return the offset after it, or -1 if incomplete."""
        n = len(data)
        if n - i < 2:
            self._head = data[i:]
            return -1
        b0, b1 = data[i], data[i + 1]
        length = b1 & 0x7F
        masked = bool(b1 & 0x80)
        size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if masked else 0)
        if n - i < size:
            self._head = data[i:]
            return -1
        if length == 126:
            length = int.from_bytes(data[i + 2 : i + 4], "big")
        elif length == 127:
            length = int.from_bytes(data[i + 2 : i + 10], "big")
        header = data[i : i + size]
        problem = self._check_header(b0, masked, length)
        if problem is not None:
            self._fail(*problem)
            return n
        if self.quota <= 0 and b0 & 0x0F:  # a new message or control frame, over the rate
            if self.hold:
                self._head, self.held = data[i:], True
                return -1
            self._fail(1008, "message rate limit exceeded")
            return n
        self._key = header[-4:] if masked else None
        self._b0, self._fin, self._offset, self._frame_head = b0, bool(b0 & 0x80), 0, header
        opcode = b0 & 0x0F
        if opcode >= 8:
            self._control = bytearray(header)
            self._control_size = size + length
            if not length:
                self._control_done(out)
            return i + size
        if opcode:
            self._in_message, self._binary, self._size, self._preview = True, opcode == 2, 0, b""
            self._check = self.validate_utf8 and opcode == 1 and not b0 & 0x40
            if self._check:
                self._utf8.reset()
        self._size += length
        if length > self.max_frame > 0:
            self._fail(1009, f"frame larger than {self.max_frame} bytes")
            return n
        if self._size > self.max_message > 0:
            self._fail(1009, f"message larger than {self.max_message} bytes")
            return n
        self._fresh = True
        self._remaining = length
        if length == 0:
            if self._check and self._fin and not self._utf8.finish():
                self._fail(1007, "invalid UTF-8 in a text message")
                return n
            self._frame_done()
            if self.sink_open:
                out.append(header)
        return i + size

    def _check_header(self, b0: int, masked: bool, length: int) -> tuple[int, str] | None:
        """The framing rule a frame header breaks, as (code, reason), or None."""
        opcode = b0 & 0x0F
        if masked != self.from_client:
            return 1002, "client frame not masked" if self.from_client else "masked server frame"
        if b0 & 0x30:
            return 1002, "reserved bits RSV2/RSV3 set"
        if b0 & 0x40 and not (self.deflate and opcode in (1, 2)):
            return 1002, "RSV1 set without permessage-deflate on a message's first frame"
        if length >> 63:
            return 1002, "frame length with the most significant bit set"
        if opcode >= 8:
            if opcode > PONG:
                return 1002, f"reserved opcode {opcode}"
            if not b0 & 0x80:
                return 1002, "fragmented control frame"
            if length > 125:
                return 1002, "control frame payload over 125 bytes"
            return None
        if opcode > 2:
            return 1002, f"reserved opcode {opcode}"
        if opcode == 0 and not self._in_message:
            return 1002, "continuation frame outside a message"
        if opcode and self._in_message:
            return 1002, "new message inside a fragmented one"
        return None

    def _payload(self, chunk: memoryview, out: list[_Piece]) -> None:
        """Pass on ``chunk``, the next payload bytes of the current data frame."""
        take = len(chunk)
        offset = self._offset
        self._remaining -= take
        self._offset += take
        self.bytes += take
        if self.tap is not None and len(self._preview) < _PREVIEW:
            self._preview += xor_mask(chunk[: _PREVIEW - len(self._preview)], self._key, offset)
        last = not self._remaining
        if self._check and not (
            self._utf8.feed(chunk, self._key, offset)
            and not (last and self._fin and not self._utf8.finish())
        ):
            self._fail(1007, "invalid UTF-8 in a text message")
            return
        if last:
            self._frame_done()
        if not self.sink_open:
            return
        if last and self._fresh and not offset:
            # the whole frame arrived in this read: forward it as it came
            out.append(self._frame_head)
        else:
            # a piece of a frame cut by a read: forward it as a fragment of its own
            fin = 0x80 if last and self._fin else 0
            b0 = fin | (self._b0 & 0x4F if self._fresh else 0)
            key = self._key
            if key is not None and offset % 4:
                key = key[offset % 4 :] + key[: offset % 4]
            out.append(_header(b0, take, key))
        self._fresh = False
        out.append(chunk)

    def _frame_done(self) -> None:
        if self._fin:
            self._in_message = False
            self.messages += 1
            self.quota -= 1
            if self.tap is not None:
                self.tap.append((self._binary, self._size, self._preview))

    def _control_done(self, out: list[_Piece]) -> None:
        frame, self._control = bytes(self._control or b""), None
        opcode = self._b0 & 0x0F
        payload = xor_mask(frame[len(self._frame_head) :], self._key)
        self.controls += 1
        self.quota -= 1
        if opcode == CLOSE:
            self._close(frame, payload, out)
            return
        if opcode == PONG and self.expect_pong is not None and payload == self.expect_pong:
            self.expect_pong = None  # the answer to the gate's own ping
            return
        if self.sink_open:
            out.append(frame)

    def _close(self, frame: bytes, payload: bytes, out: list[_Piece]) -> None:
        code: int | None = None
        if len(payload) == 1:
            self._fail(1002, "Close frame with a 1-byte payload")
            return
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            if not valid_close_code(code):
                self._fail(1002, f"invalid close code {code}")
                return
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "Close reason is not UTF-8")
            return
        self.done = True
        self.closed = (code, reason)
        if self.sink_open:
            out.append(frame)
            self.sink_open = False
            self.forwarded_close = True

    def _fail(self, code: int, reason: str) -> None:
        self.done = True
        self.failed = (code, reason)
        self._remaining, self._control = 0, None

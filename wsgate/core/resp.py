"""
RESP, the Redis serialization protocol (version 2), as bytes in and values out.

Owns encoding commands (arrays of bulk strings) and parsing replies from any chunking: simple
strings and bulk strings as ``bytes``, integers as ``int``, nil as ``None``, arrays as ``list``,
error replies as :class:`RedisError` values (returned, not raised: the driver fails the command
they answer).  A reply that breaks the protocol, or is larger than the parser's bounds, raises
:class:`RespProtocolError`; the driver then drops the connection.  Must not do I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RedisError", "RespParser", "RespProtocolError", "encode"]

_MAX_BULK = 64 * 1024 * 1024
_MAX_ITEMS = 1_000_000
_MAX_DEPTH = 8
_MAX_LINE = 64 * 1024
_INCOMPLETE = object()


class RedisError(Exception):
    """An error reply (``-ERR ...``) from the server."""


class RespProtocolError(Exception):
    """The server's bytes are not RESP, or exceed the parser's bounds."""


def encode(*args: bytes | str | int | float) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a RESP argument is bytes, str or a number, not a bool")
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespParser:
    """
    Incremental reply parser: ``feed(data)`` returns the replies completed by ``data``.  Arrays
    are built on a stack, so a large reply arriving in many reads is parsed once, not again from
    its start at every read.
    """

    def __init__(self, max_bulk: int = _MAX_BULK, max_items: int = _MAX_ITEMS) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._stack: list[tuple[int, list[Any]]] = []  # (items expected, items so far)
        self._max_bulk = max_bulk
        self._max_items = max_items

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        replies = []
        while True:
            value = self._next()
            if value is _INCOMPLETE:
                break
            replies.append(value)
        del self._buffer[: self._pos]
        self._pos = 0
        return replies

    def _next(self) -> Any:
        """The next whole top-level reply, or _INCOMPLETE."""
        while True:
            value = self._scalar_or_open()
            if value is _INCOMPLETE:
                return _INCOMPLETE
            if value is _OPENED:
                continue
            while True:
                if not self._stack:
                    return value
                expected, items = self._stack[-1]
                items.append(value)
                if len(items) < expected:
                    break
                self._stack.pop()
                value = items

    def _line(self) -> bytes | None:
        end = self._buffer.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buffer) - self._pos > _MAX_LINE:
                raise RespProtocolError("a reply line longer than 64 KiB")
            return None
        line = bytes(self._buffer[self._pos : end])
        self._pos = end + 2
        return line

    def _scalar_or_open(self) -> Any:
        start = self._pos
        line = self._line()
        if line is None:
            return _INCOMPLETE
        if not line:
            raise RespProtocolError("an empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return _integer(rest)
        if kind == b"$":
            length = _integer(rest)
            if length == -1:
                return None
            if not 0 <= length <= self._max_bulk:
                raise RespProtocolError(f"a bulk string of {length} bytes")
            if len(self._buffer) - self._pos < length + 2:
                self._pos = start  # wait for the whole bulk string
                return _INCOMPLETE
            data = bytes(self._buffer[self._pos : self._pos + length])
            if self._buffer[self._pos + length : self._pos + length + 2] != b"\r\n":
                raise RespProtocolError("a bulk string not ended by CRLF")
            self._pos += length + 2
            return data
        if kind == b"*":
            count = _integer(rest)
            if count == -1:
                return None
            if not 0 <= count <= self._max_items:
                raise RespProtocolError(f"an array of {count} items")
            if count == 0:
                return []
            if len(self._stack) >= _MAX_DEPTH:
                raise RespProtocolError("arrays nested too deep")
            self._stack.append((count, []))
            return _OPENED
        raise RespProtocolError(f"unknown reply type {kind!r}")


_OPENED = object()


def _integer(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise RespProtocolError(f"not an integer: {text[:20]!r}") from None

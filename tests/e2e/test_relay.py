"""
The gate as a faithful relay: between real peers the project did not write (Python's
``websockets``, the Node.js ``ws`` server and client, a raw RFC 6455 backend and raw-socket
clients), a session through the gate behaves as a direct connection would, in both route modes.

Every test class runs against a gate whose route has ``mode = "message"``, and again (a
``Tunnel...`` subclass) with ``mode = "tunnel"``, but the UTF-8 one (message mode only).  Where the
expected behaviour is the peers' own, a ``Direct...`` subclass runs the same tests with the client
talking straight to the backend: that is the check of the harness (those must pass whatever the
gate does).  Classes share one backend and
one gate for all their tests (started in ``setUpClass``, stopped by PID at class cleanup), except
the flood tests, which stress the gate and measure its memory, so get their own.  The class fixtures
(``setUpClass``, ``addClassCleanup``) are run by pytest, the project's runner.

Backends: ``tests/fixtures/node/server.js`` (Node ``ws`` echo, answers "Server received from
client: <msg>"), ``tests/fixtures/node/deflate_server.js`` (Node ``ws`` echo with
permessage-deflate), ``tests/fixtures/frame_echo.py`` (raw asyncio: echoes frame by frame, or floods
pings) and ``tests/fixtures/ws_recorder.py`` (``websockets`` echo that prints every message and
close it saw).  Only loopback addresses; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.asyncio.client import connect as aconnect
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    LOOPBACK,
    NODE_FIXTURES,
    REPO,
    Process,
    free_port,
    node_command,
    start_node_backend,
    start_process,
    start_route_gate,
)

FIXTURES = REPO / "tests" / "fixtures"
FRAME_ECHO = FIXTURES / "frame_echo.py"
WS_RECORDER = FIXTURES / "ws_recorder.py"
DEFLATE_SERVER = NODE_FIXTURES / "deflate_server.js"
DEFLATE_CLIENT = NODE_FIXTURES / "deflate_client.js"

PREFIX = "Server received from client: "
KiB = 1024
MiB = 1024 * KiB
_TIMEOUT = 5.0
_BACKEND_EVENT_TIMEOUT = 10.0
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# The flood tests: how long each flood lasts, the RSS growth allowed, the echo latency allowed to
# a normal session meanwhile and how often it is probed.
FLOOD_SECONDS = min(60.0, float(os.environ.get("WSGATE_FLOOD_SECONDS", "20")))
FLOOD_RSS_BOUND_MIB = 64
PROBE_LATENCY = 1.0
PROBE_EVERY = 0.5


# --- processes ---------------------------------------------------------------------------------


class _ClassScope:
    """
    What the tests/procs.py helpers need of a test case (``addCleanup``), for a whole class: the
    cleanups become class cleanups, run (stopping processes by PID) once the class's tests are done.
    """

    def __init__(self, cls: type[SynchronousTestCase]) -> None:
        self._cls = cls

    def addCleanup(self, function: Callable[..., object], /, *args: object) -> None:
        self._cls.addClassCleanup(function, *args)


def start_backend(case: Any, kind: str) -> Process:
    """
    Start a backend of ``kind`` (``node``, ``deflate``, ``frame_echo`` or ``recorder``) on a free
    loopback port and wait until it is ready; ``process.port`` is its port.
    """
    if kind == "node":
        return start_node_backend(case)
    port = free_port()
    if kind == "deflate":
        argv = [node_command(), str(DEFLATE_SERVER), str(port)]
        process = start_process(case, argv, ready_port=port, cwd=NODE_FIXTURES)
        process.wait_for_output("Server started")
        return process
    script = {"frame_echo": FRAME_ECHO, "recorder": WS_RECORDER}[kind]
    process = start_process(case, [sys.executable, str(script), str(port)], ready_port=port)
    process.wait_for_output("ready")
    return process


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def run_deflate_client(url: str, size: int = MiB) -> dict[str, Any]:
    """
    Run the Node ``ws`` client with permessage-deflate (tests/fixtures/node/deflate_client.js)
    against ``url``, echoing a compressible JSON message of about ``size`` bytes; its JSON report.
    """
    completed = subprocess.run(
        [node_command(), str(DEFLATE_CLIENT), url, str(size)],
        cwd=NODE_FIXTURES,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    detail = f"exit {completed.returncode}\nstdout: {completed.stdout}\nstderr: {completed.stderr}"
    if not lines:
        raise AssertionError(f"deflate_client.js printed nothing: {detail}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise AssertionError(f"deflate_client.js failed: {detail}")
    return result


# --- a raw WebSocket client ----------------------------------------------------------------------


# The websockets clients' options: every wait bounded, 4 MiB test messages allowed.
_CLIENT_OPTIONS: dict[str, Any] = {
    "open_timeout": _TIMEOUT,
    "close_timeout": _TIMEOUT,
    "max_size": 64 * MiB,
    "proxy": None,
}


class _Ended(Exception):
    """The connection ended (FIN or RST) while a frame was awaited."""


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the 4-byte masking ``key``."""
    if not payload:
        return payload
    stream = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(
        len(payload), "big"
    )


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One masked (client-to-server) frame, with a random masking key."""
    b0 = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", b0, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, size)
    key = os.urandom(4)
    return head + key + mask_payload(payload, key)


class RawClient:
    """
    A WebSocket client on a bare socket, for what libraries refuse to send: bad Close frames, bad
    UTF-8 across fragments, other protocol versions, floods.  Every read has a deadline.
    """

    def __init__(self, case: Any, port: int, timeout: float = _TIMEOUT) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        case.addCleanup(self.sock.close)
        self._buffer = bytearray()

    def request(
        self, path: str = "/", version: str = "13", timeout: float = _TIMEOUT
    ) -> tuple[int, dict[str, str], str]:
        """Send an upgrade request; return the answer's status, headers (lower-case names), key."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: {version}\r\n\r\n"
            ).encode()
        )
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            if b"\r\n\r\n" in self._buffer:
                break
            self._fill(deadline)
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, key

    def upgrade(self, path: str = "/") -> None:
        """Open a session: the answer must be a 101 with the right Sec-WebSocket-Accept."""
        status, headers, key = self.request(path)
        assert status == 101, f"upgrade answered {status} {headers}"
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        assert headers.get("sec-websocket-accept") == accept, headers

    def finish(self, timeout: float = 2.0) -> None:
        """
        After the closing handshake: wait (bounded) for the server to end the TCP connection, as
        RFC 6455 7.1.1 asks of a client, then close the socket.
        """
        deadline = time.monotonic() + timeout
        try:
            for _ in range(1000):
                self._fill(deadline)
                self._buffer.clear()
        except (_Ended, TimeoutError, OSError):
            pass
        self.sock.close()

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        self.sock.sendall(client_frame(opcode, payload, fin=fin))

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError as e:
            raise _Ended("the connection was reset (TCP RST)") from e
        if not data:
            raise _Ended("the connection was closed (TCP FIN)")
        self._buffer += data

    def _take(self, size: int, deadline: float) -> bytes:
        for _ in range(size // 1024 + 1000):
            if len(self._buffer) >= size:
                break
            self._fill(deadline)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_frame(self, deadline: float) -> tuple[bool, int, bytes]:
        """The next frame from the server: (fin, opcode, payload)."""
        b0, b1 = self._take(2, deadline)
        size = b1 & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._take(2, deadline))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._take(8, deadline))
        key = self._take(4, deadline) if b1 & 0x80 else b""
        payload = self._take(size, deadline)
        if key:
            payload = mask_payload(payload, key)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def expect_close(self, timeout: float = _TIMEOUT) -> tuple[int | None, bytes]:
        """
        Read frames until a Close arrives; return its code (None for an empty Close) and raw
        reason.  A connection that ends or stays silent first fails the test.
        """
        deadline = time.monotonic() + timeout
        seen = []
        for _ in range(10000):
            try:
                fin, opcode, payload = self.read_frame(deadline)
            except _Ended as e:
                raise AssertionError(f"no Close frame: {e}; frames before: {seen}") from None
            except TimeoutError:
                raise AssertionError(f"no Close frame within {timeout}s; frames: {seen}") from None
            if opcode == OP_CLOSE:
                if len(payload) < 2:
                    return None, payload
                return struct.unpack("!H", payload[:2])[0], payload[2:]
            seen.append((fin, opcode, payload[:40]))
        raise AssertionError(f"no Close frame among {len(seen)} frames")


# --- shared gate and backend per class -----------------------------------------------------------


class _RelayCase(SynchronousTestCase):
    """
    One backend of ``backend_kind`` and, unless ``mode`` is ``"direct"``, one gate in front of it
    whose route has ``mode`` and the ``route_extra`` lines; shared by all the class's tests.
    ``url``/``port`` are where clients connect: the gate, or the backend itself in direct mode.
    """

    mode = "message"
    backend_kind = "recorder"
    route_extra = ""

    backend: Process
    gate: Process | None
    port: int
    url: str

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        scope = _ClassScope(cls)
        cls.backend = start_backend(scope, cls.backend_kind)
        assert cls.backend.port is not None
        if cls.mode == "direct":
            cls.gate = None
            cls.port = cls.backend.port
        else:
            cls.gate = start_route_gate(
                scope, f"ws://{LOOPBACK}:{cls.backend.port}", cls.mode, cls.route_extra
            )
            assert cls.gate.port is not None
            cls.port = cls.gate.port
        cls.url = f"ws://{LOOPBACK}:{cls.port}"

    def connect(self, path: str = "/", **kwargs: Any) -> ClientConnection:
        """A ``websockets`` (sync) client session; every wait bounded; cleanup closes it."""
        options = {**_CLIENT_OPTIONS, **kwargs}
        client = connect(self.url + path, **options)
        self.addCleanup(client.close)
        return client

    def raw(self, path: str | None = "/") -> RawClient:
        """A raw client, upgraded on ``path`` unless it is None."""
        client = RawClient(self, self.port)
        if path is not None:
            client.upgrade(path)
        return client

    def run_async(self, scenario: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Run the coroutine function ``scenario`` in a fresh event loop, within ``timeout``."""

        async def bounded() -> Any:
            try:
                return await asyncio.wait_for(scenario(), timeout)
            except TimeoutError:
                raise AssertionError(f"not done within {timeout}s\n{self.describe()}") from None

        return asyncio.run(bounded())

    def aconnect(self, path: str = "/", **kwargs: Any) -> Any:
        """A ``websockets`` asyncio client (``async with``); every wait bounded."""
        options = {**_CLIENT_OPTIONS, **kwargs}
        return aconnect(self.url + path, **options)

    def describe(self) -> str:
        """The processes' output, for failure messages."""
        parts = [self.backend.describe()]
        if self.gate is not None:
            parts.append(self.gate.describe())
        return "\n".join(parts)


def unique_path(label: str) -> str:
    """A request path no other session of a shared backend uses."""
    return f"/{label}/{uuid.uuid4().hex}"


# --- 1: fragmented messages, websockets client to the Node ws echo server ------------------------


class FragmentedMessageTests(_RelayCase):
    """
    Fragmented messages from the ``websockets`` (asyncio) client reach the Node ``ws`` echo
    backend (server.js) whole, and the answers come back whole.
    """

    backend_kind = "node"

    def test_fragmented_text_message(self) -> None:
        """
        A text message sent with ``await ws.send(iterable of str)`` (text frame, continuations,
        and the empty final continuation websockets ends it with) is echoed whole, and the session
        stays open: a second message is echoed too.
        """

        async def scenario() -> tuple[Any, Any]:
            async with self.aconnect() as ws:
                await ws.send(iter(["Hel", "lo, ", "w\u00f6r", "ld \U0001f600"]))
                first = await ws.recv()
                await ws.send("second")
                second = await ws.recv()
                return first, second

        first, second = self.run_async(scenario)
        self.assertEqual(first, PREFIX + "Hello, w\u00f6rld \U0001f600")
        self.assertEqual(second, PREFIX + "second")

    def test_fragmented_binary_message(self) -> None:
        """
        A binary message sent with ``await ws.send([bytes, ...])`` is echoed whole as binary, and
        the session stays open: a second, fragmented one is echoed too.
        """

        async def scenario() -> tuple[Any, Any]:
            async with self.aconnect() as ws:
                await ws.send([b"\x00\x01", b"\xff\xfe", b"", b"binary \x80"])
                first = await ws.recv()
                await ws.send([b"second", b" \x00"])
                second = await ws.recv()
                return first, second

        first, second = self.run_async(scenario)
        self.assertEqual(first, PREFIX.encode() + b"\x00\x01\xff\xfebinary \x80")
        self.assertEqual(second, PREFIX.encode() + b"second \x00")


class TunnelFragmentedMessageTests(FragmentedMessageTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


class DirectFragmentedMessageTests(FragmentedMessageTests):
    """The same, straight to the backend: the harness check."""

    mode = "direct"


# --- 2 and 3: a frame-by-frame echo backend ------------------------------------------------------


class FrameEchoTests(_RelayCase):
    """
    Against a backend that echoes frame by frame (tests/fixtures/frame_echo.py: each frame back
    as its own frame, FIN and opcode kept), fragmented messages cross the gate both ways.
    """

    backend_kind = "frame_echo"

    def test_200000_byte_text_message_in_fragments(self) -> None:
        """
        A 200,000-byte text message (multi-byte UTF-8), sent as text fragments of 997 bytes each
        (so characters straddle fragments) plus websockets' empty final one, comes back fragmented
        the same way and intact.
        """
        text = "relay \u00e9\u4e2d\U0001f600 " * 12500
        data = text.encode()
        self.assertEqual(len(data), 200_000)

        async def scenario() -> Any:
            async with self.aconnect() as ws:
                await ws.send(
                    (data[i : i + 997] for i in range(0, len(data), 997)),
                    text=True,
                )
                return await ws.recv()

        answer = self.run_async(scenario)
        self.assertIsInstance(answer, str)
        self.assertEqual(len(answer), len(text))
        self.assertTrue(answer == text, "the echoed text differs")

    def test_4mib_in_64_byte_fragments(self) -> None:
        """
        A 4 MiB binary message sent as 65,536 fragments of 64 bytes is echoed back (as 65,536
        fragments) intact, all within 10 s.  The answer is read with ``recv_streaming`` since
        websockets' ``recv`` refuses to reassemble more than 4,096 fragments (and not against the
        Node ``ws`` server: it refuses more than 16,384 fragments per message, with Close 1008).
        """
        payload = os.urandom(4 * MiB)

        def chunks() -> Iterator[bytes]:
            for offset in range(0, len(payload), 64):
                yield payload[offset : offset + 64]

        async def scenario() -> tuple[Any, int, float]:
            async with self.aconnect() as ws:
                started = time.monotonic()
                await ws.send(chunks())
                fragments = [fragment async for fragment in ws.recv_streaming()]
                return b"".join(fragments), len(fragments), time.monotonic() - started

        answer, count, elapsed = self.run_async(scenario, timeout=10.0)
        self.assertEqual(len(answer), len(payload))
        self.assertTrue(answer == payload, "the 4 MiB echo differs")
        print(f"4 MiB in 64-byte fragments ({self.mode}): {count} back in {elapsed:.2f} s")


class TunnelFrameEchoTests(FrameEchoTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


class DirectFrameEchoTests(FrameEchoTests):
    """The same, straight to the backend: the harness check."""

    mode = "direct"


# --- 4: permessage-deflate end to end ------------------------------------------------------------


class DeflateTests(_RelayCase):
    """
    permessage-deflate between clients that offer it and a Node ``ws`` backend with
    ``perMessageDeflate: true`` (tests/fixtures/node/deflate_server.js): the client gets it, and
    a compressible message travels compressed.
    """

    backend_kind = "deflate"

    def test_node_client_gets_deflate_and_compressed_echo(self) -> None:
        """
        A Node ``ws`` client with ``perMessageDeflate: true`` negotiates permessage-deflate
        (``ws.extensions``), and a ~1 MiB highly compressible JSON message is echoed intact with
        far fewer than 1 MiB read from the client's socket (under 200 KiB, handshake included).
        """
        result = run_deflate_client(self.url + "/", MiB)
        self.assertTrue(result["equal"], result)
        self.assertFalse(result["binary"], result)
        self.assertIn("permessage-deflate", result["extensions"], result)
        print(f"deflate ({self.mode}): {result}")
        self.assertLess(result["bytesRead"], 200 * KiB, result)

    def test_websockets_client_gets_deflate(self) -> None:
        """
        A ``websockets`` client offering compression (its default, "deflate") gets
        permessage-deflate in the 101's ``Sec-WebSocket-Extensions``, and an echo works.
        """
        client = self.connect(compression="deflate")
        assert client.response is not None
        extensions = client.response.headers.get("Sec-WebSocket-Extensions", "")
        self.assertIn("permessage-deflate", extensions)
        message = json.dumps([{"id": i % 10, "kind": "relay"} for i in range(2000)])
        client.send(message)
        self.assertEqual(client.recv(timeout=_TIMEOUT), message)


class TunnelDeflateTests(DeflateTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


class DirectDeflateTests(DeflateTests):
    """The same, straight to the backend: the harness check."""

    mode = "direct"


class CompressionOffTests(_RelayCase):
    """A route with ``compression = "off"`` in front of the same deflate-capable backend."""

    backend_kind = "deflate"
    route_extra = 'compression = "off"'

    def test_no_deflate_negotiated(self) -> None:
        """
        Neither a ``websockets`` client nor a Node ``ws`` client offering permessage-deflate gets
        it, and their messages are still echoed.
        """
        client = self.connect(compression="deflate")
        assert client.response is not None
        self.assertNotIn("Sec-WebSocket-Extensions", client.response.headers)
        client.send("plain")
        self.assertEqual(client.recv(timeout=_TIMEOUT), "plain")
        result = run_deflate_client(self.url + "/", 64 * KiB)
        self.assertTrue(result["equal"], result)
        self.assertNotIn("permessage-deflate", result["extensions"], result)


class TunnelCompressionOffTests(CompressionOffTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


# --- 6 and 9: Close frames -----------------------------------------------------------------------


class _RecorderCase(_RelayCase):
    """A shared ``websockets`` recorder backend (tests/fixtures/ws_recorder.py)."""

    backend_kind = "recorder"

    def backend_events(self, path: str) -> list[dict[str, Any]]:
        """What the backend printed about the session(s) on ``path``, in order."""
        events = []
        for line in self.backend.stdout().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("path") == path:
                    events.append(event)
        return events

    def backend_closed(self, path: str, timeout: float = _BACKEND_EVENT_TIMEOUT) -> dict[str, Any]:
        """The backend's "closed" event for ``path``, waited for (bounded)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            for event in self.backend_events(path):
                if event["event"] == "closed":
                    return event
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"the backend's session on {path} did not end within {timeout}s: "
            f"{self.backend_events(path)}\n{self.describe()}"
        )


class CloseFrameTests(_RecorderCase):
    """
    Close frames from a raw client: invalid ones are answered with a Close 1002 (1007 for a
    reason that is not UTF-8), never with a dropped or reset connection; valid ones reach the
    backend (a ``websockets`` server) with their code and reason, and its answering Close reaches
    the client.
    """

    def assert_refused(self, payload: bytes, expected: int) -> None:
        client = self.raw(unique_path("bad-close"))
        client.send_frame(OP_CLOSE, payload)
        code, reason = client.expect_close()
        self.assertEqual(code, expected, f"Close answered with {code} {reason!r}")

    def test_close_code_999(self) -> None:
        """A Close with code 999 (below the range of codes) gets Close 1002."""
        self.assert_refused(struct.pack("!H", 999) + b"bad", 1002)

    def test_close_code_1005(self) -> None:
        """A Close with code 1005 (reserved: never sent on the wire) gets Close 1002."""
        self.assert_refused(struct.pack("!H", 1005), 1002)

    def test_close_code_1004(self) -> None:
        """A Close with code 1004 (reserved) gets Close 1002."""
        self.assert_refused(struct.pack("!H", 1004) + b"reserved", 1002)

    def test_close_code_0(self) -> None:
        """A Close with code 0 gets Close 1002."""
        self.assert_refused(struct.pack("!H", 0), 1002)

    def test_close_code_2999(self) -> None:
        """A Close with code 2999 (reserved for the protocol, unassigned) gets Close 1002."""
        self.assert_refused(struct.pack("!H", 2999) + b"unassigned", 1002)

    def test_close_one_byte_payload(self) -> None:
        """A Close whose payload is a single byte (half a code) gets Close 1002."""
        self.assert_refused(b"\x03", 1002)

    def test_close_reason_not_utf8(self) -> None:
        """A Close 1000 whose reason is not valid UTF-8 gets Close 1007."""
        self.assert_refused(struct.pack("!H", 1000) + b"bad \xff\xfe utf-8", 1007)

    def assert_forwarded(self, code: int) -> None:
        path = unique_path(f"close-{code}")
        reason = f"reason {code} \u00e9"
        client = self.raw(path)
        client.send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode())
        answer = client.expect_close()
        client.finish()
        closed = self.backend_closed(path)
        self.assertEqual(closed["rcvd"], [code, reason], closed)
        self.assertEqual(answer, (code, reason.encode()))

    def test_close_1000_forwarded(self) -> None:
        """Close 1000 with a reason reaches the backend; its answering Close reaches the client."""
        self.assert_forwarded(1000)

    def test_close_1001_forwarded(self) -> None:
        """Close 1001 with a reason reaches the backend; its answering Close reaches the client."""
        self.assert_forwarded(1001)

    def test_close_3000_forwarded(self) -> None:
        """Close 3000 with a reason reaches the backend; its answering Close reaches the client."""
        self.assert_forwarded(3000)

    def test_close_4999_forwarded(self) -> None:
        """Close 4999 with a reason reaches the backend; its answering Close reaches the client."""
        self.assert_forwarded(4999)

    def test_close_handshake_end_to_end(self) -> None:
        """
        A ``websockets`` client closing with (4000, "bye"): the backend (a ``websockets`` server)
        receives 4000 "bye", and the client receives the backend's answering Close, 4000 "bye".
        """
        path = unique_path("close-handshake")
        client = self.connect(path)
        client.send("hello")
        self.assertEqual(client.recv(timeout=_TIMEOUT), "hello")
        client.close(4000, "bye")
        received = client.protocol.close_rcvd
        self.assertIsNotNone(received, "the client got no Close frame")
        assert received is not None
        self.assertEqual((received.code, received.reason), (4000, "bye"))
        closed = self.backend_closed(path)
        self.assertEqual(closed["rcvd"], [4000, "bye"], closed)
        self.assertEqual(closed["sent"], [4000, "bye"], closed)


class TunnelCloseFrameTests(CloseFrameTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


class DirectCloseFrameTests(CloseFrameTests):
    """The same, straight to the backend: the harness check."""

    mode = "direct"


# --- 7: invalid UTF-8 in a continuation frame (message mode) -------------------------------------


class InvalidUtf8ContinuationTests(_RecorderCase):
    """Message mode only: the gate checks UTF-8 (tunnel mode leaves it to the receiving peer)."""

    def test_invalid_utf8_in_continuation(self) -> None:
        """
        A text message whose first fragment (FIN clear) is valid UTF-8 and whose continuation is
        not: the client gets Close 1007; the backend gets a Close 1001 (not a dropped connection)
        and never receives a complete message.
        """
        path = unique_path("bad-utf8")
        client = self.raw(path)
        client.send_frame(OP_TEXT, "valid \u00e9 start, ".encode(), fin=False)
        client.send_frame(OP_CONTINUATION, b"then \xce\xff\xfe not UTF-8", fin=True)
        code, reason = client.expect_close()
        self.assertEqual(code, 1007, f"Close answered with {code} {reason!r}")
        closed = self.backend_closed(path)
        self.assertIsNotNone(closed["rcvd"], f"the backend's connection was dropped: {closed}")
        self.assertEqual(closed["rcvd"][0], 1001, closed)
        messages = [e for e in self.backend_events(path) if e["event"] == "message"]
        self.assertEqual(messages, [])


# --- 8: protocol version -------------------------------------------------------------------------


class ProtocolVersionTests(_RecorderCase):
    """The opening handshake's protocol version."""

    def test_version_8_gets_426(self) -> None:
        """
        An upgrade with ``Sec-WebSocket-Version: 8`` is answered ``426 Upgrade Required`` with
        ``Sec-WebSocket-Version: 13`` (RFC 6455 4.4).
        """
        client = self.raw(None)
        status, headers, _ = client.request("/", version="8")
        self.assertEqual(status, 426, headers)
        self.assertEqual(headers.get("sec-websocket-version"), "13", headers)


class TunnelProtocolVersionTests(ProtocolVersionTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"


# --- 5: floods from peers that do not read -------------------------------------------------------


class _SocketWorker:
    """
    A thread working on ``sock`` (a short socket timeout bounds every call) until ``seconds``
    have passed, the connection fails or ends (``ended`` says how), or ``stop()``.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + seconds
        self.ended: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                if not self.step():
                    return
            except TimeoutError:
                continue
            except OSError as e:
                self.ended = f"{type(e).__name__}: {e}"
                return

    def step(self) -> bool:
        """One call on the socket; False when the connection ended."""
        raise NotImplementedError


class _Flood(_SocketWorker):
    """Writes ``frames`` (whole frames, cycled so every write continues where the last stopped)
    as fast as the socket takes them, never reading."""

    def __init__(self, sock: socket.socket, frames: bytes, seconds: float) -> None:
        super().__init__(sock, seconds)
        self.frames = memoryview(frames)
        self.offset = 0
        self.sent = 0

    def step(self) -> bool:
        written = self.sock.send(self.frames[self.offset :])
        self.sent += written
        self.offset = (self.offset + written) % len(self.frames)
        return True


class _Drain(_SocketWorker):
    """Reads and discards everything."""

    read = 0

    def step(self) -> bool:
        data = self.sock.recv(256 * KiB)
        if not data:
            self.ended = "closed by the gate"
            return False
        self.read += len(data)
        return True


class FloodTests(SynchronousTestCase):
    """
    Peers that flood the gate and never read what it sends back: the gate's memory stays bounded
    (its RSS grows less than 64 MiB over a 20 s flood) and another session through the same gate
    keeps getting its echoes within 1 s meanwhile.  Each test has its own gate and frame-echo
    backend (tests/fixtures/frame_echo.py), since it measures the gate's memory.
    """

    mode = "message"

    def setUp(self) -> None:
        self.backend = start_backend(self, "frame_echo")
        self.gate = start_route_gate(self, f"ws://{LOOPBACK}:{self.backend.port}", self.mode)
        assert self.gate.port is not None
        self.port = self.gate.port
        self.probe = connect(
            f"ws://{LOOPBACK}:{self.port}/probe",
            open_timeout=_TIMEOUT,
            close_timeout=2.0,
            proxy=None,
            ping_interval=None,
        )
        self.addCleanup(self.probe.close)
        self.probe.send("warm up")
        self.assertEqual(self.probe.recv(timeout=_TIMEOUT), "warm up")

    def flood_client(self, path: str = "/flood") -> socket.socket:
        client = RawClient(self, self.port)
        client.upgrade(path)
        return client.sock

    def watch(self, worker: _Flood | _Drain, label: str) -> None:
        """
        Start ``worker`` and, for FLOOD_SECONDS, probe the other session every PROBE_EVERY
        seconds and sample the gate's RSS; fail as soon as an echo is late or the RSS has grown
        more than the bound, and check the RSS once more at the end.
        """
        baseline = rss_kib(self.gate.pid)
        peak = baseline
        latencies: list[float] = []
        self.addCleanup(worker.stop)
        worker.start()
        deadline = time.monotonic() + FLOOD_SECONDS
        for number in range(int(FLOOD_SECONDS / PROBE_EVERY) + 1):
            if time.monotonic() >= deadline:
                break
            if self.gate.returncode is not None:
                self.fail(f"{label}: the gate ended during the flood\n{self.gate.describe()}")
            now = rss_kib(self.gate.pid)
            peak = max(peak, now)
            growth_mib = (now - baseline) / 1024
            if growth_mib >= FLOOD_RSS_BOUND_MIB:
                worker.stop()
                self.fail(
                    f"{label}: the gate's RSS grew {growth_mib:.0f} MiB (from {baseline} KiB) "
                    f"after {FLOOD_SECONDS - (deadline - time.monotonic()):.1f} s of flood"
                )
            started = time.monotonic()
            self.probe.send(f"probe {number}")
            try:
                answer = self.probe.recv(timeout=PROBE_LATENCY)
            except TimeoutError:
                worker.stop()
                self.fail(f"{label}: probe {number} not echoed within {PROBE_LATENCY}s")
            latency = time.monotonic() - started
            latencies.append(latency)
            self.assertEqual(answer, f"probe {number}")
            time.sleep(max(0.0, min(PROBE_EVERY - latency, deadline - time.monotonic())))
        end = rss_kib(self.gate.pid)
        worker.stop()
        growth_mib = (max(peak, end) - baseline) / 1024
        print(
            f"{label} ({self.mode}): RSS {baseline} -> {end} KiB (peak {max(peak, end)} KiB), "
            f"{len(latencies)} probes, slowest {max(latencies, default=0):.3f} s, "
            f"worker moved {getattr(worker, 'sent', getattr(worker, 'read', 0)) / MiB:.1f} MiB, "
            f"ended: {worker.ended}"
        )
        self.assertLess(growth_mib, FLOOD_RSS_BOUND_MIB, f"{label}: the gate's RSS grew too much")
        self.assertIsNone(self.gate.returncode, self.gate.describe())

    def test_client_ping_flood_without_reading(self) -> None:
        """
        A raw client that completes the handshake, then sends masked Pings (125-byte payloads) as
        fast as it can for 20 s and never reads: the gate's RSS grows less than 64 MiB and another
        session keeps getting echoes within 1 s.
        """
        sock = self.flood_client()
        ping = client_frame(OP_PING, bytes(range(125)))
        self.watch(_Flood(sock, ping * 512, FLOOD_SECONDS), "client ping flood")

    def test_backend_ping_flood_without_reading(self) -> None:
        """
        A backend that floods the gate with Pings (125-byte payloads) for 20 s and never reads,
        on a session whose client reads everything: the gate's RSS grows less than 64 MiB and
        another session keeps getting echoes within 1 s.
        """
        sock = self.flood_client(f"/ping-flood?seconds={FLOOD_SECONDS:g}")
        self.watch(_Drain(sock, FLOOD_SECONDS), "backend ping flood")

    def test_backend_data_flood_without_reading(self) -> None:
        """
        A backend that sends 16 KiB binary messages as fast as it can for 20 s and never reads,
        on a session whose client reads everything: the gate's RSS grows less than 64 MiB and
        another session keeps getting echoes within 1 s.
        """
        sock = self.flood_client(f"/data-flood?seconds={FLOOD_SECONDS:g}")
        self.watch(_Drain(sock, FLOOD_SECONDS), "backend data flood")

    def test_client_data_flood_without_reading(self) -> None:
        """
        A raw client sending masked 16 KiB binary messages as fast as it can for 20 s, never
        reading their echoes: the gate's RSS grows less than 64 MiB and another session keeps
        getting echoes within 1 s.
        """
        sock = self.flood_client()
        frames = b"".join(client_frame(OP_BINARY, os.urandom(16 * KiB)) for _ in range(4))
        self.watch(_Flood(sock, frames, FLOOD_SECONDS), "client data flood")


class TunnelFloodTests(FloodTests):
    """The same, through a route in tunnel mode."""

    mode = "tunnel"

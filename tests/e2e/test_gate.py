"""
The gate as a real process on loopback with a real Autobahn backend process: streaming of large
messages, backpressure, and no leaked connections.  Memory figures come from /proc/PID/status.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import struct
import time

from websockets.sync.client import connect

from tests.e2e.helpers import GateCase, MiB, open_fds, settled_fds, status_kib
from tests.procs import LOOPBACK


class StreamingTests(GateCase):
    def test_64mib_message_streamed(self) -> None:
        """A 64 MiB message (limit raised) crosses the gate intact without the gate holding it."""
        self.start("digest", 'max_message_size = "80MiB"')
        payload = os.urandom(64 * MiB)
        with connect(self.url, max_size=None) as ws:
            ws.send(b"warm up")
            ws.recv(timeout=10)
            before = status_kib(self.gate.pid, "VmRSS")
            ws.send(payload)
            answer = ws.recv(timeout=60)
        peak = status_kib(self.gate.pid, "VmHWM")
        self.assertEqual(answer, f"{len(payload)} {hashlib.sha256(payload).hexdigest()}")
        growth_mib = (peak - before) / 1024
        print(
            f"64 MiB relay: gate RSS before {before} KiB, peak {peak} KiB, growth {growth_mib:.1f} MiB"
        )
        self.assertLess(growth_mib, 16, "the gate buffered the message instead of streaming it")


def raw_upgrade(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: {LOOPBACK}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def masked_binary_frame(size: int) -> bytes:
    header = struct.pack("!BBQ", 0x82, 0x80 | 127, size)
    return header + b"\0\0\0\0" + bytes(size)  # a zero mask leaves the payload as is


class BackpressureTests(GateCase):
    def test_stalled_backend_pauses_client(self) -> None:
        """With a backend that never reads, a client writing flat out is paused, not buffered."""
        self.start("stall")
        sock = raw_upgrade(self.gate_port)
        self.addCleanup(sock.close)
        before = status_kib(self.gate.pid, "VmRSS")
        frame = masked_binary_frame(64 * 1024)
        sock.settimeout(0.2)
        pushed = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                pushed += sock.send(frame)
            except TimeoutError:
                continue
        after = status_kib(self.gate.pid, "VmRSS")
        growth_mib = (after - before) / 1024
        print(
            f"backpressure: client pushed {pushed / MiB:.1f} MiB in 3 s, gate RSS grew {growth_mib:.1f} MiB"
        )
        self.assertLess(pushed, 64 * MiB, "the client was never paused")
        self.assertLess(growth_mib, 16, "the gate buffered what the backend did not read")


class LeakTests(GateCase):
    def test_backend_death_closes_every_client(self) -> None:
        """When the backend process dies, every client gets 1011 and the gate's fds return to baseline."""
        self.start("echo")
        baseline = settled_fds(self.gate.pid)
        clients = [connect(self.url) for _ in range(20)]
        for ws in clients:
            ws.send("x")
            self.assertEqual(ws.recv(timeout=5), "x")
        self.assertGreaterEqual(open_fds(self.gate.pid), baseline + 40)
        os.kill(self.backend.pid, signal.SIGKILL)
        codes = []
        for ws in clients:
            try:
                ws.recv(timeout=10)
            except Exception:  # noqa: BLE001 - websockets raises ConnectionClosed*
                pass
            codes.append(ws.close_code)
        self.assertEqual(codes, [1011] * 20)
        self.assertEqual(settled_fds(self.gate.pid, expected=baseline), baseline)

    def test_client_drops_close_backend_legs(self) -> None:
        """Clients that vanish without a Close leave no backend connection open in the gate."""
        self.start("echo")
        baseline = settled_fds(self.gate.pid)
        socks = [raw_upgrade(self.gate_port) for _ in range(20)]
        self.assertGreaterEqual(open_fds(self.gate.pid), baseline + 40)
        for sock in socks:
            sock.close()
        self.assertEqual(settled_fds(self.gate.pid, expected=baseline), baseline)

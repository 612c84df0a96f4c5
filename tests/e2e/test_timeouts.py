"""
Sub-second timeouts of a real gate process over real loopback fire when configured, never early.

The old bug: the handshake timeouts ran on Autobahn's txaio timers, which put every deadline in a
bucket of the whole wall-clock second it falls in (``int(now + delay)``), so a timeout of less than
a second fired anywhere between at once and its configured time, depending on the fraction of the
wall-clock second at which it was started.  Each timing test here therefore starts its attempts at
spread fractions of a wall-clock second (``time.time() % 1``; the gate runs on the same clock), and
the bounds that matter are the lower ones: on the old code nearly every attempt broke them.  The
upper bounds are loose (a loaded 2-core machine) and only catch a timeout that is ignored.

- ``[limits] handshake_timeout = "700ms"``: a raw TCP client that sends an incomplete upgrade
  request is dropped 0.65-1.2 s after its connect.
- upstream ``handshake_timeout = "600ms"``: in front of a raw backend that accepts TCP and never
  answers the upgrade, the client gets ``504`` 0.55-1.2 s after its request; in front of one that
  answers a valid ``101`` after 0.3 s, the client always gets its ``101``.
- health check ``type = "websocket"``, ``timeout = "500ms"``, ``interval = "100ms"``, ``fall = 3``:
  a healthy Node ``ws`` backend is never marked down over 3 s (``/status.json`` of the admin
  listener, and no ``server_down`` in the gate's log), while a backend that never answers the
  upgrade, in the same upstream, is marked down (the check of the observation).

Only loopback addresses; every wait is bounded; the gate and the Node backend are stopped by their
PID, the raw backends are threads of the test, closed at cleanup.

Run against the code before the fix (the parent of commit d875a62), all four tests fail: clients
dropped 0-0.55 s after their connect, 504s 0-0.5 s after the request, 7 of 10 handshakes to the
0.3 s backend refused with 504, and the healthy server marked down by the health checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests.procs import (
    LOOPBACK,
    NODE_FIXTURES,
    Process,
    free_port,
    free_ports,
    node_command,
    read_until,
    start_configured_gate,
    start_process,
    wait_for_port,
)

DEFLATE_SERVER = NODE_FIXTURES / "deflate_server.js"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Bounds of the waits in this module.
_IO_TIMEOUT = 5.0  # any single socket read or write
_POLL = 0.05

# The configured timeouts and the accepted windows (seconds).
CLIENT_HANDSHAKE_TIMEOUT = 0.7
CLIENT_DROP_WINDOW = (0.65, 1.2)
UPSTREAM_HANDSHAKE_TIMEOUT = 0.6
UPSTREAM_504_WINDOW = (0.55, 1.2)
SLOW_BACKEND_DELAY = 0.3
HEALTH_TIMEOUT = 0.5
HEALTH_FALL = 3
HEALTH_WATCH = 3.0


# --- wall-clock fractions ------------------------------------------------------------------------


def spread_fractions(count: int, stride: float, first: float = 0.05) -> list[float]:
    """
    ``count`` start fractions of a wall-clock second, ``first``, ``first + stride``, ... (mod 1).
    A stride a little above an attempt's length keeps the waits between attempts short.
    """
    return [round((first + i * stride) % 1.0, 3) for i in range(count)]


def wait_for_fraction(target: float) -> float:
    """Sleep until ``time.time() % 1`` is ``target`` (at most a second); the fraction reached."""
    time.sleep((target - time.time() % 1.0) % 1.0)
    return time.time() % 1.0


# --- raw peers ----------------------------------------------------------------------------------


def accept_value(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answering ``Sec-WebSocket-Key`` ``key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def read_head(sock: socket.socket, timeout: float = _IO_TIMEOUT) -> bytes:
    """Read from ``sock`` until the end of an HTTP head (or EOF); what was read."""
    return read_until(sock, b"\r\n\r\n", timeout)


class RawBackend:
    """
    A loopback TCP server in a thread of the test: every connection it accepts is handed to
    ``handle(sock, stopping)`` in a thread of its own.  ``stop`` (a cleanup) closes the listener
    and every connection, and joins the threads within a bounded time.
    """

    def __init__(
        self, case: TestCase, handle: Callable[[socket.socket, threading.Event], None]
    ) -> None:
        self.handle = handle
        self.stopping = threading.Event()
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(64)
        self.listener.settimeout(_POLL)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"ws://{LOOPBACK}:{self.port}"
        accepting = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(accepting)
        accepting.start()
        case.addCleanup(self.stop)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._connections.append(sock)
                thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handle(sock, self.stopping)
        except (OSError, ValueError):  # the socket closed under it by stop()
            pass

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for sock in connections:
            try:
                sock.close()
            except OSError:
                pass
        for thread in threads:
            thread.join(2)


def wait_until_closed(sock: socket.socket, stopping: threading.Event) -> None:
    """Read and discard until the peer closes or the test stops."""
    while not stopping.is_set():
        ready, _, _ = select.select([sock], [], [], _POLL)
        if ready and not sock.recv(65536):
            return


def silent_backend(sock: socket.socket, stopping: threading.Event) -> None:
    """Accepts the TCP connection, reads the upgrade request and never answers it."""
    wait_until_closed(sock, stopping)


def slow_backend(sock: socket.socket, stopping: threading.Event) -> None:
    """Reads the upgrade request, waits SLOW_BACKEND_DELAY, then accepts it with a valid 101."""
    head = read_head(sock).decode("latin-1")
    key = ""
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-key":
            key = value.strip()
    if not key or stopping.wait(SLOW_BACKEND_DELAY):
        return
    sock.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_value(key)}\r\n"
            "\r\n"
        ).encode()
    )
    # The gate's Close (once the test's client has left) ends the connection: closing the TCP
    # connection then lets the gate finish the session at once, not after its close_timeout.
    while not stopping.is_set():
        ready, _, _ = select.select([sock], [], [], _POLL)
        if ready:
            break
    sock.close()


def upgrade_request(port: int, path: str = "/") -> bytes:
    """A complete, valid WebSocket upgrade request (no extensions offered)."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {LOOPBACK}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()


def status_line(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode("latin-1")


# --- the gate -----------------------------------------------------------------------------------


def start_gate(case: TestCase, tables: str) -> Process:
    """A gate process from a config of one loopback listener (``process.port``) and ``tables``."""
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="wsgate-timeouts-"))
    case.addCleanup(shutil.rmtree, directory, True)
    config = directory / "wsgate.toml"
    config.write_text(f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n\n{tables}')
    gate = start_configured_gate(case, config, port)
    gate.port = port
    return gate


def ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


# --- the tests ----------------------------------------------------------------------------------


class ClientHandshakeTimeoutTests(TestCase):
    def test_incomplete_request_dropped_on_time(self) -> None:
        """
        ``[limits] handshake_timeout = "700ms"``: a client that sends an incomplete upgrade request
        is dropped between 0.65 and 1.2 s after its connect, five times, each started at another
        fraction of a wall-clock second (the old whole-second timers dropped it up to 0.7 s early).
        """
        backend = RawBackend(self, silent_backend)  # never reached: the request never completes
        gate = start_gate(
            self,
            f'[limits]\nhandshake_timeout = "{ms(CLIENT_HANDSHAKE_TIMEOUT)}"\n\n'
            '[[route]]\nupstream = "u"\n\n'
            f'[upstream.u]\nservers = [{{ url = "{backend.url}" }}]\n',
        )
        assert gate.port is not None
        partial = f"GET / HTTP/1.1\r\nHost: {LOOPBACK}:{gate.port}\r\nUpgrade: websocket\r\n"
        runs: list[tuple[float, float, str, bytes]] = []
        for target in spread_fractions(5, 0.8):
            fraction = wait_for_fraction(target)
            with socket.create_connection((LOOPBACK, gate.port), timeout=_IO_TIMEOUT) as sock:
                connected = time.monotonic()
                sock.sendall(partial.encode())
                sock.settimeout(_IO_TIMEOUT)
                received = b""
                how = "still open"
                try:
                    while True:
                        chunk = sock.recv(4096)
                        if not chunk:
                            how = "closed"
                            break
                        received += chunk
                except ConnectionResetError:
                    how = "reset"
                except TimeoutError:
                    pass
                elapsed = time.monotonic() - connected
            runs.append((fraction, elapsed, how, received))
        report = ", ".join(
            f"start .{f * 1000:03.0f}: {e:.3f}s {h}" + (f" after {r[:80]!r}" if r else "")
            for f, e, h, r in runs
        )
        print(f"client handshake_timeout {ms(CLIENT_HANDSHAKE_TIMEOUT)}: {report}")
        low, high = CLIENT_DROP_WINDOW
        for _, elapsed, how, _ in runs:
            self.assertIn(how, ("closed", "reset"), report)
            self.assertGreaterEqual(elapsed, low, f"dropped early: {report}")
            self.assertLessEqual(elapsed, high, f"dropped late: {report}")
        # Each drop is a warning naming the client (rate limited: 5 fit the burst of 10).
        drops = gate.wait_for_output("handshake_timeout client=").count("handshake_timeout client=")
        self.assertEqual(drops, 5, gate.stdout())
        self.assertEqual(backend.accepted, 0, "an incomplete request reached the backend")


class UpstreamHandshakeTimeoutTests(TestCase):
    def start_gate_to(self, backend: RawBackend) -> Process:
        """A gate with one route to ``backend``: one try, handshake_timeout 600ms."""
        return start_gate(
            self,
            '[[route]]\nupstream = "u"\n\n'
            f'[upstream.u]\nservers = [{{ url = "{backend.url}" }}]\n'
            f'handshake_timeout = "{ms(UPSTREAM_HANDSHAKE_TIMEOUT)}"\n'
            'connect_timeout = "5s"\ntries = 1\ntry_timeout = "10s"\nmax_fails = 0\n',
        )

    def attempt(self, port: int) -> tuple[float, str]:
        """One client upgrade through the gate: the time to the answer's status line, and it."""
        with socket.create_connection((LOOPBACK, port), timeout=_IO_TIMEOUT) as sock:
            sock.sendall(upgrade_request(port))
            sent = time.monotonic()
            head = read_head(sock)
            return time.monotonic() - sent, status_line(head)

    def test_silent_backend_gets_504_on_time(self) -> None:
        """
        upstream ``handshake_timeout = "600ms"``, a backend that accepts TCP but never answers the
        upgrade: the client gets 504 between 0.55 and 1.2 s after its request, five times, each
        started at another fraction of a wall-clock second.
        """
        backend = RawBackend(self, silent_backend)
        gate = self.start_gate_to(backend)
        assert gate.port is not None
        runs = []
        for target in spread_fractions(5, 0.8, first=0.1):
            fraction = wait_for_fraction(target)
            elapsed, status = self.attempt(gate.port)
            runs.append((fraction, elapsed, status))
        report = ", ".join(f"start .{f * 1000:03.0f}: {e:.3f}s {s!r}" for f, e, s in runs)
        print(f"upstream handshake_timeout {ms(UPSTREAM_HANDSHAKE_TIMEOUT)}: {report}")
        low, high = UPSTREAM_504_WINDOW
        for _, elapsed, status in runs:
            self.assertRegex(status, r"^HTTP/1\.1 504 ", report)
            self.assertGreaterEqual(elapsed, low, f"timed out early: {report}")
            self.assertLess(elapsed, high, f"timed out late: {report}")
        self.assertEqual(backend.accepted, 5, report)

    def test_slow_backend_within_timeout_never_refused(self) -> None:
        """
        upstream ``handshake_timeout = "600ms"``, a backend that answers a valid 101 0.3 s after
        the request: the client gets its 101 every time over 10 attempts, each started at another
        fraction of a wall-clock second (the old timers refused most of them).
        """
        backend = RawBackend(self, slow_backend)
        gate = self.start_gate_to(backend)
        assert gate.port is not None
        runs = []
        for target in spread_fractions(10, 0.45):
            fraction = wait_for_fraction(target)
            elapsed, status = self.attempt(gate.port)
            runs.append((fraction, elapsed, status))
        report = ", ".join(f"start .{f * 1000:03.0f}: {e:.3f}s {s!r}" for f, e, s in runs)
        print(f"backend answering after {ms(SLOW_BACKEND_DELAY)}: {report}")
        refused = [run for run in runs if not run[2].startswith("HTTP/1.1 101 ")]
        self.assertEqual(refused, [], f"refused {len(refused)} of 10: {report}")
        for _, elapsed, _ in runs:
            # The harness: the 101 came through the slow backend, not before it answered.
            self.assertGreaterEqual(elapsed, SLOW_BACKEND_DELAY, report)
        self.assertEqual(backend.accepted, 10, report)


class HealthCheckTimeoutTests(TestCase):
    def test_websocket_check_keeps_healthy_server_up(self) -> None:
        """
        Health checks ``type = "websocket"``, ``timeout = "500ms"``, ``interval = "100ms"``,
        ``fall = 3``: over 3 s of checks a healthy Node ``ws`` backend (answering in a few ms) is
        never marked down (every /status.json sample says "up", no ``server_down`` for it in the
        log, and it saw the checks), while a backend of the same upstream that never answers the
        upgrade is marked down: the observation works and the timeout fires.  (The old
        whole-second timers failed every probe started in the first half of a wall-clock second,
        about five in a row each second at this interval, far more than ``fall``; one probe slowed
        by a loaded machine does not take the server down.)
        """
        if not (NODE_FIXTURES / "node_modules" / "ws").is_dir():
            raise AssertionError(f"the ws package is missing from {NODE_FIXTURES}")
        node_port, admin_port = free_ports(2)
        node = start_process(
            self,
            [node_command(), str(DEFLATE_SERVER), str(node_port)],
            ready_port=node_port,
            cwd=NODE_FIXTURES,
        )
        node.wait_for_output("Server started")
        healthy = f"ws://{LOOPBACK}:{node_port}"
        silent = RawBackend(self, silent_backend)
        gate = start_gate(
            self,
            '[[route]]\nupstream = "u"\n\n'
            f'[upstream.u]\nservers = [{{ url = "{healthy}" }}, {{ url = "{silent.url}" }}]\n\n'
            "[upstream.u.health]\n"
            f'type = "websocket"\npath = "/"\ninterval = "100ms"\n'
            f'timeout = "{ms(HEALTH_TIMEOUT)}"\nrise = 1\nfall = {HEALTH_FALL}\n\n'
            f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n',
        )
        wait_for_port(LOOPBACK, admin_port, 10, gate)
        status_url = f"http://{LOOPBACK}:{admin_port}/status.json?history=0"

        def states() -> dict[str, dict[str, Any]]:
            with urllib.request.urlopen(status_url, timeout=_IO_TIMEOUT) as response:
                data = json.loads(response.read())
            return {row["server"]: row for row in data["upstreams"] if row["upstream"] == "u"}

        samples: list[tuple[float, str, str]] = []
        started = time.monotonic()
        while time.monotonic() - started < HEALTH_WATCH:
            rows = states()
            samples.append(
                (time.monotonic() - started, rows[healthy]["state"], rows[silent.url]["state"])
            )
            time.sleep(_POLL)
        last = states()
        not_up = [s for s in samples if s[1] != "up"]
        self.assertEqual(
            len(not_up),
            0,
            f"the healthy server was down in {len(not_up)} of {len(samples)} "
            f"samples (seconds, healthy, silent): {not_up[:5]}",
        )
        log = gate.stdout()
        down_lines = [line for line in log.splitlines() if "server_down" in line]
        self.assertFalse(
            [line for line in down_lines if healthy in line],
            f"the healthy server was marked down:\n{log[-4000:]}",
        )
        # The checks ran all along: the healthy server's last one is recent, and the backend
        # saw the checks' handshakes and Close 1000 "health check" (about 30 in 3 s).
        last_check = last[healthy]["last_check"]
        self.assertIsNotNone(last_check, last)
        self.assertLess(last_check, 1.0, last)
        checks = node.stdout().count("Client disconnected: 1000 health check")
        self.assertGreaterEqual(checks, 10, node.stdout()[-2000:])
        # The check of the observation: the silent server is marked down by the checks' timeout
        # and both /status.json and the log say so.
        self.assertEqual(last[silent.url]["state"], "down", last)
        self.assertTrue([line for line in down_lines if silent.url in line], log[-4000:])
        first_down = next((s[0] for s in samples if s[2] == "down"), None)
        print(
            f"health: {len(samples)} samples over {HEALTH_WATCH}s, healthy server always up, "
            f"{checks} checks completed; silent server down from {first_down and round(first_down, 2)}s"
        )

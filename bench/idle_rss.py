"""
RSS per idle session: ``python bench/idle_rss.py [SESSIONS]`` (default 1000).

Starts an Autobahn echo backend and a gate (``twistd wsgate``) on loopback, opens SESSIONS
WebSocket sessions through the gate (raw sockets, one message each so both legs are open), and
prints the gate's RSS before and after, per session.  Every process it starts is stopped by PID.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind((LOOPBACK, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit("no VmRSS")


def session(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: {LOOPBACK}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    sock.sendall(b"\x81\x82\0\0\0\0hi")  # one masked text message "hi"
    echo = b""
    while len(echo) < 4:
        echo += sock.recv(64)
    return sock


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    gate_port, backend_port = free_ports(2)
    python = sys.executable
    twistd = str(Path(python).with_name("twistd"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    backend = subprocess.Popen(
        [python, str(REPO / "tests/fixtures/ab_backend.py"), str(backend_port), "echo"],
        stdout=subprocess.DEVNULL,
    )
    gate = subprocess.Popen(
        [
            twistd,
            "-n",
            "--pidfile=",
            "wsgate",
            "--listen",
            f"tcp:{gate_port}:interface={LOOPBACK}",
            "--backend",
            f"ws://{LOOPBACK}:{backend_port}",
        ],
        stdout=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    socks = []
    try:
        wait_port(backend_port)
        wait_port(gate_port)
        socks.append(session(gate_port))  # warm up: first session's one-time costs
        time.sleep(0.5)
        before = rss_kib(gate.pid)
        started = time.monotonic()
        socks += [session(gate_port) for _ in range(count)]
        elapsed = time.monotonic() - started
        time.sleep(1)
        after = rss_kib(gate.pid)
        print(
            f"sessions: {count}  opened in {elapsed:.2f} s ({count / elapsed:.0f} sessions/s, sequential)"
        )
        print(f"gate RSS: {before} KiB before, {after} KiB after")
        print(f"RSS per idle session: {(after - before) / count:.1f} KiB")
    finally:
        for s in socks:
            s.close()
        for p in (gate, backend):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()

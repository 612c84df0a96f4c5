"""
systemd's readiness protocol (``Type=notify``) from real gate processes (``wsgate run``, one process
and ``workers = 2``) started with ``NOTIFY_SOCKET`` set, as systemd starts them: ``READY=1`` once
listening, ``RELOADING=1``/``READY=1`` around a reload (SIGHUP, or ``wsgate reload`` through the
control API), ``STOPPING=1`` on SIGTERM, every datagram from the main process (systemd's default
``NotifyAccess=main`` drops the others).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from twisted.trial.unittest import TestCase
from websockets.sync.client import connect

from tests.procs import (
    LOOPBACK,
    NotifySocket,
    Process,
    free_ports,
    start_node_backend,
    start_process,
    wait_exit,
)

WSGATE = Path(sys.executable).with_name("wsgate")


def _config(
    gate_port: int, admin_port: int, backend_port: int, control: Path, workers: int = 1
) -> str:
    return (
        f"workers = {workers}\n"
        f'[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
        '[[route]]\npath = "/"\nupstream = "echo"\n'
        f'[upstream.echo]\nservers = [{{ url = "ws://{LOOPBACK}:{backend_port}" }}]\n'
        f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
        f'[control]\nendpoint = "unix:{control}"\n'
    )


def _ready(admin_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/ready", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class GateProcessTests(TestCase):
    """``wsgate run --config`` as systemd runs it: NOTIFY_SOCKET in its environment."""

    def start(self, listener: NotifySocket, config: str) -> tuple[Process, Path]:
        path = Path(self.mktemp())
        path.write_text(config)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PYTHONUNBUFFERED="1", NOTIFY_SOCKET=listener.address)
        argv = [str(WSGATE), "run", "--config", str(path.resolve())]
        return start_process(self, argv, env=env), path

    def sigterm_stops(self, listener: NotifySocket, gate: Process) -> None:
        """SIGTERM: STOPPING=1 from the main process, which then ends by the signal; nothing
        more is said."""
        os.kill(gate.pid, signal.SIGTERM)
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["STOPPING"]), (gate.pid, "1"))
        self.assertEqual(wait_exit(gate), -signal.SIGTERM, gate.describe())
        self.assertTrue(listener.nothing_within(0.2))

    def control_reload(self, listener: NotifySocket, gate: Process, path: Path) -> None:
        """``wsgate reload`` (the control API) is announced like SIGHUP, by the main process."""
        done = subprocess.run(
            [str(WSGATE), "reload", "--config", str(path)], capture_output=True, timeout=30
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["RELOADING"]), (gate.pid, "1"))
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["READY"]), (gate.pid, "1"))

    def test_ready_reload_stop(self) -> None:
        """
        The first datagram is READY=1, from the gate's own pid, and by then the listener accepts
        and relays and /ready says ready; SIGHUP gives RELOADING=1 then READY=1 (for a refused
        file too); SIGTERM gives STOPPING=1 before the process exits.
        """
        listener = NotifySocket(self)
        gate_port, admin_port = free_ports(2)
        backend = start_node_backend(self)
        assert backend.port is not None
        control = Path(self.mktemp()) / "control.sock"
        gate, path = self.start(listener, _config(gate_port, admin_port, backend.port, control))
        pid, fields = listener.receive()
        self.assertEqual(pid, gate.pid, gate.describe())
        self.assertEqual(fields["READY"], "1")
        self.assertEqual(fields["STATUS"], f"listening on tcp:{gate_port}:interface={LOOPBACK}")
        with connect(f"ws://{LOOPBACK}:{gate_port}/", open_timeout=5) as ws:
            ws.send("Hello")
            self.assertEqual(ws.recv(timeout=5), "Server received from client: Hello")
        self.assertEqual(_ready(admin_port), (200, "ready\n"))

        for text in (path.read_text(), "[[listen]]\nendpoint = 1\n"):
            path.write_text(text)
            os.kill(gate.pid, signal.SIGHUP)
            pid, fields = listener.receive()
            self.assertEqual((pid, fields["RELOADING"]), (gate.pid, "1"))
            self.assertIn("MONOTONIC_USEC", fields)
            pid, fields = listener.receive()
            self.assertEqual((pid, fields["READY"]), (gate.pid, "1"))
        gate.wait_for_output("config_reload_refused", 5)
        path.write_text(_config(gate_port, admin_port, backend.port, control))
        self.control_reload(listener, gate, path)

        self.sigterm_stops(listener, gate)

    def test_workers(self) -> None:
        """
        With workers = 2 only the parent speaks (abstract socket name here), and the workers'
        environment has no NOTIFY_SOCKET.
        """
        listener = NotifySocket(self, abstract=True)
        gate_port, admin_port = free_ports(2)
        backend = start_node_backend(self)
        assert backend.port is not None
        control = Path(self.mktemp()) / "control.sock"
        config = _config(gate_port, admin_port, backend.port, control, workers=2)
        gate, path = self.start(listener, config)
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["READY"]), (gate.pid, "1"), gate.describe())
        output = gate.wait_for_output("worker_started 2", 10)
        worker_pids = [int(p) for p in re.findall(r"worker_started \d+ pid=(\d+)", output)]
        self.assertEqual(len(worker_pids), 2, output)
        for worker_pid in worker_pids:
            environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
            self.assertFalse([v for v in environ if v.startswith(b"NOTIFY_SOCKET=")])
        deadline = time.monotonic() + 10
        while _ready(admin_port)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)  # the parent knows its workers' servers from their first poll
        self.assertEqual(_ready(admin_port), (200, "ready\n"))
        self.control_reload(listener, gate, path)
        self.sigterm_stops(listener, gate)

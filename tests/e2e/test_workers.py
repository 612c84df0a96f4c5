"""
``workers = 2`` end to end: twistd runs the parent, which binds the port and runs two worker
processes; real clients connect through the shared port to a real Autobahn echo backend.  Sessions
land on both workers, ``/status.json`` and ``/metrics`` show them as one gateway, SIGHUP reaches
both workers, a killed worker is restarted, and SIGTERM closes every client with 1001.

Worker pids come from the parent's log (``worker_started N pid=P``); the test signals only those
and cleans up any that outlive the parent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    LOOPBACK,
    REPO,
    Process,
    free_ports,
    start_configured_gate,
    start_process,
    terminate_gate,
)

BACKEND = REPO / "tests" / "fixtures" / "ab_backend.py"
_WAIT = 15.0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_worker(pid: int) -> None:
    """Cleanup: a worker this test's gate started that is still running (checked by cmdline)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"wsgate.worker" in cmdline:
        os.kill(pid, signal.SIGKILL)


class WorkersTests(TestCase):
    def setUp(self) -> None:
        gate_port, backend_port, admin_port = free_ports(3)
        start_process(
            self,
            [sys.executable, str(BACKEND), str(backend_port), "echo"],
            ready_port=backend_port,
        )
        config = Path(self.mktemp())
        config.write_text(
            "workers = 2\n"
            f'[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
            '[[route]]\nupstream = "u"\n'
            f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{backend_port}" }}]\n'
            f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
            '[limits]\nshutdown_grace = "5s"\n'
        )
        self.config, self.gate_port = config, gate_port
        self.gate: Process = start_configured_gate(self, config, gate_port)
        self.url = f"ws://{LOOPBACK}:{gate_port}"
        self.admin = f"http://{LOOPBACK}:{admin_port}"
        self.pids = self.worker_pids(2)
        for pid in self.pids.values():
            self.addCleanup(_kill_worker, pid)

    def worker_pids(self, count: int) -> dict[int, int]:
        """The latest pid of each worker, from the parent's log, once ``count`` have started."""
        pattern = re.compile(r"worker_started (\d+) pid=(\d+)")
        deadline = time.monotonic() + _WAIT
        while True:
            found: dict[int, int] = {}
            for match in pattern.finditer(self.gate.stdout()):
                found[int(match.group(1))] = int(match.group(2))
            listening = self.gate.stdout().count("ClientLegFactory starting")
            if len(re.findall(pattern, self.gate.stdout())) >= count and listening >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} workers did not start:\n{self.gate.describe()}")
            time.sleep(0.05)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.admin + path, timeout=5) as response:
            body: bytes = response.read()
            return body

    def status_until(self, check: Any, what: str) -> dict[str, Any]:
        """Poll /status.json (the parent polls workers every second) until ``check`` holds."""
        deadline = time.monotonic() + _WAIT
        while True:
            data: dict[str, Any] = json.loads(self.get("/status.json"))
            if check(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {json.dumps(data)[:2000]}\n{self.gate.describe()}")
            time.sleep(0.2)

    def open(self, count: int) -> list[ClientConnection]:
        """
        ``count`` clients connecting at once (idle workers race for each connection; when
        connections come one by one to an idle gate, the same worker may win every time).
        """
        with ThreadPoolExecutor(count) as pool:
            clients = list(pool.map(lambda _: connect(self.url, open_timeout=10), range(count)))
        for i, ws in enumerate(clients):
            self.addCleanup(ws.close)
            ws.send(f"hello {i}")
            self.assertEqual(ws.recv(timeout=10), f"hello {i}")
        return clients

    def wait_log(self, text: str, count: int = 1) -> str:
        deadline = time.monotonic() + _WAIT
        while self.gate.stdout().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} x{count} not logged:\n{self.gate.describe()}")
            time.sleep(0.05)
        return self.gate.stdout()

    def test_one_gateway_reload_and_restart(self) -> None:
        """
        Sessions land on both workers and the admin listener shows them as one gateway (sums in
        /metrics); SIGHUP reloads both; a worker killed with SIGKILL is restarted, its sessions
        are logged as lost, and new sessions work.
        """
        clients = self.open(12)
        data = self.status_until(
            lambda d: d["stats"]["sessions_active"] == 12, "12 sessions not shown"
        )
        by_worker: dict[int, list[str]] = {}
        for row in data["sessions"]:
            by_worker.setdefault(row["worker"], []).append(row["id"])
        self.assertEqual(set(by_worker), {1, 2}, by_worker)
        self.assertEqual(sum(len(ids) for ids in by_worker.values()), 12)
        # The sessions opened before their messages went: poll until a worker report counts them.
        deadline = time.monotonic() + _WAIT
        while 'wsgate_messages_total{direction="up"} 12\n' not in (
            metrics := self.get("/metrics").decode()
        ):
            self.assertLess(time.monotonic(), deadline, metrics)
            time.sleep(0.2)
        self.assertIn("wsgate_sessions_active 12\n", metrics)
        self.assertIn("wsgate_sessions_opened_total 12\n", metrics)
        self.assertIn('wsgate_handshakes_total{result="ok"} 12\n', metrics)

        os.kill(self.gate.pid, signal.SIGHUP)
        log = self.wait_log("worker_reloaded", 2)
        self.assertIn("worker 1: config_reloaded nothing changed", log)
        self.assertIn("worker 2: config_reloaded nothing changed", log)

        lost = len(by_worker[1])
        os.kill(self.pids[1], signal.SIGKILL)
        log = self.wait_log("worker_started 1 pid=", 2)
        self.assertIn(f"worker_died 1 pid={self.pids[1]} signal 9: {lost} sessions lost", log)
        self.assertEqual(log.count("session_lost 1:"), lost)
        new_pid = self.worker_pids(3)[1]
        self.addCleanup(_kill_worker, new_pid)
        self.assertNotEqual(new_pid, self.pids[1])
        dropped = 0
        for ws in clients:
            try:
                ws.send("still there?")
                ws.recv(timeout=5)
            except ConnectionClosed:
                dropped += 1
        self.assertEqual(dropped, lost)
        self.open(8)
        data = self.status_until(
            lambda d: (
                d["stats"]["sessions_active"] == 20 - lost
                and {r["worker"] for r in d["sessions"]} == {1, 2}
            ),
            "new sessions not on both workers",
        )

    def test_sigterm_fans_out(self) -> None:
        """SIGTERM: every client of every worker gets 1001, the workers exit, then the parent."""
        clients = self.open(8)
        for ws in clients:
            ws.send("x")
            ws.recv(timeout=5)
        log = terminate_gate(self, self.gate, clients, exit_timeout=_WAIT)
        self.assertEqual(log.count("worker_stopped"), 2)
        self.assertEqual(log.count("session_closed"), 8)
        self.assertNotIn("worker_killed", log)
        for pid in self.pids.values():
            self.assertFalse(_alive(pid), f"worker {pid} outlived the parent")

    def test_process_group_signal(self) -> None:
        """
        SIGTERM or SIGINT to the whole process group (systemd's KillMode=mixed/control-group,
        Ctrl-C in a terminal) reaches the parent and both workers at once: every client gets 1001,
        each worker exits 0, the parent ends by the signal, and nothing logs a traceback or a
        CRITICAL line (each worker stops once, however many stop requests meet).  Three rounds,
        as the collision is a race.
        """
        for round, signum in enumerate((signal.SIGTERM, signal.SIGTERM, signal.SIGINT)):
            if round:
                self.gate = start_configured_gate(self, self.config, self.gate_port)
                self.pids = self.worker_pids(2)
                for pid in self.pids.values():
                    self.addCleanup(_kill_worker, pid)
            clients = self.open(4)
            os.killpg(self.gate.pid, signum)
            for ws in clients:
                with self.assertRaises(ConnectionClosed):
                    ws.recv(timeout=_WAIT)
                self.assertEqual(ws.close_code, 1001)
            deadline = time.monotonic() + _WAIT
            while self.gate.returncode is None and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(self.gate.returncode, -signum, self.gate.describe())
            output = self.gate.stdout() + self.gate.stderr()
            for bad in ("Traceback", "CRITICAL", "#critical", "Unhandled"):
                self.assertNotIn(bad, output, f"round {round}:\n{self.gate.describe()}")
            for index, pid in self.pids.items():
                self.assertIn(f"worker_stopped {index} pid={pid} exit 0", output)
                self.assertFalse(_alive(pid), f"worker {pid} outlived the parent")
            self.assertNotIn("worker_killed", output)

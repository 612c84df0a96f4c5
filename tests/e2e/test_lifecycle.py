"""
Lifecycle end to end: graceful SIGTERM, message conservation across reloads and backend restarts,
and a bounded soak whose file descriptors and memory return to baseline.

The soak runs ``WSGATE_SOAK_SECONDS`` seconds (default 6, CI); ``WSGATE_SOAK_SECONDS=300`` is
the long setting documented in the README.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.e2e.helpers import GateCase, settled_fds, status_kib
from tests.procs import terminate_gate


class ShutdownTests(GateCase):
    def test_sigterm_closes_sessions_1001(self) -> None:
        """SIGTERM: every client gets Close 1001, the gate logs it and exits in order within the grace."""
        self.start("echo", extra='[limits]\nshutdown_grace = "5s"\n')
        clients = [connect(self.url) for _ in range(5)]
        for ws in clients:
            ws.send("x")
            ws.recv(timeout=5)
        log = terminate_gate(self, self.gate, clients)
        self.assertIn("Server Shut Down.", log)
        self.assertIn("shutdown closing 5 sessions", log)
        self.assertEqual(log.count("session_closed"), 5)
        self.assertNotIn("grace over", log)


class ConservationTests(GateCase):
    def test_numbered_messages(self) -> None:
        """
        Clients exchange numbered messages while the gate is reloaded twice and the backend is
        killed and restarted: per session, the echoes are exactly the first messages sent, once
        each and in order; sessions the client closed got every echo; every session that ended
        otherwise ended with a close code, never in silence.
        """
        self.start("echo")
        stop = time.monotonic() + 4.0
        results: list[dict] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            while time.monotonic() < stop:
                sent: list[str] = []
                got: list[str] = []
                try:
                    ws = connect(self.url, open_timeout=5)
                except InvalidStatus as e:  # 502 while the backend restarts: try again
                    assert e.response.status_code == 502, e
                    time.sleep(0.05)
                    continue
                try:
                    for i in range(200):
                        sent.append(f"{n}:{i}")
                        ws.send(sent[-1])
                        got.append(ws.recv(timeout=5))
                        if time.monotonic() > stop:
                            break
                    ws.close()
                    ended = "client"
                except ConnectionClosed:
                    ended = "gate"
                with lock:
                    results.append(
                        {
                            "sent": sent,
                            "got": got,
                            "ended": ended,
                            "code": ws.close_code,
                            "rcvd": ws.protocol.close_rcvd is not None,
                        }
                    )

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(1)
        os.kill(self.gate.pid, signal.SIGHUP)
        time.sleep(0.5)
        os.kill(self.backend.pid, signal.SIGKILL)
        self.start_backend()
        time.sleep(0.5)
        os.kill(self.gate.pid, signal.SIGHUP)
        for t in threads:
            t.join(30)
        self.assertFalse(any(t.is_alive() for t in threads))
        sessions = len(results)
        messages = sum(len(r["got"]) for r in results)
        abnormal = [r for r in results if r["ended"] == "gate"]
        print(
            f"conservation: {sessions} sessions, {messages} echoes checked, {len(abnormal)} ended by the backend restart"
        )
        for r in results:
            self.assertEqual(r["got"], r["sent"][: len(r["got"])])
            self.assertTrue(r["rcvd"], "a session ended without a Close frame")
            if r["ended"] == "client":
                self.assertEqual(r["got"], r["sent"])
                self.assertEqual(r["code"], 1000)
            else:
                self.assertEqual(r["code"], 1011)
        self.assertGreater(len(abnormal), 0, "the backend restart ended no session")
        self.assertEqual(self.gate.stdout().count("config_reloaded"), 2)


class SoakTests(GateCase):
    def test_churn_returns_to_baseline(self) -> None:
        """Steady connects, messages and closes: fds return to baseline, RSS stays bounded."""
        seconds = float(os.environ.get("WSGATE_SOAK_SECONDS", "6"))
        self.start("echo", top="log_session_opened = true")
        for _ in range(50):  # warm up allocator pools and caches
            with connect(self.url) as ws:
                ws.send("w")
                ws.recv(timeout=5)
        baseline_fds = settled_fds(self.gate.pid)
        baseline_rss = status_kib(self.gate.pid, "VmRSS")
        stop = time.monotonic() + seconds
        counts = [0] * 8

        def churn(n: int) -> None:
            while time.monotonic() < stop:
                with connect(self.url) as ws:
                    for i in range(5):
                        ws.send(f"{i}")
                        ws.recv(timeout=5)
                counts[n] += 1

        threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        peak_rss = status_kib(self.gate.pid, "VmHWM")
        fds = settled_fds(self.gate.pid, expected=baseline_fds)
        rss = status_kib(self.gate.pid, "VmRSS")
        log = self.gate.stdout()
        opened, closed = log.count("session_opened"), log.count("session_closed")
        print(
            f"soak {seconds:.0f}s: {sum(counts)} sessions; fds {baseline_fds} -> {fds}; "
            f"RSS {baseline_rss} -> {rss} KiB (peak {peak_rss}); opened {opened} closed {closed}"
        )
        self.assertEqual(fds, baseline_fds)
        self.assertEqual(opened, closed)
        self.assertLess(rss - baseline_rss, 8 * 1024)

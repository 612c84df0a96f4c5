"""
A fleet of three gate processes sharing a real ``redis-server`` (Debian's, started by the test on a
free loopback port, nothing persisted), with real WebSocket clients (the ``websockets`` library)
on each gate: the console of one gate (OpenSSH client) lists the whole fleet, kicks, pushes and drains
reach sessions on other gates, a per-address limit holds across gates, and Redis stopped and
started again mid-test loses no session from the fleet's view.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.e2e.helpers import BACKEND, ConsoleGateCase, command_of
from tests.procs import (
    LOOPBACK,
    Process,
    free_ports,
    start_configured_gate,
    start_process,
    start_redis,
    wait_for_port,
)
from wsgate.ctl import request

GATES = ("g1", "g2", "g3")
PER_IP = 4


class FleetTests(ConsoleGateCase):
    """
    Three gates (g1 with the console and /metrics), one Redis, one echo backend.  Borrows the
    console case's SSH helpers (``run_ssh``, ``login``, ``type``), not its single gate.
    """

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-fleet-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.key = self.dir / "id_ops"
        subprocess.run(
            [command_of("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", self.key],
            check=True,
            timeout=30,
        )
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        ports = free_ports(8)
        self.redis_port, self.backend_port, self.ssh_port, self.admin_port = ports[:4]
        backend = self.backend_port
        self.ports = dict(zip(GATES, ports[4:7], strict=True))
        self.redis = start_redis(self, self.redis_port, self.dir)
        start_process(
            self, [sys.executable, str(BACKEND), str(backend), "echo"], ready_port=backend
        )
        self.gates: dict[str, Process] = {}
        for name, port in self.ports.items():
            extra = ""
            if name == "g2":
                extra = f'[control]\nendpoint = "unix:{self.dir / "g2.sock"}"\n'
            if name == "g1":
                extra = (
                    f'[console]\nendpoint = "tcp:{self.ssh_port}:interface={LOOPBACK}"\n'
                    'authorized_keys = "authorized_keys"\nhost_key = "host_key"\n'
                    f'[admin]\nendpoint = "tcp:{self.admin_port}:interface={LOOPBACK}"\n'
                )
            config = self.dir / f"{name}.toml"
            config.write_text(
                f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n'
                '[[route]]\nupstream = "u"\n'
                f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{backend}" }}]\n'
                f"[limits]\nmax_sessions_per_ip = {PER_IP}\n"
                f'[cluster]\nredis = "redis://{LOOPBACK}:{self.redis_port}/3"\nname = "{name}"\n'
                'heartbeat = "300ms"\nttl = "2s"\nsync_interval = "100ms"\n'
                'request_timeout = "3s"\nfleet_limits = true\n' + extra
            )
            self.gates[name] = start_configured_gate(self, config, port)
        wait_for_port(LOOPBACK, self.ssh_port, 10, self.gates["g1"])
        for gate in self.gates.values():
            gate.wait_for_output("cluster_joined gate=", timeout=10)

    def open(self, gate: str) -> ClientConnection:
        ws = connect(f"ws://{LOOPBACK}:{self.ports[gate]}/", open_timeout=5, close_timeout=2)
        self.addCleanup(ws.close)
        ws.send("ping")
        self.assertEqual(ws.recv(timeout=5), "ping")
        return ws

    def ask(self, line: str, ok: bool = True) -> str:
        """Run a console command on g1 through ``ssh host 'command'``; its output (stdout when
        it succeeded, the error line otherwise)."""
        done = self.run_ssh(line)
        self.assertEqual(done.returncode, 0 if ok else 1, (done.stdout, done.stderr))
        return done.stdout if ok else done.stderr

    def listing(self, expected: int, timeout: float = 10.0) -> str:
        """``gate.fleet_sessions()`` once it lists ``expected`` sessions (bounded wait)."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.ask("gate.fleet_sessions()")
            if f"({expected} sessions)" in screen and "unreachable" not in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"no listing of {expected} sessions:\n{screen}")

    def metric(self, name: str) -> str:
        url = f"http://{LOOPBACK}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        assert found is not None, text
        return found.group(1)

    def test_fleet(self) -> None:
        """One console lists the fleet; kick and push reach other gates; the per-address limit
        holds fleet-wide; Redis restarted loses no session."""
        clients = {name: self.open(name) for name in GATES}
        screen = self.ask("gate.fleet()")
        for name in GATES:
            self.assertRegex(screen, rf"\n{name}\s")
        screen = self.listing(3)
        ids = {name: re.search(rf"\b{name}:(\d+)\b", screen) for name in GATES}
        self.assertTrue(all(ids.values()), screen)
        self.assertEqual(self.metric("wsgate_cluster_up"), "1")

        # Push into a session on g2, from g1's console.
        g2 = f"g2:{ids['g2'].group(1)}"  # type: ignore[union-attr]
        screen = self.ask(f'gate.fleet_push("{g2}", "hello from g1")')
        self.assertIn(f"pushed 13 bytes to session {g2}", screen)
        self.assertEqual(clients["g2"].recv(timeout=5), "hello from g1")
        clients["g2"].send("still relayed")
        self.assertEqual(clients["g2"].recv(timeout=5), "still relayed")

        # The control API of g2 lists the fleet and pushes into a session on g1.
        sock = f"unix:{self.dir / 'g2.sock'}"
        code, answer = request(sock, None, "GET", "/fleet/sessions", None, timeout=5)
        self.assertEqual((code, sorted(r["gate"] for r in answer["sessions"])), (200, list(GATES)))
        g1 = f"g1:{ids['g1'].group(1)}"  # type: ignore[union-attr]
        code, answer = request(
            sock, None, "POST", f"/fleet/sessions/{g1}/messages", {"text": "api"}, timeout=5
        )
        self.assertEqual((code, answer["pushed"]), (200, g1), answer)
        self.assertEqual(clients["g1"].recv(timeout=5), "api")
        code, answer = request(sock, None, "DELETE", "/fleet/sessions/g1:999", None, timeout=5)
        self.assertEqual((code, answer["error"]), (502, "no session 999 on gate g1"))

        # Kick a session on g3.
        g3 = f"g3:{ids['g3'].group(1)}"  # type: ignore[union-attr]
        screen = self.ask(f'gate.fleet_kick("{g3}", 4001, "bye")')
        self.assertIn(f"closing session {g3} with 4001", screen)
        with self.assertRaises(ConnectionClosed) as caught:
            clients["g3"].recv(timeout=5)
        self.assertEqual((caught.exception.rcvd.code, caught.exception.rcvd.reason), (4001, "bye"))
        self.gates["g3"].wait_for_output("fleet_kick session_id=")
        screen = self.ask('gate.fleet_kick("g3:999")', ok=False)
        self.assertIn("no session 999 on gate g3", screen)

        # The per-address limit across gates: 4 sessions from 127.0.0.1 in the fleet, g2 holds 1.
        clients["g3b"] = self.open("g3")
        clients["g1b"] = self.open("g1")
        self.listing(PER_IP)
        time.sleep(0.5)  # the per-address counts go round every sync_interval (100 ms)
        with self.assertRaises(InvalidStatus) as refused:
            connect(f"ws://{LOOPBACK}:{self.ports['g2']}/", open_timeout=5)
        self.assertEqual(refused.exception.response.status_code, 429)

        # Redis goes away: every gate keeps relaying and says so; then it comes back.
        self.redis.stop()
        for gate in self.gates.values():
            gate.wait_for_output("cluster_down gate=", timeout=10)
        for ws in (clients["g1"], clients["g2"], clients["g3b"]):
            ws.send("alone")
            self.assertEqual(ws.recv(timeout=5), "alone")
        # Answered at once from this gate alone (no Deferred).
        console = self.login()
        self.assertIn("Redis is unreachable", self.type(console, "gate.fleet_sessions()"))
        self.assertEqual(self.metric("wsgate_cluster_up"), "0")
        self.redis = start_redis(self, self.redis_port, self.dir)
        deadline = time.monotonic() + 15
        for gate in self.gates.values():
            while gate.stdout().count("cluster_joined gate=") < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            self.assertEqual(gate.stdout().count("cluster_joined gate="), 2, gate.describe())
        screen = self.listing(PER_IP)  # every session is back in the fleet's view
        for name in ("g1", "g2", "g3"):
            self.assertIn(f"{name}:", screen)
        self.assertEqual(self.metric("wsgate_cluster_up"), "1")
        # And the fleet-wide limit is whole again after the rejoin.
        time.sleep(0.5)
        with self.assertRaises(InvalidStatus) as refused:
            connect(f"ws://{LOOPBACK}:{self.ports['g2']}/", open_timeout=5)
        self.assertEqual(refused.exception.response.status_code, 429)
        # A drain from g1 reaches every gate that has the server, each telling its sessions on it.
        server = f"ws://{LOOPBACK}:{self.backend_port}"
        screen = self.ask(f'gate.fleet_drain("{server}")')
        self.assertEqual(screen.split(), ["g1:", "2", "g2:", "1", "g3:", "1"], screen)
        for gate in self.gates.values():
            gate.wait_for_output(f"fleet_drain server={server} by=")
            self.assertNotIn("Unhandled error", gate.stdout())
            self.assertNotIn("Traceback", gate.stdout())

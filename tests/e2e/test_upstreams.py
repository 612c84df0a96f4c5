"""
Upstreams end to end, with real processes on loopback: a real Socket.IO server pair and its real
client through the gate (long-polling over ``http = true``, then the upgrade, kept on one server by
``hash`` on a query parameter), and failover with one of three backends dead.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

from twisted.internet import task
from twisted.trial.unittest import TestCase
from websockets.sync.client import connect

from tests.procs import (
    LOOPBACK,
    NODE_FIXTURES,
    free_port,
    free_ports,
    node_command,
    start_configured_gate,
    start_node_backend,
    start_process,
)
from wsgate.config import ServerSpec, UpstreamSpec
from wsgate.core.upstream import Upstream


def start_gate_config(case: TestCase, text: str, port: int) -> object:
    config = Path(case.mktemp())
    config.write_text(f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n' + text)
    return start_configured_gate(case, config, port)


class SocketIOTests(TestCase):
    def test_polling_then_upgrade_on_one_server(self) -> None:
        """
        Two Socket.IO servers behind the gate (route http = true, hash on query "room"): each real
        socket.io-client connects by long-polling, upgrades to WebSocket and exchanges events, and
        every request of one client (polls, posts, the upgrade) reaches the same server.
        """
        if not (NODE_FIXTURES / "node_modules" / "socket.io").is_dir():
            raise AssertionError("socket.io is missing: run npm ci in tests/fixtures/node")
        ports = free_ports(3)
        servers = {}
        for name, port in zip(("alpha", "beta"), ports[:2], strict=True):
            servers[name] = start_process(
                self,
                [node_command(), str(NODE_FIXTURES / "socketio_server.js"), str(port), name],
                ready_port=port,
                cwd=NODE_FIXTURES,
            )
        gate = start_gate_config(
            self,
            '[[route]]\npath = "/"\nupstream = "io"\nhttp = true\n'
            '[upstream.io]\nbalance = "hash"\nkey = "query:room"\n'
            f'servers = [{{ url = "ws://{LOOPBACK}:{ports[0]}" }}, '
            f'{{ url = "ws://{LOOPBACK}:{ports[1]}" }}]\n',
            ports[2],
        )
        url = f"http://{LOOPBACK}:{ports[2]}"
        # Four rooms owned by each server, by the same hash the gate uses (the ports are random,
        # so arbitrary rooms could all land on one server and prove nothing about the spread).
        owners = Upstream(
            UpstreamSpec(
                name="io",
                servers=tuple(ServerSpec(url=f"ws://{LOOPBACK}:{p}") for p in ports[:2]),
                balance="hash",
            ),
            task.Clock(),
        )
        name_of = {
            f"ws://{LOOPBACK}:{port}": name for name, port in zip(servers, ports[:2], strict=True)
        }
        owner_of: dict[str, str] = {}
        for i in range(1000):
            owner = owners.owner(f"room-{i}")
            assert owner is not None
            if Counter(owner_of.values())[name_of[owner.url]] < 4:
                owner_of[f"room-{i}"] = name_of[owner.url]
            if len(owner_of) == 8:
                break
        rooms = list(owner_of)
        clients = [
            subprocess.Popen(
                [node_command(), str(NODE_FIXTURES / "socketio_client.js"), url, room],
                cwd=NODE_FIXTURES,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            for room in rooms
        ]
        results = []
        for client in clients:
            try:
                out, err = client.communicate(timeout=20)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait(5)
            self.assertEqual(client.returncode, 0, f"{err.decode()}\n{gate.describe()}")  # type: ignore[attr-defined]
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        for result in results:
            self.assertEqual((result["first"], result["last"]), ("polling", "websocket"))
            self.assertEqual(result["ack"], f"{result['welcome']}: from {result['room']}")
            self.assertEqual(result["welcome"], owner_of[result["room"]])
            # The server that welcomed the client also saw its upgrade.
            log = servers[result["welcome"]].stdout()
            self.assertIn(f"room={result['room']} transport=polling", log)
            self.assertRegex(log, rf"upgraded \S+ room={result['room']} transport=websocket")
        self.assertIn("http_request", gate.stdout())  # type: ignore[attr-defined]


class FailoverTests(TestCase):
    def test_one_of_three_dead(self) -> None:
        """
        One of three backends is dead (a closed port): 200 connects in a row all succeed, none is
        answered with an error; with passive health the dead server costs one failed attempt, and
        without it (max_fails = 0; 30 connects, as every refused connect costs the connector
        about 0.3 s) every third session fails over within its own handshake.
        """
        live = [start_node_backend(self, name=n) for n in ("one", "two")]
        dead = free_port()
        servers = ", ".join(
            f'{{ url = "ws://{LOOPBACK}:{p}" }}' for p in (live[0].port, dead, live[1].port)
        )
        figures = {}
        for max_fails in (1, 0):
            port = free_port()
            gate = start_gate_config(
                self,
                f'[[route]]\nupstream = "u"\n[upstream.u]\nmax_fails = {max_fails}\n'
                f"servers = [{servers}]\n",
                port,
            )
            names: Counter[str] = Counter()
            started = time.monotonic()
            for _ in range(200 if max_fails else 30):
                with connect(f"ws://{LOOPBACK}:{port}/", open_timeout=5) as ws:
                    ws.send("__name__")
                    names[str(ws.recv(timeout=5))] += 1
            elapsed = time.monotonic() - started
            log = gate.stdout()  # type: ignore[attr-defined]
            failed = log.count("backend_attempt_failed")
            figures[max_fails] = (dict(names), failed, elapsed)
            self.assertEqual(sum(names.values()), 200 if max_fails else 30)
            self.assertEqual(set(names), {"one", "two"})
            self.assertNotIn("session_refused", log)
            if max_fails:
                self.assertEqual(failed, 1)
                self.assertIn("server_down", log)
            else:
                self.assertEqual(failed, 10)
        print(f"failover figures: {figures}")

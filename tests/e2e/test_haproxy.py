"""
Several gates behind a layer-4 balancer, with real processes on loopback: Debian's HAProxy in TCP
mode (``etc/haproxy.cfg``, ports rewritten) sends PROXY protocol v2 to two gate processes whose
listeners say ``proxy_protocol = true``; both gates hash the ``room`` query parameter over the same
three Node ``ws`` backends. Clients connect from several source addresses of 127.0.0.0/8.

Also: PROXY protocol v1 written by hand straight to a gate (limits and forwarded headers follow the
address in the header), a connection without the header is dropped, and the example files in
``etc/`` (``haproxy.cfg``, ``kubernetes.yaml``) are checked.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    INSTALL_HINT,
    LOOPBACK,
    REPO,
    Process,
    free_ports,
    start_configured_gate,
    start_node_backend,
    start_process,
)
from wsgate import config as configmod

HAPROXY_CFG = REPO / "etc" / "haproxy.cfg"
KUBERNETES_YAML = REPO / "etc" / "kubernetes.yaml"
# Client source addresses: loopback, but not HAProxy's own 127.0.0.1.
SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
ROOMS = [f"room-{i}" for i in range(24)]


def haproxy_command() -> str:
    """Debian's haproxy (in /usr/sbin, which a non-root PATH may lack); fail when missing."""
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if path is None:
        raise AssertionError(f"haproxy is not installed: {INSTALL_HINT}")
    return path


def start_gate_config(case: TestCase, text: str, port: int) -> Process:
    """A gate process with config ``text``; ready once ``port`` (its first listener) accepts."""
    path = Path(case.mktemp())
    path.write_text(text)
    return start_configured_gate(case, path, port)


def proxied_gate_config(port: int, admin_port: int, backends: list[int], extra: str = "") -> str:
    servers = ", ".join(f'{{ url = "ws://{LOOPBACK}:{p}" }}' for p in backends)
    return (
        f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\nproxy_protocol = true\n'
        '[[route]]\npath = "/"\nupstream = "chat"\n'
        f'[upstream.chat]\nbalance = "hash"\nkey = "query:room"\nservers = [{servers}]\n'
        f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
        # The room is no secret: /status.json shows it, other query values are redacted.
        '[log]\nredact_query_keep = ["room"]\n' + extra
    )


def status(admin_port: int) -> dict[str, Any]:
    url = f"http://{LOOPBACK}:{admin_port}/status.json?limit=10000&history=0"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def ask(ws: ClientConnection, message: str) -> str:
    ws.send(message)
    return str(ws.recv(timeout=5))


def connect_from(source: str, port: int, path: str) -> tuple[ClientConnection, str]:
    """A WebSocket client whose socket is bound to ``source``; also its ``address:port``."""
    sock = socket.create_connection((LOOPBACK, port), timeout=5, source_address=(source, 0))
    try:
        ws = connect(f"ws://{LOOPBACK}:{port}{path}", sock=sock, open_timeout=5, close_timeout=2)
    except BaseException:
        sock.close()
        raise
    host, local_port = sock.getsockname()[:2]
    return ws, f"{host}:{local_port}"


def connect_proxy_v1(
    port: int, source: str, source_port: int, path: str = "/?room=v1"
) -> ClientConnection:
    """Straight to a proxy_protocol listener, with a PROXY v1 line claiming ``source``."""
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    try:
        sock.sendall(f"PROXY TCP4 {source} {LOOPBACK} {source_port} {port}\r\n".encode())
        return connect(f"ws://{LOOPBACK}:{port}{path}", sock=sock, open_timeout=5, close_timeout=2)
    except BaseException:
        sock.close()
        raise


class HAProxyTwoGatesTests(TestCase):
    def test_real_addresses_and_one_backend_per_key(self) -> None:
        """
        HAProxy (round robin, send-proxy-v2) over two gates; every room connects twice, so each
        room is taken once by each gate. Each gate's /status.json lists its sessions under the
        clients' own addresses and ports (127.0.0.2-9, never HAProxy's 127.0.0.1), the backends
        see them in X-Forwarded-For and X-Real-IP, and both connections of a room reach the same
        backend: both gates hash the key the same way.
        """
        front, gate_ports, admin_ports, backend_ports = self._ports()
        names = ("alpha", "beta", "gamma")
        for name, port in zip(names, backend_ports, strict=True):
            start_node_backend(self, port, name)
        url_names = {f"ws://{LOOPBACK}:{p}": n for n, p in zip(names, backend_ports, strict=True)}
        gates = [
            start_gate_config(self, proxied_gate_config(port, admin, backend_ports), port)
            for port, admin in zip(gate_ports, admin_ports, strict=True)
        ]
        haproxy = self._start_haproxy(front, gate_ports)

        clients: list[dict[str, Any]] = []
        try:
            # Each room twice in a row: round robin sends the two connections to different gates.
            for i, room in enumerate(room for room in ROOMS for _ in range(2)):
                source = SOURCES[i % len(SOURCES)]
                ws, local = connect_from(source, front, f"/?room={room}")
                clients.append({"ws": ws, "room": room, "source": source, "local": local})
            for client in clients:
                client["backend"] = ask(client["ws"], "__name__")
                client["headers"] = json.loads(ask(client["ws"], "__headers__"))
            snapshots = [status(port) for port in admin_ports]
        finally:
            for client in clients:
                client["ws"].close()

        # Where each client's session is, by the client address:port the gates show.
        where: dict[str, tuple[int, dict[str, Any]]] = {}
        for index, snapshot in enumerate(snapshots):
            for row in snapshot["sessions"]:
                self.assertNotIn(row["client"], where, "a session on both gates")
                where[row["client"]] = (index, row)
        self.assertEqual(len(where), len(clients), snapshots)
        per_gate = Counter(index for index, _ in where.values())
        rooms_gates: dict[str, set[int]] = defaultdict(set)
        rooms_backends: dict[str, set[str]] = defaultdict(set)
        for client in clients:
            self.assertIn(client["local"], where, f"{client['local']} on no gate")
            index, row = where[client["local"]]
            self.assertEqual(url_names[row["server"]], client["backend"], row)
            self.assertEqual(row["path"], f"/?room={client['room']}")
            headers = client["headers"]
            self.assertEqual(headers["headers"]["x-forwarded-for"], client["source"])
            self.assertEqual(headers["headers"]["x-real-ip"], client["source"])
            self.assertEqual(headers["remoteAddress"], LOOPBACK)  # the gate itself
            rooms_gates[client["room"]].add(index)
            rooms_backends[client["room"]].add(client["backend"])
        self.assertTrue(all(row["client"].split(":")[0] in SOURCES for _, row in where.values()))

        # Round robin: each gate took about half of the sessions (HAProxy's threads may reorder
        # near-simultaneous picks), and most rooms were taken by both gates.
        self.assertEqual(set(per_gate), {0, 1})
        self.assertGreaterEqual(min(per_gate.values()), len(clients) // 3, per_gate)
        both = [room for room, used in rooms_gates.items() if used == {0, 1}]
        self.assertGreaterEqual(len(both), len(ROOMS) // 2, dict(rooms_gates))
        # Consistent hashing: one backend per room, whichever gate took it.
        agree = [room for room, used in rooms_backends.items() if len(used) == 1]
        self.assertEqual(len(agree), len(ROOMS), dict(rooms_backends))
        spread = Counter(next(iter(used)) for used in rooms_backends.values())
        self.assertEqual(set(spread), set(names), spread)

        # The access log lines carry the real address too; HAProxy logged its side.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            logs = "".join(g.stdout() for g in gates)
            if all(s in logs for s in SOURCES) and logs.count("session_end") >= len(clients):
                break
            time.sleep(0.1)
        for source in SOURCES:
            self.assertIn(source, logs)
        self.assertIn("gates/gate", haproxy.stdout() + haproxy.stderr())
        print(
            f"haproxy figures: sessions per gate {dict(per_gate)}, rooms on both gates "
            f"{len(both)}/{len(ROOMS)}, rooms on one backend {len(agree)}/{len(ROOMS)}, "
            f"rooms per backend {dict(spread)}"
        )

    def _ports(self) -> tuple[int, list[int], list[int], list[int]]:
        ports = free_ports(8)
        return ports[0], ports[1:3], ports[3:5], ports[5:8]

    def _start_haproxy(self, front: int, gates: list[int]) -> Process:
        """HAProxy with etc/haproxy.cfg, its example ports replaced by these."""
        text = HAPROXY_CFG.read_text()
        self.assertEqual(text.count("maxconn 100000"), 1)
        text = text.replace("maxconn 100000", "maxconn 1000")  # within this test's FD limit
        for example, port in (("8000", front), ("9001", gates[0]), ("9002", gates[1])):
            address = f"{LOOPBACK}:{example}"
            self.assertEqual(text.count(address), 1, address)
            text = text.replace(address, f"{LOOPBACK}:{port}")
        path = Path(self.mktemp())
        path.write_text(text)
        return start_process(self, [haproxy_command(), "-db", "-f", str(path)], ready_port=front)


class ProxyProtocolV1Tests(TestCase):
    def setUp(self) -> None:
        port, admin, backend = free_ports(3)
        start_node_backend(self, backend, "solo")
        self.port = port
        self.admin = admin
        self.gate = start_gate_config(
            self,
            proxied_gate_config(
                port,
                admin,
                [backend],
                "[limits]\nmax_sessions_per_ip = 2\ntrusted_proxies = ['127.0.0.64/30']\n",
            ),
            port,
        )

    def test_v1_header_sets_client_address(self) -> None:
        """
        A hand-written ``PROXY TCP4`` line: the session's client is the address and port in it (in
        /status.json, X-Forwarded-For, X-Real-IP), and max_sessions_per_ip counts that address,
        not the socket's real 127.0.0.1.
        """
        first = connect_proxy_v1(self.port, "127.0.0.77", 40001)
        self.addCleanup(first.close)
        headers = json.loads(ask(first, "__headers__"))["headers"]
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.77")
        self.assertEqual(headers["x-real-ip"], "127.0.0.77")
        self.assertEqual(
            [r["client"] for r in status(self.admin)["sessions"]], ["127.0.0.77:40001"]
        )
        second = connect_proxy_v1(self.port, "127.0.0.77", 40002)
        self.addCleanup(second.close)
        with self.assertRaises(InvalidStatus) as refused:
            connect_proxy_v1(self.port, "127.0.0.77", 40003)
        self.assertEqual(refused.exception.response.status_code, 429)
        # Another address in the header is another client, although the socket is the same.
        other = connect_proxy_v1(self.port, "127.0.0.78", 40004)
        self.addCleanup(other.close)
        self.assertEqual(ask(other, "__name__"), "solo")
        clients = sorted(r["client"] for r in status(self.admin)["sessions"])
        self.assertEqual(clients, ["127.0.0.77:40001", "127.0.0.77:40002", "127.0.0.78:40004"])

    def test_trusted_http_proxy_behind_proxy_protocol(self) -> None:
        """
        The PROXY header names an HTTP proxy in trusted_proxies: its X-Forwarded-For is believed
        for the client address (X-Real-IP), and the proxy is appended to X-Forwarded-For.
        """
        sock = socket.create_connection((LOOPBACK, self.port), timeout=5)
        sock.sendall(f"PROXY TCP4 127.0.0.65 {LOOPBACK} 40010 {self.port}\r\n".encode())
        ws = connect(
            f"ws://{LOOPBACK}:{self.port}/?room=x",
            sock=sock,
            additional_headers={"X-Forwarded-For": "127.0.0.90"},
            open_timeout=5,
        )
        self.addCleanup(ws.close)
        headers = json.loads(ask(ws, "__headers__"))["headers"]
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.90, 127.0.0.65")
        self.assertEqual(headers["x-real-ip"], "127.0.0.90")
        self.assertEqual(
            [r["client"] for r in status(self.admin)["sessions"]], ["127.0.0.90:40010"]
        )

    def test_no_header_is_dropped(self) -> None:
        """
        A plain WebSocket upgrade without the PROXY header gets no answer at all: the connection is
        closed; the next proxied client is served as usual.
        """
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as sock:
            sock.sendall(
                b"GET /?room=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            self.assertEqual(sock.recv(4096), b"")
        with self.assertRaises(Exception):  # noqa: B017 - closed without a handshake answer
            connect(f"ws://{LOOPBACK}:{self.port}/", open_timeout=5).close()
        ws = connect_proxy_v1(self.port, "127.0.0.79", 40020)
        self.addCleanup(ws.close)
        self.assertEqual(ask(ws, "__name__"), "solo")
        self.assertEqual(status(self.admin)["stats"]["sessions_opened"], 1)


class ExampleFilesTests(TestCase):
    def test_haproxy_cfg_is_valid(self) -> None:
        """``haproxy -c`` accepts etc/haproxy.cfg, which sends PROXY v2 to every gate."""
        result = subprocess.run(
            [haproxy_command(), "-c", "-f", str(HAPROXY_CFG)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("send-proxy-v2", HAPROXY_CFG.read_text())

    def test_kubernetes_yaml(self) -> None:
        """
        The wsgate.toml embedded in etc/kubernetes.yaml's ConfigMap is a valid config with a
        proxy_protocol listener and DNS-discovered servers; with PyYAML present, the manifests
        parse and the grace period exceeds shutdown_grace.
        """
        text = KUBERNETES_YAML.read_text()
        match = re.search(r"^( +)wsgate\.toml: \|\n((?:\1 .*\n|\n)+)", text, re.MULTILINE)
        self.assertIsNotNone(match, "no wsgate.toml block in the ConfigMap")
        assert match is not None
        indent = len(match.group(1)) + 2
        toml_text = "".join(line[indent:] + "\n" for line in match.group(2).splitlines())
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(toml_text)
            f.flush()
            parsed = configmod.load(f.name)
        self.assertTrue(any(listener.proxy_protocol for listener in parsed.listeners))
        self.assertIsNotNone(parsed.admin)
        servers = [s for u in parsed.upstreams.values() for s in u.servers]
        self.assertTrue(servers and all(s.resolve for s in servers))
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            return  # not a dependency; the TOML check above still ran
        docs = [d for d in yaml.safe_load_all(text) if d]
        kinds = Counter(d["kind"] for d in docs)
        self.assertGreaterEqual(kinds["Service"], 2)
        self.assertEqual(kinds["Deployment"], 1)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(grace, parsed.limits.shutdown_grace)

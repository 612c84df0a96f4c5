"""
Lifecycle webhooks end to end: a gate process, the Node.js ``ws`` backend, the ``websockets``
client, and webhook receivers the test runs on loopback (``http.server`` in a thread, and a TCP
listener that accepts and never answers).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.procs import LOOPBACK, free_ports, start_configured_gate, start_node_backend

# The receiver's answers by path (status, JSON body); /audit records what it gets.
ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "/allow": (200, {"headers": {"X-User": "alice", "X-Plan": "gold"}}),
    "/deny": (403, {"reason": "banned here"}),
    "/broken": (500, {}),
    "/audit": (204, {}),
}


class Receiver:
    """An HTTP webhook receiver in a thread: answers as ANSWERS says, keeps every JSON body."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.calls.append((self.path, json.loads(body)))
                status, answer = ANSWERS[self.path]
                data = json.dumps(answer).encode() if status != 204 else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def records(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body in self.calls if p == path]

    def wait_for(self, path: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.records(path)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{path}: {len(self.records(path))} of {count} calls in {timeout}s")


class Hanging:
    """A TCP listener that accepts connections, reads nothing and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                continue

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def echo_rate(url: str, count: int = 1500) -> float:
    """Round trips per second of ``count`` messages, one at a time, on one new session."""
    with connect(url, open_timeout=5) as ws:
        ws.send("warm up")
        ws.recv(timeout=5)
        start = time.monotonic()
        for i in range(count):
            ws.send(f"m{i}")
            ws.recv(timeout=5)
        return count / (time.monotonic() - start)


class WebhookGateCase(TestCase):
    def start(self, routes: str) -> None:
        gate_port, admin_port = free_ports(2)
        backend = start_node_backend(self)
        config = Path(self.mktemp())
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
            f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
            f'[limits]\nshutdown_grace = "2s"\n{routes}\n'
            f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{backend.port}" }}]\n'
        )
        self.gate = start_configured_gate(self, config, gate_port)
        self.url = f"ws://{LOOPBACK}:{gate_port}"
        self.admin = f"http://{LOOPBACK}:{admin_port}"

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.admin}/metrics", timeout=5).read().decode()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0


class ConnectAndDisconnectTests(WebhookGateCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        self.addCleanup(self.receiver.stop)
        hook = f"http://{LOOPBACK}:{self.receiver.port}"
        self.start(
            f'[[route]]\npath = "/allow"\nupstream = "u"\n'
            f'on_connect = {{ url = "{hook}/allow", headers = ["authorization"], query = true }}\n'
            f'on_disconnect = {{ url = "{hook}/audit" }}\n'
            f'[[route]]\npath = "/deny"\nupstream = "u"\n'
            f'on_connect = {{ url = "{hook}/deny" }}\n'
            f'[[route]]\npath = "/closed"\nupstream = "u"\n'
            f'on_connect = {{ url = "{hook}/broken" }}\n'
            f'[[route]]\npath = "/open"\nupstream = "u"\n'
            f'on_connect = {{ url = "{hook}/broken", on_failure = "allow" }}\n'
        )

    def test_allow_adds_headers_for_the_backend(self) -> None:
        """A 2xx adds its headers to the backend's handshake; the webhook got the request facts."""
        with connect(
            f"{self.url}/allow/room?token=abc",
            additional_headers={"Authorization": "Bearer t0k", "X-Other": "no"},
            open_timeout=5,
        ) as ws:
            ws.send("__headers__")
            seen = json.loads(ws.recv(timeout=5))["headers"]
        self.assertEqual((seen["x-user"], seen["x-plan"]), ("alice", "gold"))
        self.assertEqual(seen["authorization"], "Bearer t0k")
        (facts,) = self.receiver.records("/allow")
        self.assertEqual(facts["event"], "connect")
        self.assertEqual(facts["path"], "/allow/room")
        self.assertEqual(facts["query"], "token=abc")
        self.assertEqual(facts["route"], "/allow")
        self.assertEqual(facts["client"], LOOPBACK)
        self.assertEqual(facts["headers"], {"authorization": "Bearer t0k"})

    def test_deny_and_failures(self) -> None:
        """A 4xx is the client's answer; a 5xx gives 503 (fail closed) or lets it in (fail open)."""
        with self.assertRaises(InvalidStatus) as denied:
            connect(f"{self.url}/deny", open_timeout=5)
        self.assertEqual(denied.exception.response.status_code, 403)
        self.assertIn(b"banned here", denied.exception.response.body)
        with self.assertRaises(InvalidStatus) as closed:
            connect(f"{self.url}/closed", open_timeout=5)
        self.assertEqual(closed.exception.response.status_code, 503)
        with connect(f"{self.url}/open", open_timeout=5) as ws:
            ws.send("hi")
            self.assertEqual(ws.recv(timeout=5), "Server received from client: hi")
        self.assertEqual(self.metric('wsgate_webhook_calls_total{hook="connect",result="deny"}'), 1)
        self.assertEqual(
            self.metric('wsgate_webhook_calls_total{hook="connect",result="failed_open"}'), 1
        )
        self.assertIn("session_refused", self.gate.stdout())

    def test_disconnect_record(self) -> None:
        """A finished session's audit record reaches the receiver with the right fields."""
        with connect(
            f"{self.url}/allow", additional_headers={"X-Request-ID": "req-42"}, open_timeout=5
        ) as ws:
            for text in ("one", "two", "three"):
                ws.send(text)
                ws.recv(timeout=5)
            ws.close(4001, "done here")
        (record,) = self.receiver.wait_for("/audit", 1)
        expected = {
            "event": "disconnect",
            "request_id": "req-42",
            "client": LOOPBACK,
            "route": "/allow",
            "upstream": "u",
            "messages_up": 3,
            "bytes_up": len("onetwothree"),
            "messages_down": 3,
            "client_code": 4001,
            "client_reason": "done here",
            "closed_by": "client",
        }
        self.assertEqual({k: record[k] for k in expected}, expected)
        self.assertEqual(record["bytes_down"], 3 * len("Server received from client: ") + 11)
        self.assertTrue(record["server"].startswith(f"ws://{LOOPBACK}:"))
        self.assertGreater(record["duration"], 0)
        self.assertIsInstance(record["session_id"], int)
        self.assertEqual(record["backend_code"], 4001)  # the backend answered the forwarded Close
        self.assertGreaterEqual(record["ended"], record["started"])


class HangingReceiverTests(WebhookGateCase):
    def test_hanging_webhook_never_slows_sessions(self) -> None:
        """
        A receiver that accepts and never answers: sessions still open at once and relay at the
        same pace as before, the queue stays at its bound and the drop counter rises.
        """
        hanging = Hanging()
        self.addCleanup(hanging.stop)
        self.start(
            f'[[route]]\nupstream = "u"\n'
            f'on_disconnect = {{ url = "http://{LOOPBACK}:{hanging.port}/audit", '
            f'timeout = "20s", queue_size = 5, concurrency = 2 }}\n'
        )
        before = echo_rate(self.url)
        sessions = 40
        start = time.monotonic()
        for _ in range(sessions):
            with connect(self.url, open_timeout=5) as ws:
                ws.send("x")
                ws.recv(timeout=5)
        handshakes = time.monotonic() - start
        during = echo_rate(self.url)
        dropped = self.metric('wsgate_webhook_dropped_total{hook="disconnect"}')
        print(
            f"echo round trips/s before {before:.0f}, with a hanging webhook {during:.0f}; "
            f"{sessions} sessions in {handshakes:.2f}s; dropped {dropped:.0f}"
        )
        self.assertGreater(during, before * 0.5, "the hanging webhook slowed the relay")
        self.assertLess(handshakes, sessions * 0.25, "the hanging webhook slowed handshakes")
        # 42 sessions ended; the queue holds 5 (2 of them in flight): the rest were dropped.
        self.assertGreaterEqual(dropped, sessions + 2 - 5 - 1)
        self.assertLessEqual(len(hanging.accepted), 2, "more calls in flight than concurrency")
        self.assertIn("webhook_record_dropped", self.gate.stdout())

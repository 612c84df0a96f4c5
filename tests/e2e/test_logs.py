"""
The real gate (twistd) with ``[log] format = "json"`` in front of the Node ``ws`` echo server,
driven by the ``websockets`` client: after sessions with secrets in their query strings and
headers, refused handshakes of several kinds and a stop, every line the gate wrote parses as JSON
and carries its fields, the backend got the real request and the request id, and no secret shows
in the log, ``/status.json`` or the status page.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.procs import (
    LOOPBACK,
    free_ports,
    read_until,
    start_configured_gate,
    start_node_backend,
)

TOKEN = "tok3n-S3CRET"
AUTH = "Bearer au7h-S3CRET"
COOKIE = "sid=c00kie-S3CRET"
SECRETS = ("S3CRET", "tok3n", "au7h", "c00kie")


def http_get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=5) as answer:
        body: bytes = answer.read()
        return body


def raw_status(port: int, request: bytes) -> int:
    """Send a raw request and return the HTTP status of the answer."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(request)
        answer = read_until(sock, b"\r\n")
    return int(answer.split(b" ", 2)[1])


class JsonLogTests(TestCase):
    def test_json_log_of_a_scripted_run(self) -> None:
        """Sessions, refusals and a stop: every stdout line is a JSON object with its fields."""
        gate_port, admin_port, dead_port = free_ports(3)
        backend = start_node_backend(self)
        config = Path(self.mktemp())
        config.write_text(
            '[log]\nformat = "json"\nredact_query_keep = ["page"]\n'
            f'[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
            '[[route]]\npath = "/locked"\nupstream = "u"\n'
            'allowed_origins = ["https://ok.example"]\n'
            '[[route]]\npath = "/dead"\nupstream = "dead"\n'
            '[[route]]\npath = "/"\nupstream = "u"\n'
            f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{backend.port}" }}]\n'
            f'[upstream.dead]\nservers = [{{ url = "ws://{LOOPBACK}:{dead_port}" }}]\n'
            f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
        )
        gate = start_configured_gate(self, config, gate_port)
        url = f"ws://{LOOPBACK}:{gate_port}"

        # A session with secrets in its query string and headers, and a request id.
        with connect(
            f"{url}/chat?token={TOKEN}&page=2",
            additional_headers={
                "Authorization": AUTH,
                "Cookie": COOKIE,
                "X-Request-ID": "e2e-req-1",
            },
        ) as ws:
            ws.send("__headers__")
            seen = json.loads(ws.recv(timeout=5))
            status_json = http_get(admin_port, "/status.json")
            page = http_get(admin_port, "/")
            ws.close(4000, "bye now")
        self.assertEqual(seen["url"], f"/chat?token={TOKEN}&page=2")
        self.assertEqual(seen["headers"]["authorization"], AUTH)
        self.assertEqual(seen["headers"]["cookie"], COOKIE)
        self.assertEqual(seen["headers"]["x-request-id"], "e2e-req-1")
        [row] = json.loads(status_json)["sessions"]
        self.assertEqual(row["path"], "/chat?token=REDACTED&page=2")
        self.assertEqual(row["request_id"], "e2e-req-1")

        # A session without a request id: the gate makes one.
        with connect(f"{url}/plain") as ws:
            ws.send("__headers__")
            made = json.loads(ws.recv(timeout=5))["headers"]["x-request-id"]
        self.assertRegex(made, r"^[0-9a-f]{32}$")

        # Refused handshakes.
        with self.assertRaises(InvalidStatus) as refused:
            connect(f"{url}/locked?token={TOKEN}", origin="https://evil.example")  # type: ignore[arg-type]
        self.assertEqual(refused.exception.response.status_code, 403)
        with self.assertRaises(InvalidStatus) as refused:
            connect(f"{url}/dead?token={TOKEN}", additional_headers={"X-Request-ID": "e2e-502"})
        self.assertEqual(refused.exception.response.status_code, 502)
        head = f"Host: {LOOPBACK}\r\nAuthorization: {AUTH}\r\n\r\n"
        statuses = [
            raw_status(gate_port, f"GET /?token={TOKEN} HTTP/1.1\r\n{head}".encode()),
            raw_status(gate_port, f"POST /?token={TOKEN} HTTP/1.1\r\n{head}".encode()),
            raw_status(gate_port, f"GET /?token={TOKEN} HTTP/1.1 x\r\n{head}".encode()),
        ]
        self.assertEqual(statuses, [426, 405, 400])

        # Stop, so that every line is written; then read them all.
        os.kill(gate.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while gate.returncode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIsNotNone(gate.returncode, gate.describe())
        output = gate.stdout()
        records: list[dict[str, Any]] = []
        for number, line in enumerate(output.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                self.fail(f"stdout line {number} is not JSON: {line!r}\n{gate.describe()}")
            self.assertIsInstance(record, dict)
            self.assertTrue(
                {"time", "level", "event", "message", "namespace"} <= record.keys(), line
            )
            self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            records.append(record)
        self.assertGreater(len(records), 8)

        for text, where in (
            (output + gate.stderr(), "the gate's output"),
            (status_json.decode(), "/status.json"),
            (page.decode(), "the status page"),
        ):
            for secret in SECRETS:
                self.assertNotIn(secret, text, where)

        closed = [r for r in records if r["event"] == "session_closed"]
        self.assertEqual(len(closed), 2, output)
        first = next(r for r in closed if r["request_id"] == "e2e-req-1")
        self.assertEqual(first["path"], "/chat?token=REDACTED&page=2")
        self.assertEqual((first["client"], first["route"], first["upstream"]), (LOOPBACK, "/", "u"))
        self.assertIsInstance(first["client_port"], int)
        self.assertEqual(first["server"], f"ws://{LOOPBACK}:{backend.port}")
        self.assertIs(first["tls"], False)
        self.assertEqual((first["messages_up"], first["messages_down"]), (1, 1))
        self.assertEqual(first["bytes_up"], len("__headers__"))
        self.assertEqual((first["client_code"], first["client_reason"]), (4000, "bye now"))
        self.assertEqual(first["backend_code"], 4000)  # Node ws answers with the same code
        self.assertEqual(first["closed_by"], "client")
        self.assertIsInstance(first["duration"], float)
        self.assertEqual(first["level"], "info")
        second = next(r for r in closed if r is not first)
        self.assertEqual(second["request_id"], made)

        refusals = sorted(
            (r["status"], r["event"])
            for r in records
            if r["event"] in ("session_refused", "handshake_refused")
        )
        self.assertEqual(
            refusals,
            [
                (400, "handshake_refused"),
                (403, "session_refused"),
                (405, "handshake_refused"),
                (426, "handshake_refused"),
                (502, "session_refused"),
            ],
        )
        for record in records:
            if record["event"] in ("session_refused", "handshake_refused"):
                self.assertTrue(record["path"].endswith("?token=REDACTED"), record)
                self.assertEqual(record["client"], LOOPBACK)
                self.assertIsInstance(record["client_port"], int)
        [bad_gateway] = [
            r for r in records if r["event"] == "session_refused" and r["status"] == 502
        ]
        self.assertEqual(bad_gateway["request_id"], "e2e-502")
        self.assertIn("backend connect failed", bad_gateway["reason"])

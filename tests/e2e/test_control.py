"""
The control API end to end: a real gate process (``tests/procs.py``) with ``[control]`` on its
Unix socket, a raw RFC 6455 echo backend (``tests/fixtures/frame_echo.py``, which echoes frame by
frame, so a fragmented message stays fragmented through the gate) and real ``websockets``
clients; every verb over the socket, ``wsgate ctl`` and ``wsgate reload`` as an operator types
them, a bearer token on TCP, one gate with ``workers = 2`` and pushes while a fragmented message
is in flight, in message and tunnel mode.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.sync.client import ClientConnection, connect

from tests.procs import LOOPBACK, REPO, Process, free_port, start_configured_gate, start_process
from wsgate.ctl import request

FRAME_ECHO = REPO / "tests" / "fixtures" / "frame_echo.py"
TIMEOUT = 10.0
CLIENT = {"open_timeout": TIMEOUT, "close_timeout": TIMEOUT, "proxy": None}


def start_echo(case: Any) -> Process:
    port = free_port()
    process = start_process(case, [sys.executable, str(FRAME_ECHO), str(port)], ready_port=port)
    process.wait_for_output("ready")
    return process


class _GateCase(SynchronousTestCase):
    """A gate in front of the frame echo backend with the control API on a Unix socket."""

    mode = "message"
    workers = 1
    control = ""  # the [control] lines; "" for the Unix socket in the test's directory

    def setUp(self) -> None:
        self.backend = start_echo(self)
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-control-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.socket = self.dir / "run" / "control.sock"
        self.endpoint = f"unix:{self.socket}"
        self.server = f"ws://{LOOPBACK}:{self.backend.port}"
        self.config = self.dir / "wsgate.toml"
        self.write_config()
        self.gate = start_configured_gate(self, self.config, self.port)
        self.wait(lambda: self.socket.exists() or "tcp" in self.control, "the control socket")

    def write_config(self, extra: str = "", weight: int = 1) -> None:
        control = self.control or f'endpoint = "{self.endpoint}"'
        self.config.write_text(
            f"workers = {self.workers}\n"
            f'[[listen]]\nendpoint = "tcp:{self.port}:interface={LOOPBACK}"\n'
            f'[[route]]\nupstream = "u"\nmode = "{self.mode}"\n'
            f'[upstream.u]\nservers = [{{ url = "{self.server}", weight = {weight} }}]\n'
            f'[upstream.v]\nservers = [{{ url = "{self.server}" }}]\n'
            f"[control]\n{control}\n{extra}"
        )

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return request(self.endpoint, token, method, path, body, timeout=TIMEOUT)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        code, answer = self.api(method, path, body)
        self.assertIn(code, (200, 201), (method, path, answer, self.gate.describe()))
        return answer

    def client(self, path: str = "/") -> ClientConnection:
        ws = connect(f"ws://{LOOPBACK}:{self.port}{path}", **CLIENT)
        self.addCleanup(ws.close)
        return ws

    def wait(self, ready: Any, what: str, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout}s\n{self.gate.describe()}")

    def ids(self) -> set[str]:
        return {str(r["id"]) for r in self.ok("GET", "/sessions")["sessions"]}

    def session_id(self, before: set[str] | None = None) -> str:
        """The id of the one live session not in ``before``, once the API lists it (with
        workers, up to a poll interval later)."""
        new = self.wait(lambda: self.ids() - (before or set()), "a new session")
        self.assertEqual(len(new), 1, new)
        return str(new.pop())

    def wsgate(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run(
            [sys.executable, "-m", "wsgate", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env=env,
        )

    def push_during_fragmented_message(self) -> None:
        """
        The client sends a message in two fragments; after the first, echoed back, the gate is
        inside that message toward the client: a push is queued (``queued``), then delivered
        after the message ends.  The websockets client would fail the connection with 1002 had
        the gate put a data frame inside the message.
        """
        ws = self.client()
        sid = self.session_id()
        answers: list[Any] = []

        def fragments() -> Iterator[str]:
            yield "first half, "
            time.sleep(0.5)  # the echo of the first fragment reaches the gate
            answers.append(self.ok("POST", f"/sessions/{sid}/messages", {"text": "pushed"}))
            yield "second half"

        ws.send(fragments())
        self.assertEqual(ws.recv(timeout=TIMEOUT), "first half, second half")
        self.assertEqual(ws.recv(timeout=TIMEOUT), "pushed")
        self.assertTrue(answers[0]["queued"], answers)
        ws.send("after")
        self.assertEqual(ws.recv(timeout=TIMEOUT), "after")


class ControlAPITests(_GateCase):
    """Every verb over the real Unix socket of a one-process gate."""

    def test_sessions_push_and_kick(self) -> None:
        """List, one, push text and binary (a websockets client receives both), kick (DELETE)
        with a code and reason the client sees; an unknown session is 404."""
        ws = self.client("/room?token=secret")
        ws.send("hello")
        self.assertEqual(ws.recv(timeout=TIMEOUT), "hello")
        sid = self.session_id()
        row = self.ok("GET", f"/sessions/{sid}")
        self.assertEqual(row["upstream"], "u")
        self.assertNotIn("secret", str(row))
        self.assertEqual(self.socket.stat().st_mode & 0o777, 0o600)
        answer = self.ok("POST", f"/sessions/{sid}/messages", {"text": "from the gate"})
        self.assertEqual((answer["size"], answer["binary"], answer["queued"]), (13, False, False))
        self.assertEqual(ws.recv(timeout=TIMEOUT), "from the gate")
        payload = bytes(range(256))
        body = {"binary": base64.b64encode(payload).decode()}
        self.ok("POST", f"/sessions/{sid}/messages", body)
        self.assertEqual(ws.recv(timeout=TIMEOUT), payload)
        self.assertEqual(self.api("POST", f"/sessions/{sid}/messages", {"text": 5})[0], 400)
        self.assertEqual(self.api("GET", "/sessions/999")[0], 404)
        self.assertEqual(self.api("POST", "/sessions/999/messages", {"text": "x"})[0], 404)
        self.assertEqual(self.api("DELETE", f"/sessions/{sid}", {"code": 1006})[0], 400)
        self.ok("DELETE", f"/sessions/{sid}", {"code": 4001, "reason": "bye"})
        self.wait(lambda: ws.close_code is not None or _drained(ws), "the close")
        self.assertEqual((ws.close_code, ws.close_reason), (4001, "bye"))
        self.assertEqual(self.ok("GET", "/stats")["messages_pushed"], 2)

    def test_servers_named_per_upstream(self) -> None:
        """Drain, undrain, weight, add and remove act on the named upstream only, though the
        same URL is in two upstreams; a URL alone is ambiguous; reload reports what it resets."""
        self.assertEqual(len(self.ok("GET", "/upstreams")["upstreams"]), 2)
        server = self.server.replace(":", "%3A").replace("/", "%2F")
        answer = self.ok("POST", f"/upstreams/u/servers/{server}/drain", {"deadline": "30s"})
        self.assertEqual((answer["upstream"], answer["draining"]), ("u", True))
        states = {
            name: rows[0]["state"]
            for name, rows in self.ok("GET", "/upstreams")["upstreams"].items()
        }
        self.assertEqual(states, {"u": "draining", "v": "up"})
        port = str(self.backend.port)
        self.ok("POST", f"/upstreams/u/servers/{port}/undrain")
        self.ok("POST", f"/upstreams/u/servers/{port}/weight", {"weight": 5})
        self.assertEqual(self.ok("GET", f"/upstreams/v/servers/{port}")["weight"], 1)
        self.assertEqual(self.ok("GET", f"/upstreams/u/servers/{port}")["weight"], 5)
        code, answer = self.api("POST", f"/upstreams/u/servers/{port}/weight", {"weight": 0})
        self.assertEqual(code, 400, answer)
        self.assertEqual(self.api("GET", "/upstreams/nope")[0], 404)
        added = f"ws://{LOOPBACK}:9"
        self.ok("POST", "/upstreams/u/servers", {"url": added, "weight": 2})
        self.assertEqual(self.api("POST", "/upstreams/u/servers", {"url": "http://x"})[0], 400)
        self.ok("DELETE", f"/upstreams/v/servers/{port}")
        urls = {
            name: [r["server"] for r in rows if r["state"] != "draining"]
            for name, rows in self.ok("GET", "/upstreams")["upstreams"].items()
        }
        self.assertEqual(urls, {"u": [self.server, added], "v": []})
        answer = self.ok("POST", "/reload")
        self.assertTrue(answer["accepted"])
        changes = "\n".join(answer["changes"])
        self.assertIn(
            f"weight of {self.server} in upstream u set at run time to 5, reset to 1", changes
        )
        self.assertIn(
            f"server {added} in upstream u added at run time, removed by the file", changes
        )
        self.assertIn(f"server {self.server} in upstream v removed at run time, back", changes)
        self.assertEqual(self.api("PUT", "/reload")[0], 405)
        self.assertEqual(self.api("GET", "/nothing")[0], 404)

    def test_push_waits_for_a_fragmented_message(self) -> None:
        """A push during a fragmented message arrives after it, whole (message mode)."""
        self.push_during_fragmented_message()

    def test_wsgate_reload_accepted_and_refused(self) -> None:
        """`wsgate reload` exits 0 with what changed; a bad file: 1 with the reasons, and the
        running config stays (new sessions still work)."""
        self.write_config(weight=3)
        done = self.wsgate("reload", "--config", str(self.config))
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("upstream u settings changed", done.stdout)
        self.write_config(extra='bogus = "x"\n')
        done = self.wsgate("reload", "--config", str(self.config))
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertIn("new config refused", done.stderr)
        self.assertIn("control.bogus", done.stderr)
        ws = self.client()
        ws.send("still here")
        self.assertEqual(ws.recv(timeout=TIMEOUT), "still here")

    def test_wsgate_ctl(self) -> None:
        """`wsgate ctl` verbs as an operator types them: tables, JSON, exit statuses."""
        ws = self.client()
        sid = self.session_id()
        config = ("--config", str(self.config))
        done = self.wsgate("ctl", *config, "sessions")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("(1 session)", done.stdout)
        done = self.wsgate("ctl", *config, "push", sid, "typed")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(ws.recv(timeout=TIMEOUT), "typed")
        done = self.wsgate("ctl", *config, "upstreams")
        self.assertIn("UPSTREAM", done.stdout)
        port = str(self.backend.port)
        done = self.wsgate("ctl", *config, "weight", "u", port, "4")
        self.assertEqual(done.returncode, 0, done.stderr)
        done = self.wsgate("ctl", *config, "drain", "v", port)
        self.assertIn('"draining": true', done.stdout)
        done = self.wsgate("ctl", *config, "--json", "stats")
        self.assertIn('"sessions_active": 1', done.stdout)
        done = self.wsgate("ctl", *config, "kick", "77")
        self.assertEqual(done.returncode, 1)
        self.assertIn("no live session 77 (404)", done.stderr)
        done = self.wsgate("ctl", *config, "kick", sid, "--code", "4002")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.wait(lambda: ws.close_code is not None or _drained(ws), "the close")
        self.assertEqual(ws.close_code, 4002)
        done = self.wsgate("ctl", "--control", f"unix:{self.dir}/none.sock", "sessions")
        self.assertEqual(done.returncode, 1)
        self.assertIn("cannot reach the gate's control API", done.stderr)


class TunnelPushTests(_GateCase):
    """Tunnel mode: a push also waits for the end of the message in flight."""

    mode = "tunnel"

    def test_push_waits_for_a_fragmented_message(self) -> None:
        """As in message mode: queued, then after the message."""
        self.push_during_fragmented_message()


class WorkersTests(_GateCase):
    """workers = 2: the parent routes each verb to the worker that holds the session."""

    workers = 2

    def test_push_and_kick_reach_the_worker(self) -> None:
        """Sessions are listed as WORKER:ID; push and kick reach the client through its worker,
        a push during a fragmented message included; server verbs reach every worker."""
        self.push_during_fragmented_message()
        before = self.ids()
        ws = self.client()
        sid = self.session_id(before)
        self.assertIn(":", sid)
        self.ok("POST", f"/sessions/{sid}/messages", {"text": "via a worker"})
        self.assertEqual(ws.recv(timeout=TIMEOUT), "via a worker")
        port = str(self.backend.port)
        self.ok("POST", f"/upstreams/u/servers/{port}/weight", {"weight": 7})
        self.wait(lambda: self.ok("GET", f"/upstreams/u/servers/{port}")["weight"] == 7, "weight 7")
        self.assertEqual(self.api("DELETE", "/sessions/9:9")[0], 404)
        self.ok("DELETE", f"/sessions/{sid}", {"code": 4003})
        self.wait(lambda: ws.close_code is not None or _drained(ws), "the close")
        self.assertEqual(ws.close_code, 4003)
        answer = self.ok("POST", "/reload")
        self.assertIn("reset to 1 by the file", "\n".join(answer["changes"]))


class TokenTests(_GateCase):
    """A loopback TCP control endpoint needs the bearer token of its token file."""

    def setUp(self) -> None:
        self.token_port = free_port()
        token_dir = Path(tempfile.mkdtemp(prefix="wsgate-token-"))
        self.addCleanup(shutil.rmtree, token_dir, True)
        (token_dir / "token").write_text("s3cret-token\n")
        self.control = (
            f'endpoint = "tcp:{self.token_port}:interface={LOOPBACK}"\n'
            f'token_file = "{token_dir / "token"}"'
        )
        super().setUp()
        self.endpoint = f"tcp:{self.token_port}:interface={LOOPBACK}"

    def test_token(self) -> None:
        """No token or a wrong one: 401 with WWW-Authenticate; the right one: 200."""
        self.assertEqual(self.api("GET", "/sessions")[0], 401)
        self.assertEqual(self.api("GET", "/sessions", token="wrong")[0], 401)
        self.assertEqual(self.api("POST", "/reload", token="s3cret-token2")[0], 401)
        code, answer = self.api("GET", "/sessions", token="s3cret-token")
        self.assertEqual((code, answer), (200, {"sessions": []}))
        done = self.wsgate("ctl", "--config", str(self.config), "stats")
        self.assertEqual(done.returncode, 0, done.stderr)


def _drained(ws: ClientConnection) -> bool:
    """Read what is left (bounded), so that the client sees the gate's Close."""
    try:
        ws.recv(timeout=0.1)
    except TimeoutError:
        return False
    except Exception:  # noqa: BLE001  ConnectionClosed: the close code is set now
        return True
    return False

"""
A real browser through the gate: headless Chromium loads a page from a loopback HTTP server started
by the test, and the page's own JavaScript opens a WebSocket through a real gate process to the
Node ``ws`` echo backend with ``perMessageDeflate: true`` (tests/fixtures/node/deflate_server.js),
in both route modes.

The browser offers permessage-deflate by itself; the gate passes the offer to the backend and the
backend's answer back (README, "How a session works"), so the page must see ``permessage-deflate``
in ``ws.extensions``.  The page sends a non-ASCII text message, a binary message of the bytes
0..255 and a large compressible text (above ``ws``'s 1 KiB threshold, so the backend's answer is
compressed too), checks that each echo comes back exactly and with its type, closes with 1000 and
writes its findings as JSON into ``<pre id="result">`` (and sets ``document.title`` to "done").

How the result is read: ``chromium --headless --dump-dom`` does not wait for WebSocket events (it
dumps the DOM once the page has loaded, whatever ``--virtual-time-budget`` says: checked with
Chromium 156, the dump still said "pending"), so the test drives the browser over the DevTools
protocol instead (``--remote-debugging-port=0``) and polls the ``<pre>`` until the page has
written its result, within a bounded time.  A ``Direct...`` class runs the same page straight
against the backend: that is the check of the harness.  (Against the code before compression was
passed through, the parent of commit d875a62, both gated tests fail: the page gets no extension.
With a backend that does not echo binary messages, the page writes no result and the test fails
after its 10 s bound.)

Only loopback addresses; every wait is bounded; Chromium, the backend and the gate are stopped by
their PID.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    CHROMIUM_FLAGS,
    INSTALL_HINT,
    LOOPBACK,
    NODE_FIXTURES,
    Process,
    free_port,
    node_command,
    start_process,
    start_route_gate,
)

DEFLATE_SERVER = NODE_FIXTURES / "deflate_server.js"

TEXT = "h\u00e9llo \u20ac"  # "héllo €"
LARGE_REPEAT = 2048  # the large text is TEXT + " " repeated this often (16 KiB of UTF-16)

# Bounds of the waits in this module.
_BROWSER_START = 20.0  # Chromium writes its DevTools port
_PAGE_RESULT = 10.0  # the page has written its result
_CDP_REPLY = 5.0  # one DevTools command answered
_POLL = 0.1

PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>pending</title></head>
<body>
<pre id="result">pending</pre>
<script>
"use strict";
const TEXT = "h\\u00e9llo \\u20ac";
const LARGE = (TEXT + " ").repeat(%(repeat)d);
const BYTES = new Uint8Array(256);
for (let i = 0; i < 256; i++) BYTES[i] = i;
let finished = false;
function finish(result) {
  if (finished) return;
  finished = true;
  document.getElementById("result").textContent = JSON.stringify(result);
  document.title = "done";
}
function describe(data) {
  return typeof data === "string"
    ? {type: "text", text: data}
    : {type: "binary", bytes: Array.from(new Uint8Array(data))};
}
const ws = new WebSocket(%(url)s);
ws.binaryType = "arraybuffer";
const received = [];
ws.onopen = () => {
  ws.send(TEXT);
  ws.send(BYTES.buffer);
  ws.send(LARGE);
};
ws.onmessage = (event) => {
  received.push(describe(event.data));
  if (received.length < 3) return;
  const [text, binary, large] = received;
  finish({
    extensions: ws.extensions,
    deflate: ws.extensions.split(/[,;]/).map((s) => s.trim()).includes("permessage-deflate"),
    text_ok: text.type === "text" && text.text === TEXT,
    binary_ok: binary.type === "binary" && binary.bytes.length === 256
      && binary.bytes.every((b, i) => b === i),
    large_ok: large.type === "text" && large.text === LARGE,
    large_length: large.type === "text" ? large.text.length : -1,
    text,
    binary,
  });
  ws.close(1000, "done");
};
ws.onerror = () => finish({error: "error event", received: received.length});
ws.onclose = (event) => finish({
  error: "closed before the echoes", code: event.code, reason: event.reason,
  received: received.length,
});
</script>
</body>
</html>
"""


def chromium_command() -> str:
    """The ``chromium`` executable; fail (not skip) when it is missing."""
    path = shutil.which("chromium")
    if path is None:
        raise AssertionError(f"chromium is not installed: {INSTALL_HINT}")
    return path


def serve_page(case: TestCase, html: str) -> str:
    """
    Serve ``html`` at ``/`` from a loopback HTTP server in a thread (stopped at cleanup); its URL.
    """
    body = html.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    case.addCleanup(stop)
    return f"http://{LOOPBACK}:{server.server_address[1]}/"


def remove_profile(profile: Path, timeout: float = 5.0) -> None:
    """
    Remove a Chromium profile directory once Chromium is stopped: its helper processes may still
    write a file or two while they exit, so try again until it is gone, within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        shutil.rmtree(profile, ignore_errors=True)
        if not profile.exists() or time.monotonic() >= deadline:
            return
        time.sleep(_POLL)


class Browser:
    """
    Headless Chromium (flags as in tests/e2e/test_console.py, a fresh profile) opened on ``url``,
    driven over the DevTools protocol on a loopback port Chromium picks itself.
    """

    def __init__(self, case: TestCase, url: str) -> None:
        self.case = case
        self.url = url
        profile = Path(tempfile.mkdtemp(prefix="wsgate-chromium-"))
        case.addCleanup(remove_profile, profile)  # runs after Chromium is stopped (LIFO)
        argv = [
            chromium_command(),
            *CHROMIUM_FLAGS,
            "--no-proxy-server",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            url,
        ]
        self.process: Process = start_process(case, argv)
        self._ids = itertools.count(1)
        self.devtools_port = self._wait_for_devtools(profile / "DevToolsActivePort")
        self.page: ClientConnection = connect(
            self._page_target(), open_timeout=_CDP_REPLY, close_timeout=1, max_size=None
        )
        case.addCleanup(self.page.close)

    def _wait_for_devtools(self, path: Path) -> int:
        deadline = time.monotonic() + _BROWSER_START
        while time.monotonic() < deadline:
            if path.exists():
                lines = path.read_text().splitlines()
                if lines and lines[0].isdigit():
                    return int(lines[0])
            if self.process.returncode is not None:
                break
            time.sleep(_POLL)
        raise AssertionError(
            f"Chromium wrote no DevTools port within {_BROWSER_START}s:\n{self.process.describe()}"
        )

    def _page_target(self) -> str:
        """The DevTools WebSocket URL of the tab showing ``self.url``."""
        deadline = time.monotonic() + _BROWSER_START
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            list_url = f"http://{LOOPBACK}:{self.devtools_port}/json/list"
            with urllib.request.urlopen(list_url, timeout=_CDP_REPLY) as response:
                targets = json.loads(response.read())
            for target in targets:
                if target.get("type") == "page" and target.get("url", "").startswith(self.url):
                    return str(target["webSocketDebuggerUrl"])
            time.sleep(_POLL)
        raise AssertionError(f"no tab on {self.url} within {_BROWSER_START}s: {targets}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page (Runtime.evaluate, by value)."""
        call_id = next(self._ids)
        self.page.send(
            json.dumps(
                {
                    "id": call_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            )
        )
        deadline = time.monotonic() + _CDP_REPLY
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no DevTools answer to {expression!r} in {_CDP_REPLY}s")
            message = json.loads(self.page.recv(timeout=remaining))
            if message.get("id") != call_id:
                continue  # an event
            if "error" in message or "exceptionDetails" in message.get("result", {}):
                raise AssertionError(f"evaluating {expression!r} failed: {message}")
            return message["result"]["result"].get("value")

    def wait_for_result(self, timeout: float = _PAGE_RESULT) -> dict[str, Any]:
        """Poll the page until it has written its JSON result into ``<pre id="result">``."""
        expression = (
            'document.title === "done" ? document.getElementById("result").textContent : null'
        )
        deadline = time.monotonic() + timeout
        while True:
            text = self.evaluate(expression)
            if text is not None:
                result: dict[str, Any] = json.loads(text)
                return result
            if time.monotonic() >= deadline:
                dom = self.evaluate("document.documentElement.outerHTML")
                raise AssertionError(
                    f"the page wrote no result within {timeout}s; DOM:\n{str(dom)[:2000]}\n"
                    f"{self.process.describe()}"
                )
            time.sleep(_POLL)


def start_deflate_backend(case: TestCase) -> Process:
    """tests/fixtures/node/deflate_server.js on a free loopback port (``process.port``)."""
    if not (NODE_FIXTURES / "node_modules" / "ws").is_dir():
        raise AssertionError(f"the ws package is missing from {NODE_FIXTURES}: {INSTALL_HINT}")
    port = free_port()
    argv = [node_command(), str(DEFLATE_SERVER), str(port)]
    process = start_process(case, argv, ready_port=port, cwd=NODE_FIXTURES)
    process.wait_for_output("Server started")
    return process


class BrowserDeflateTests(TestCase):
    """Chromium's own WebSocket through a gate whose route has ``mode = "message"``."""

    mode: str | None = "message"

    def test_chromium_echo_with_deflate(self) -> None:
        """
        The page gets permessage-deflate from the backend through the gate, and its text
        ("héllo €"), binary (bytes 0..255) and large compressible text messages come back exactly,
        each with its type; the backend negotiated permessage-deflate and saw the page's Close 1000.
        """
        backend = start_deflate_backend(self)
        assert backend.port is not None
        if self.mode is None:
            port, via = backend.port, "direct"
        else:
            gate = start_route_gate(self, f"ws://{LOOPBACK}:{backend.port}", self.mode)
            assert gate.port is not None
            port, via = gate.port, f"gate, {self.mode} mode"
        page = PAGE % {"url": json.dumps(f"ws://{LOOPBACK}:{port}/"), "repeat": LARGE_REPEAT}
        started = time.monotonic()
        browser = Browser(self, serve_page(self, page))
        result = browser.wait_for_result()
        elapsed = time.monotonic() - started
        print(f"chromium ({via}): {elapsed:.2f}s, extensions={result.get('extensions')!r}")

        self.assertNotIn("error", result, result)
        self.assertIn("permessage-deflate", result["extensions"], result)
        self.assertTrue(result["deflate"], result)
        self.assertEqual(result["text"], {"type": "text", "text": TEXT})
        self.assertEqual(result["binary"], {"type": "binary", "bytes": list(range(256))})
        self.assertTrue(result["text_ok"], result)
        self.assertTrue(result["binary_ok"], result)
        self.assertEqual(result["large_length"], (len(TEXT) + 1) * LARGE_REPEAT)
        self.assertTrue(result["large_ok"], {k: result[k] for k in ("large_ok", "large_length")})
        # The far end: the backend negotiated permessage-deflate with the browser's offer (passed
        # through by the gate) and got the page's Close 1000 "done".
        backend.wait_for_output('Client connected: extensions="permessage-deflate')
        backend.wait_for_output("Client disconnected: 1000 done")


class TunnelBrowserDeflateTests(BrowserDeflateTests):
    """The same page through a gate whose route has ``mode = "tunnel"``."""

    mode = "tunnel"


class DirectBrowserDeflateTests(BrowserDeflateTests):
    """The same page straight to the backend: the check of the harness (no gate involved)."""

    mode = None

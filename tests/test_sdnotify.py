"""
systemd's readiness protocol (``Type=notify``): the datagrams of :mod:`wsgate.process.sdnotify` read from
a real AF_UNIX datagram socket (a path in a temporary directory, or an abstract name), and real
gate processes (``wsgate run``, one process and ``workers = 2``) started with ``NOTIFY_SOCKET``
set, as systemd starts them: ``READY=1`` once listening, ``RELOADING=1``/``READY=1`` around a
SIGHUP reload, ``STOPPING=1`` on SIGTERM, every datagram from the main process (systemd's default
``NotifyAccess=main`` drops the others).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from websockets.sync.client import connect

from tests.procs import LOOPBACK, Process, free_ports, start_node_backend, start_process
from wsgate.process.sdnotify import Listening, Notifier, send, take_address

_RECV_TIMEOUT = 20.0


class NotifySocket:
    """
    What systemd listens on: an AF_UNIX datagram socket with SO_PASSCRED, so each datagram comes
    with its sender's pid.  ``address`` is what goes in ``NOTIFY_SOCKET``.
    """

    def __init__(self, case: SynchronousTestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.sock.close)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"wsgate-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="wsgate-notify-")
            case.addCleanup(shutil.rmtree, directory, True)
            self.address = os.path.join(directory, "notify")
            self.sock.bind(self.address)

    def receive(self, timeout: float = _RECV_TIMEOUT) -> tuple[int, dict[str, str]]:
        """The next datagram within ``timeout`` seconds: sender pid and its ``KEY=VALUE`` fields."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no datagram on {self.address} within {timeout}s") from None
        pid = -1
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", value[:12])[0]
        lines = data.decode("utf-8").split("\n")
        return pid, dict(line.split("=", 1) for line in lines)

    def nothing_within(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        return False


class SendTests(SynchronousTestCase):
    def test_path(self) -> None:
        """A datagram of newline-separated fields reaches a socket named by its path."""
        listener = NotifySocket(self)
        send(listener.address, ["READY=1", "STATUS=listening on tcp:8020"])
        pid, fields = listener.receive(5)
        self.assertEqual(pid, os.getpid())
        self.assertEqual(fields, {"READY": "1", "STATUS": "listening on tcp:8020"})

    def test_abstract(self) -> None:
        """An address starting with '@' is a name in the abstract namespace."""
        listener = NotifySocket(self, abstract=True)
        self.assertTrue(listener.address.startswith("@"))
        send(listener.address, ["STOPPING=1"])
        self.assertEqual(listener.receive(5)[1], {"STOPPING": "1"})

    def test_take_address(self) -> None:
        """NOTIFY_SOCKET is taken out of the environment (children must not inherit it)."""
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}
        self.assertEqual(take_address(environ), "/run/systemd/notify")
        self.assertEqual(environ, {"PATH": "/bin"})
        self.assertIsNone(take_address(environ))
        self.assertIsNone(take_address({"NOTIFY_SOCKET": ""}))

    def test_failure_logged_not_raised(self) -> None:
        """A socket that is not there: the notifier logs a warning and the gate goes on."""
        events: list[dict[str, object]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        missing = os.path.join(self.mktemp(), "absent")
        Notifier(missing)("READY=1")
        [event] = [
            e for e in events if e.get("log_namespace") == "wsgate.process.sdnotify.Notifier"
        ]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["address"], missing)
        Notifier(None)("READY=1")  # no systemd: nothing to do


class ListeningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.listener = NotifySocket(self)
        self.listening = Listening(Notifier(self.listener.address), "listening on tcp:8020")

    def test_edges(self) -> None:
        """starting -> listening (READY=1 with a STATUS) -> stopping (STOPPING=1)."""
        self.assertEqual(self.listening.state, "starting")
        self.listening.startService()
        self.assertEqual(self.listening.state, "listening")
        self.assertEqual(
            self.listener.receive(5)[1], {"READY": "1", "STATUS": "listening on tcp:8020"}
        )
        self.listening.stopService()
        self.assertEqual(self.listening.state, "stopping")
        self.assertEqual(self.listener.receive(5)[1]["STOPPING"], "1")

    def test_reloading(self) -> None:
        """
        A wrapped reload is announced with RELOADING=1 and MONOTONIC_USEC (CLOCK_MONOTONIC, as
        systemd wants it) and followed by READY=1, even when the new config is refused.
        """
        before = time.monotonic_ns() // 1000
        reload = self.listening.reloading(lambda: ["changed"])
        self.assertEqual(reload(), ["changed"])
        fields = self.listener.receive(5)[1]
        self.assertEqual(fields["RELOADING"], "1")
        self.assertTrue(before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000)
        self.assertEqual(self.listener.receive(5)[1]["READY"], "1")

        def refused() -> list[str]:
            raise ValueError("bad config")

        self.assertRaises(ValueError, self.listening.reloading(refused))
        self.assertEqual(self.listener.receive(5)[1]["RELOADING"], "1")
        self.assertEqual(self.listener.receive(5)[1]["READY"], "1")


def _config(gate_port: int, admin_port: int, backend_port: int, workers: int = 1) -> str:
    return (
        f"workers = {workers}\n"
        f'[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
        '[[route]]\npath = "/"\nupstream = "echo"\n'
        f'[upstream.echo]\nservers = [{{ url = "ws://{LOOPBACK}:{backend_port}" }}]\n'
        f'[admin]\nendpoint = "tcp:{admin_port}:interface={LOOPBACK}"\n'
    )


def wait_exit(process: Process, timeout: float = 15.0) -> int | None:
    """Wait (bounded) for a process told to stop to end by itself; its status, None if it did not."""
    deadline = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.returncode


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
        wsgate = Path(sys.executable).with_name("wsgate")
        argv = [str(wsgate), "run", "--config", str(path.resolve())]
        return start_process(self, argv, env=env), path

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
        gate, path = self.start(listener, _config(gate_port, admin_port, backend.port))
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

        os.kill(gate.pid, signal.SIGTERM)
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["STOPPING"]), (gate.pid, "1"))
        self.assertEqual(wait_exit(gate), -signal.SIGTERM, gate.describe())
        self.assertTrue(listener.nothing_within(0.2))

    def test_workers(self) -> None:
        """
        With workers = 2 only the parent speaks (abstract socket name here), and the workers'
        environment has no NOTIFY_SOCKET.
        """
        listener = NotifySocket(self, abstract=True)
        gate_port, admin_port = free_ports(2)
        backend = start_node_backend(self)
        assert backend.port is not None
        gate, _ = self.start(listener, _config(gate_port, admin_port, backend.port, workers=2))
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
        os.kill(gate.pid, signal.SIGTERM)
        pid, fields = listener.receive()
        self.assertEqual((pid, fields["STOPPING"]), (gate.pid, "1"))
        self.assertEqual(wait_exit(gate), -signal.SIGTERM, gate.describe())
        self.assertTrue(listener.nothing_within(0.2))

"""
External processes for the end-to-end tests: the gateway under twistd, the Node.js echo backend and
wscat, all on loopback.

This module owns starting, watching and stopping processes that a test started itself. It must not
touch any other process: every process is stopped by the PID recorded when it was started (SIGTERM,
then SIGKILL after a bounded wait), through ``case.addCleanup`` so that it happens even when the test
fails. Every wait is bounded in time. A missing external peer (node, wscat) is a test failure, never a
skip: CI installs them with ``scripts/install-test-deps.sh``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pexpect
from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed

__all__ = [
    "CHROMIUM_FLAGS",
    "LOOPBACK",
    "NODE_FIXTURES",
    "REPO",
    "Process",
    "free_port",
    "free_ports",
    "node_command",
    "start_configured_gate",
    "start_gate",
    "start_node_backend",
    "start_process",
    "start_route_gate",
    "read_until",
    "terminate_gate",
    "spawn_wscat",
    "start_redis",
    "wait_for_port",
    "wscat_command",
    "NotifySocket",
    "wait_exit",
]

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
NODE_FIXTURES = REPO / "tests" / "fixtures" / "node"
INSTALL_HINT = "run scripts/install-test-deps.sh (as root) to install the end-to-end test peers"

# Bounds for every wait in this module.
_POLL_INTERVAL = 0.05
_CONNECT_TIMEOUT = 0.5
_STOP_TIMEOUT = 5.0
_LOG_TAIL = 4000


class _Case(Protocol):
    """The part of a test case the helpers need: somewhere to register cleanups."""

    def addCleanup(self, function: Callable[..., object], /, *args: object) -> None: ...


class Process:
    """
    A process started by a test, with its stdout and stderr captured in files of its own log
    directory. ``port`` is the port it was waited on, if any.
    """

    def __init__(self, argv: Sequence[str], popen: subprocess.Popen[bytes], log_dir: Path) -> None:
        self.argv = list(argv)
        self.pid = popen.pid
        self.port: int | None = None
        self.log_dir = log_dir
        self.stdout_path = log_dir / "stdout"
        self.stderr_path = log_dir / "stderr"
        self._popen = popen

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} argv={self.argv!r}>"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended, else None."""
        return self._popen.poll()

    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        """Command, status and the tail of both streams, for failure messages."""
        status = "running" if self.returncode is None else f"exited with {self.returncode}"
        return (
            f"{' '.join(self.argv)} (pid {self.pid}, {status})\n"
            f"--- stdout (tail) ---\n{self.stdout()[-_LOG_TAIL:]}\n"
            f"--- stderr (tail) ---\n{self.stderr()[-_LOG_TAIL:]}"
        )

    def wait_for_output(self, text: str, timeout: float = 5.0) -> str:
        """
        Wait until ``text`` appears in stdout; return the whole stdout. Raise AssertionError after
        ``timeout`` seconds or as soon as the process has ended without printing it.
        """
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / _POLL_INTERVAL) + 1):
            output = self.stdout()
            if text in output:
                return output
            if self.returncode is not None or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_INTERVAL)
        output = self.stdout()
        if text in output:
            return output
        raise AssertionError(f"{text!r} not in stdout after {timeout}s:\n{self.describe()}")

    def stop(self, timeout: float = _STOP_TIMEOUT) -> int:
        """
        Stop the process by its PID: SIGTERM, then SIGKILL if it has not ended after ``timeout``
        seconds. Idempotent; returns the exit status.
        """
        if self._popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._popen.wait(timeout)
        return self._popen.returncode

    def _signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (bound to port 0, then released)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: all sockets stay bound until every port is chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, process: Process | None = None
) -> None:
    """
    Poll-connect ``host:port`` until it accepts a TCP connection. Raise AssertionError after
    ``timeout`` seconds, or at once if ``process`` (the one supposed to listen) has ended.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    for _ in range(int(timeout / _POLL_INTERVAL) + 1):
        try:
            with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT):
                return
        except OSError as e:
            last_error = e
        if process is not None and process.returncode is not None:
            raise AssertionError(
                f"process ended before listening on {host}:{port}:\n{process.describe()}"
            )
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL_INTERVAL)
    detail = f"\n{process.describe()}" if process is not None else ""
    raise AssertionError(
        f"nothing accepted on {host}:{port} within {timeout}s ({last_error}){detail}"
    )


def start_process(
    case: _Case,
    argv: Sequence[str],
    *,
    ready_port: int | None = None,
    timeout: float = 10.0,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """
    Start ``argv`` with stdin closed and its output captured under a fresh temporary directory;
    ``case.addCleanup`` stops it and removes the directory. With ``ready_port``, return only once
    the process accepts connections on that loopback port (within ``timeout`` seconds).

    Under pytest, cleanup prints the process's output, which pytest shows for a failed test only.
    """
    log_dir = Path(tempfile.mkdtemp(prefix="wsgate-e2e-"))
    case.addCleanup(shutil.rmtree, log_dir, True)
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    process = Process(argv, popen, log_dir)
    case.addCleanup(_stop_and_report, process)
    if ready_port is not None:
        wait_for_port(LOOPBACK, ready_port, timeout, process)
        process.port = ready_port
    return process


def _stop_and_report(process: Process) -> None:
    process.stop()
    if "PYTEST_CURRENT_TEST" in os.environ:
        print(process.describe())


def node_command() -> str:
    """The ``node`` executable; fail (not skip) when it is missing."""
    node = shutil.which("node")
    if node is None:
        raise AssertionError(f"node is not installed: {INSTALL_HINT}")
    return node


def wscat_command() -> str:
    """The fixtures' ``wscat`` executable; fail (not skip) when it is missing."""
    node_command()
    wscat = NODE_FIXTURES / "node_modules" / ".bin" / "wscat"
    if not os.access(wscat, os.X_OK):
        raise AssertionError(f"{wscat} is missing: {INSTALL_HINT}")
    return str(wscat)


def start_node_backend(
    case: _Case, port: int | None = None, name: str | None = None, timeout: float = 10.0
) -> Process:
    """
    Start ``tests/fixtures/node/server.js`` on ``port`` (a free one by default), named ``name``
    (answered to ``__name__``), and wait until it accepts connections and printed "Server started".
    """
    if not (NODE_FIXTURES / "node_modules" / "ws").is_dir():
        raise AssertionError(f"the ws package is missing from {NODE_FIXTURES}: {INSTALL_HINT}")
    if port is None:
        port = free_port()
    argv = [node_command(), str(NODE_FIXTURES / "server.js"), str(port)]
    if name is not None:
        argv.append(name)
    process = start_process(case, argv, ready_port=port, timeout=timeout, cwd=NODE_FIXTURES)
    process.wait_for_output("Server started", timeout)
    return process


def start_gate(case: _Case, *args: str, timeout: float = 10.0) -> Process:
    """
    Run ``twistd -n --pidfile= wsgate ARGS`` from this checkout and wait until it accepts
    connections. Unless ``ARGS`` has a ``--listen``, the gate listens on a free loopback port;
    ``process.port`` is that port either way (for ``--listen`` given, the first ``tcp:PORT`` one).
    """
    args_list = list(args)
    if "--listen" in args_list:
        endpoint = args_list[args_list.index("--listen") + 1]
        port = _tcp_port(endpoint)
    else:
        port = free_port()
        args_list[:0] = ["--listen", f"tcp:{port}:interface={LOOPBACK}"]
    twistd = str(Path(sys.executable).with_name("twistd"))
    if not os.access(twistd, os.X_OK):
        twistd = shutil.which("twistd") or twistd
    argv = [twistd, "-n", "--pidfile=", "wsgate", *args_list]
    # Run this checkout: its twisted/plugins dir and wsgate package come first on the path.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return start_process(case, argv, ready_port=port, timeout=timeout, cwd=REPO, env=env)


def start_configured_gate(
    case: _Case, config_path: str | os.PathLike[str], port: int, *twistd_options: str
) -> Process:
    """
    Run ``twistd -n --pidfile= [TWISTD_OPTIONS] wsgate --config PATH`` from this checkout and
    wait until it accepts connections on ``port`` (a listener of the config).
    """
    twistd = str(Path(sys.executable).with_name("twistd"))
    argv = [twistd, "-n", "--pidfile=", *twistd_options, "wsgate", "--config", str(config_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return start_process(case, argv, ready_port=port, cwd=REPO, env=env)


def start_route_gate(
    case: _Case, backend_url: str, mode: str = "message", route_extra: str = ""
) -> Process:
    """
    Run the gate from a config file in a fresh temporary directory: one loopback listener on a
    free port (``process.port``), one route ``/`` in ``mode`` (plus the ``route_extra`` lines) to
    one upstream with the single server ``backend_url``.
    """
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="wsgate-route-"))
    case.addCleanup(shutil.rmtree, directory, True)
    config = directory / "wsgate.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n\n'
        f'[[route]]\nupstream = "u"\nmode = "{mode}"\n{route_extra}\n\n'
        f'[upstream.u]\nservers = [{{ url = "{backend_url}" }}]\n'
    )
    gate = start_configured_gate(case, config, port)
    gate.port = port
    return gate


def start_redis(case: _Case, port: int, directory: Path) -> Process:
    """
    Debian's ``redis-server`` on ``127.0.0.1:port``, nothing persisted (``--save ''
    --appendonly no``), working in ``directory``; never the system service.
    """
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(server, os.X_OK):
        raise AssertionError(f"redis-server is not installed: {INSTALL_HINT}")
    argv = [
        server,
        "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
        "--dir", str(directory), "--daemonize", "no", "--protected-mode", "yes",
    ]  # fmt: skip
    return start_process(case, argv, ready_port=port)


# Headless Chromium as root on a machine without a network: no sandbox, GPU, QUIC, first-run or
# background requests (each would be refused, many at a time), a profile of the test's own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived or the peer closes; what was read."""
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def terminate_gate(
    case: Any,
    gate: Process,
    clients: Sequence[Any],
    timeout: float = 10.0,
    exit_timeout: float = 10.0,
) -> str:
    """
    SIGTERM a gate: every one of ``clients`` (websockets connections) must get Close 1001
    "gateway shutting down" within ``timeout``, and the gate must exit within ``exit_timeout``
    with twistd's status for an orderly SIGTERM (it re-raises the signal once shutdown is
    complete).  Returns its stdout.
    """
    os.kill(gate.pid, signal.SIGTERM)
    for ws in clients:
        with case.assertRaises(ConnectionClosed):
            ws.recv(timeout=timeout)
        case.assertEqual((ws.close_code, ws.close_reason), (1001, "gateway shutting down"))
    deadline = time.monotonic() + exit_timeout
    while gate.returncode is None and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
    case.assertEqual(gate.returncode, -signal.SIGTERM, gate.describe())
    return gate.stdout()


def _tcp_port(endpoint: str) -> int:
    kind, _, rest = endpoint.partition(":")
    if kind != "tcp":
        raise ValueError(f"start_gate can wait only on a tcp:PORT endpoint, not {endpoint!r}")
    return int(rest.split(":", 1)[0])


def spawn_wscat(case: _Case, url: str, timeout: float = 5.0) -> pexpect.spawn:
    """
    Run the fixtures' real ``wscat --connect URL`` on a pseudo-terminal and wait for it to print
    "Connected". ``timeout`` bounds every later ``expect``; cleanup ends it by its PID.
    """
    child = pexpect.spawn(
        wscat_command(),
        ["--connect", url],
        cwd=str(NODE_FIXTURES),
        timeout=timeout,
        encoding="utf-8",
        codec_errors="replace",
    )
    case.addCleanup(child.close, True)
    child.expect_exact("Connected")
    return child


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


def wait_exit(process: Process, timeout: float = 15.0) -> int | None:
    """Wait (bounded) for a process told to stop to end by itself; its status, None if it did not."""
    deadline = time.monotonic() + timeout
    while process.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.returncode

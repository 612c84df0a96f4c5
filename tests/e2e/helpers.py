"""
Shared pieces of the end-to-end tests: the test cases that start a gate process with its backends
(``GateCase``, ``ConsoleGateCase``), a wss:// backend process, and readings of a process from
``/proc``.  Starting and stopping processes is :mod:`tests.procs`; in-memory builders are
:mod:`tests.helpers`.  Tests import these from here, never from another test module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pexpect
from twisted.conch.ssh import keys
from twisted.trial.unittest import TestCase
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    INSTALL_HINT,
    LOOPBACK,
    REPO,
    Process,
    free_ports,
    start_configured_gate,
    start_process,
)

# A wss:// echo backend: answers "headers" with the upgrade request's headers as JSON and any other
# text with "echo: <text>".  argv: PORT CERT KEY [CLIENT_CA] (with CLIENT_CA: mutual TLS required).
WSS_BACKEND = r"""
import asyncio, json, ssl, sys
from websockets.asyncio.server import serve
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
if len(sys.argv) > 4:
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(sys.argv[4])
async def handler(ws):
    async for message in ws:
        if message == "headers":
            await ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
        else:
            await ws.send("echo: " + message)
async def main():
    async with serve(handler, "127.0.0.1", port, ssl=context):
        print("Server started", flush=True)
        await asyncio.sleep(120)
asyncio.run(main())
"""


def start_wss_backend(
    case: Any, port: int, cert: str, key: str, client_ca: str | None = None
) -> Any:
    argv = [sys.executable, "-c", WSS_BACKEND, str(port), cert, key]
    if client_ca:
        argv.append(client_ca)
    process = start_process(case, argv, ready_port=port)
    process.wait_for_output("Server started")
    return process


def wss_client(port: int, ca: str, path: str = "/") -> ClientConnection:
    context = ssl.create_default_context(cafile=ca)
    return connect(
        f"wss://{LOOPBACK}:{port}{path}",
        ssl=context,
        server_hostname="localhost",
        # Above the gate's own backend connect timeout (5 s): the gate answers 502/504 first.
        open_timeout=15,
        close_timeout=2,
        proxy=None,
    )


BACKEND = REPO / "tests" / "fixtures" / "ab_backend.py"


ARTIFACTS = REPO / "test-artifacts"


PASSWORD = "correct horse battery staple"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def plain(text: str) -> str:
    return _ANSI.sub("", text).replace("\r", "")


def command_of(name: str) -> str:
    """An external program the tests drive; fail (not skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: {INSTALL_HINT}")
    return path


class ConsoleGateCase(TestCase):
    """A gate process with the console and admin listener, in front of two echo backends."""

    # Top-level config keys before the tables (``workers = 2``).
    top_config = ""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-console-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.key = self.dir / "id_ops"
        self.other_key = self.dir / "id_stranger"
        for key, comment in ((self.key, "ops@test"), (self.other_key, "stranger@test")):
            subprocess.run(
                [
                    command_of("ssh-keygen"),
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    comment,
                    "-f",
                    key,
                ],
                check=True,
                timeout=30,
            )
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        (self.dir / "users").write_text(f"ann:{hashed}\n")
        ports = free_ports(5)
        self.gate_port, self.ssh_port, self.admin_port, a, b = ports
        self.backends = [f"ws://{LOOPBACK}:{a}", f"ws://{LOOPBACK}:{b}"]
        for port in (a, b):
            start_process(self, [sys.executable, str(BACKEND), str(port), "echo"], ready_port=port)
        self.config = self.dir / "gate.toml"
        self.config.write_text(
            self.top_config
            + f'[[listen]]\nendpoint = "tcp:{self.gate_port}:interface={LOOPBACK}"\n'
            '[[route]]\nupstream = "u"\n'
            "[upstream.u]\nservers = ["
            + ", ".join(f'{{ url = "{url}" }}' for url in self.backends)
            + "]\n"
            f'[console]\nendpoint = "tcp:{self.ssh_port}:interface={LOOPBACK}"\n'
            'authorized_keys = "authorized_keys"\nusers = "users"\nhost_key = "host_key"\n'
            f'[admin]\nendpoint = "tcp:{self.admin_port}:interface={LOOPBACK}"\n'
        )
        self.gate = self.start_gate()
        self.known_hosts = self.dir / "known_hosts"

    def start_gate(self) -> Process:
        gate = start_configured_gate(self, self.config, self.gate_port)
        from tests.procs import wait_for_port

        wait_for_port(LOOPBACK, self.ssh_port, 10, gate)
        wait_for_port(LOOPBACK, self.admin_port, 10, gate)
        return gate

    def client(self, path: str = "/") -> ClientConnection:
        ws = connect(f"ws://{LOOPBACK}:{self.gate_port}{path}", open_timeout=5, close_timeout=2)
        self.addCleanup(ws.close)
        return ws

    def status(self) -> dict[str, Any]:
        url = f"http://{LOOPBACK}:{self.admin_port}/status.json"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def ssh(
        self, *options: str, user: str = "ops", key: Path | None = None, strict: bool = False
    ) -> pexpect.spawn:
        argv = [
            "-F",
            "/dev/null",
            "-tt",
            "-p",
            str(self.ssh_port),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            f"StrictHostKeyChecking={'yes' if strict else 'no'}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=5",
        ]
        if key is not None:
            argv += ["-i", str(key)]
        argv += [*options, f"{user}@{LOOPBACK}"]
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        child = pexpect.spawn(
            command_of("ssh"),
            argv,
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            timeout=10,
            dimensions=(50, 200),
        )
        self.addCleanup(child.close, True)
        return child

    def login(self) -> pexpect.spawn:
        child = self.ssh("-o", "BatchMode=yes", key=self.key)
        child.expect_exact(">>> ")
        return child

    def type(self, child: pexpect.spawn, line: str) -> str:
        """Type a line at the console; what it printed before the next prompt."""
        child.sendline(line)
        # The console redraws the input line (prompt included) at every key; the prompt after the
        # command's output is the first one at the start of a line.
        child.expect("\n>>> ")
        return plain(child.before)

    def run_ssh(self, *command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The OpenSSH client without a terminal (BatchMode, the key, the gate's host key
        checked strictly): ``command`` as an exec request, or ``stdin`` piped to the shell."""
        host_key = keys.Key.fromFile(str(self.dir / "host_key")).public().toString("openssh")
        self.known_hosts.write_text(f"[{LOOPBACK}]:{self.ssh_port} {host_key.decode()}\n")
        argv = [command_of("ssh"), "-F", "/dev/null", "-p", str(self.ssh_port)]
        argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        argv += ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5"]
        argv += ["-i", str(self.key), *(["-T"] if stdin is not None else [])]
        argv += [f"ops@{LOOPBACK}", *command]
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        return subprocess.run(
            argv, input=stdin or "", capture_output=True, text=True, timeout=30, env=env
        )

    def session_id(self, ws: ClientConnection) -> Any:
        """The gate's id of the session of this client (found by its address): a number, or
        ``"WORKER:ID"`` with workers."""
        host, port = ws.socket.getsockname()[:2]
        for _ in range(50):
            for row in self.status()["sessions"]:
                if row["client"] == f"{host}:{port}":
                    return row["id"]
            time.sleep(0.1)
        raise AssertionError(f"no session from {host}:{port}")


MiB = 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, expected: int | None = None, timeout: float = 5.0) -> int:
    """The process's open fd count once it stops changing (or reaches ``expected``), bounded in time."""
    last = open_fds(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = open_fds(pid)
        if now == expected or (expected is None and now == last):
            return now
        last = now
    return last


class GateCase(TestCase):
    """Starts an Autobahn backend in ``mode`` and a gate in front of it, from a config file."""

    def start(self, mode: str, route: str = "", extra: str = "", top: str = "") -> None:
        gate_port, backend_port = free_ports(2)
        self.backend_port = backend_port
        self.mode = mode
        self.start_backend()
        config = self.config_path = Path(self.mktemp())
        config.write_text(
            f'{top}\n[[listen]]\nendpoint = "tcp:{gate_port}:interface={LOOPBACK}"\n'
            f'[[route]]\nupstream = "u"\n{route}\n'
            f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{backend_port}" }}]\n{extra}\n'
        )
        self.gate = start_configured_gate(self, config, gate_port)
        self.url = f"ws://{LOOPBACK}:{gate_port}"
        self.gate_port = gate_port

    def start_backend(self) -> None:
        self.backend = start_process(
            self,
            [sys.executable, str(BACKEND), str(self.backend_port), self.mode],
            ready_port=self.backend_port,
        )

"""
The ``wsgate`` command as installed: ``version``, ``check``, and ``run`` started and stopped over
loopback, with its one-line startup failures; and ``twistd wsgate --version``.

Every command runs from a directory outside the checkout with no PYTHONPATH, so what runs is what
``pip install -e .`` (scripts/test.sh) installed: these tests also fail when an install leaves
twistd unable to find the plugin.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import autobahn
import OpenSSL
from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import twisted
import wsgate
from tests.procs import LOOPBACK, REPO, free_ports, start_process, terminate_gate
from wsgate.cli import twistd_arguments
from wsgate.core import frames

_TIMEOUT = 60


def _installed(name: str) -> str:
    """A console script of this virtualenv; fail (not skip) when it was not installed."""
    path = Path(sys.executable).with_name(name)
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is missing: install wsgate with `pip install -e .`")
    return str(path)


class _CommandCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.mkdir(self.cwd)
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env["PYTHONUNBUFFERED"] = "1"

    def command(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
        )

    def wsgate(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.command(_installed("wsgate"), *args)


class VersionTests(_CommandCase):
    def test_version_command(self) -> None:
        """`wsgate version` prints wsgate, Twisted, Autobahn, pyOpenSSL, OpenSSL, Python and which
        UTF-8 check the frame engine uses (CUtf8 when the C twin was built)."""
        result = self.wsgate("version")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual(
            [line for i, line in enumerate(lines) if i != 4],
            [
                f"wsgate {wsgate.__version__}",
                f"Twisted {twisted.__version__}",
                f"Autobahn {autobahn.__version__}",
                f"pyOpenSSL {OpenSSL.__version__}",
                f"Python {platform.python_version()}",
                f"UTF-8 check {frames.UTF8_CHECKS[0].__name__}",
            ],
        )
        self.assertRegex(lines[4], r"^OpenSSL \d+\.\d+\.\d+")

    def test_twistd_plugin_version(self) -> None:
        """The installed twistd finds the plugin; `twistd wsgate --version` is wsgate's."""
        result = self.command(_installed("twistd"), "wsgate", "--version")
        self.assertEqual(
            (result.returncode, result.stdout), (0, f"wsgate {wsgate.__version__}\n"), result
        )

    def test_one_version(self) -> None:
        """The installed distribution's version is wsgate.__version__ (setup.cfg reads it)."""
        self.assertEqual(metadata.version("wsgate"), wsgate.__version__)
        self.assertIn("version = attr: wsgate.__version__", (REPO / "setup.cfg").read_text())


class CheckTests(_CommandCase):
    def test_good_config(self) -> None:
        """`wsgate check etc/wsgate.toml`: ok, exit status 0."""
        result = self.wsgate("check", str(REPO / "etc" / "wsgate.toml"))
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "ok\n", ""))

    def test_bad_config(self) -> None:
        """
        etc/wsgate.toml with a bad port and an unknown key: each problem on a line naming the
        file and the key, exit status 1; `python -m wsgate check` says the same.
        """
        text = (REPO / "etc" / "wsgate.toml").read_text()
        self.assertIn('endpoint = "tcp:8020"\n', text)
        text = text.replace('endpoint = "tcp:8020"\n', 'endpoint = "tcp:99999"\nportt = 1\n', 1)
        path = os.path.join(self.cwd, "wsgate.toml")
        Path(path).write_text(text)
        result = self.wsgate("check", path)
        self.assertEqual(result.returncode, 1)
        problems = result.stdout.splitlines()
        self.assertEqual(len(problems), 2, result.stdout)
        self.assertTrue(problems[0].startswith(f"{path}: listen[0].endpoint: "), problems)
        self.assertTrue(problems[1].startswith(f"{path}: listen[0].portt: "), problems)
        module = self.command(sys.executable, "-m", "wsgate", "check", path)
        self.assertEqual((module.returncode, module.stdout), (1, result.stdout))

    def test_missing_path(self) -> None:
        """`wsgate check` without a path is a usage error (status 2), not a crash."""
        result = self.wsgate("check")
        self.assertEqual(result.returncode, 2)
        self.assertIn(
            "wsgate check: error: the following arguments are required: path", result.stderr
        )


class RunTests(_CommandCase):
    def test_demo_start_and_stop(self) -> None:
        """
        `wsgate run --demo` listens, relays to its echo backend, logs to stdout, and on SIGTERM
        closes its sessions with 1001 and ends by the signal, as twistd does.
        """
        gate_port, demo_port = free_ports(2)
        argv = [_installed("wsgate"), "run", "--demo", "--demo-port", str(demo_port)]
        argv += ["--listen", f"tcp:{gate_port}:interface={LOOPBACK}"]
        gate = start_process(self, argv, ready_port=gate_port, cwd=Path(self.cwd), env=self.env)
        ws = connect(f"ws://{LOOPBACK}:{gate_port}/", open_timeout=10)
        ws.send("Hello")
        self.assertEqual(ws.recv(timeout=10), "Server received from client: Hello")
        log = terminate_gate(self, gate, [ws])
        self.assertIn(f"connect with `wscat --connect ws://127.0.0.1:{gate_port}`", log)
        self.assertIn("Main loop terminated.", log)
        self.assertEqual(gate.stderr(), "")

    def assertStartupFailure(self, result: subprocess.CompletedProcess[str], reason: str) -> None:
        """Exit status 1 and one line `wsgate: REASON...` on stderr: no usage text, no traceback."""
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith(f"wsgate: {reason}"), result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertNotIn("Usage:", result.stdout)

    def test_port_in_use(self) -> None:
        """A busy listening port: `wsgate: Couldn't listen on ...`, exit status 1."""
        demo_port, busy_port = free_ports(2)
        with socket.socket() as busy:
            busy.bind((LOOPBACK, busy_port))
            busy.listen()
            result = self.wsgate(
                "run",
                "--demo",
                "--demo-port",
                str(demo_port),
                "--listen",
                f"tcp:{busy_port}:interface={LOOPBACK}",
            )
        self.assertStartupFailure(result, f"Couldn't listen on {LOOPBACK}:{busy_port}: ")

    def test_bad_config(self) -> None:
        """A config that does not validate: its problems on one line, naming file and key."""
        path = os.path.join(self.cwd, "bad.toml")
        Path(path).write_text('[[listen]]\nendpoint = "tcp:99999"\n')
        result = self.wsgate("run", "--config", path)
        self.assertStartupFailure(result, "invalid configuration: ")
        self.assertRegex(
            result.stderr,
            re.escape(f"{path}: listen[0].endpoint: ") + r".*; " + re.escape(f"{path}: route: "),
        )
        self.assertEqual(result.stdout, "")

    def test_usage_errors(self) -> None:
        """No mode, an unknown option, an unknown user: one line each, exit status 1."""
        for args, reason in [
            ((), "give exactly one of --config, --backend or --demo"),
            (("--demo", "--bogus"), "option --bogus not recognized"),
            (("--uid", "no-such-user-wsgate", "--demo"), "--uid: no user named"),
        ]:
            self.assertStartupFailure(self.wsgate("run", *args), reason)

    def test_twistd_arguments(self) -> None:
        """`wsgate run ARGS` is `twistd --nodaemon --pidfile= [twistd options] wsgate ARGS`."""
        self.assertEqual(
            twistd_arguments(["--demo"], {"--logfile": "gate.log", "--uid": None}),
            ["--nodaemon", "--pidfile=", "--logfile=gate.log", "wsgate", "--demo"],
        )

    def test_sigint(self) -> None:
        """SIGINT (Ctrl-C) stops the gate in order too (1001 to clients), and it ends by SIGINT."""
        gate_port, demo_port = free_ports(2)
        argv = [_installed("wsgate"), "run", "--demo", "--demo-port", str(demo_port)]
        argv += ["--listen", f"tcp:{gate_port}:interface={LOOPBACK}"]
        gate = start_process(self, argv, ready_port=gate_port, cwd=Path(self.cwd), env=self.env)
        # A relayed message: the reactor runs, so its signal handlers are in place.
        ws = connect(f"ws://{LOOPBACK}:{gate_port}/", open_timeout=10)
        ws.send("Hello")
        ws.recv(timeout=10)
        os.kill(gate.pid, signal.SIGINT)
        with self.assertRaises(ConnectionClosed):
            ws.recv(timeout=10)
        self.assertEqual(ws.close_code, 1001)
        deadline = time.monotonic() + 10
        while gate.returncode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(gate.returncode, -signal.SIGINT, gate.describe())
        self.assertIn("Server Shut Down.", gate.stdout())

"""
systemd's readiness protocol (``Type=notify``): the datagrams of :mod:`wsgate.process.sdnotify` read from
a real AF_UNIX datagram socket (a path in a temporary directory, or an abstract name).  Real gate
processes started with ``NOTIFY_SOCKET`` are in ``tests/e2e/test_sdnotify.py``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.procs import NotifySocket
from wsgate.process.sdnotify import Listening, Notifier, send, take_address


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

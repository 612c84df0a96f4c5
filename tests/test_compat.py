"""
The reach-ins of ``wsgate/dataplane/_compat.py`` against the installed Twisted: each fails when an upstream
release changes what it relies on.
"""

from __future__ import annotations

import socket

from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from wsgate.dataplane._compat import dispatch_directly


class _Reader(FileDescriptor):
    def __init__(self, sock: socket.socket, reactor: object, fail: bool = False) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.fail = fail
        self.reads = 0
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(100)
        if self.fail:
            raise ValueError("boom")

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)


class DispatchDirectlyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = epollreactor.EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.left, self.right = socket.socketpair()
        self.addCleanup(self.left.close)
        self.addCleanup(self.right.close)

    def test_ready_connections_are_read(self) -> None:
        """After the patch, one reactor iteration reads each ready connection, once."""
        self.assertTrue(dispatch_directly(self.reactor))
        self.assertIn("doIteration", vars(self.reactor))  # the instance now has its own loop
        reader = _Reader(self.left, self.reactor)
        self.reactor.addReader(reader)
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, 0)  # nothing to read yet
        self.right.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, 1)

    def test_a_failing_read_loses_only_that_connection(self) -> None:
        """An exception in doRead disconnects that connection (Twisted's _doReadOrWrite does it,
        as callWithLogger did not need to) and the loop goes on."""
        dispatch_directly(self.reactor)
        reader = _Reader(self.left, self.reactor, fail=True)
        self.reactor.addReader(reader)
        self.right.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(reader.lost), 1)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_other_reactors_untouched(self) -> None:
        """Only an EPollReactor is changed."""
        self.assertFalse(dispatch_directly(object()))


class QuietPoolTests(SynchronousTestCase):
    def test_connections_not_noisy(self) -> None:
        """The pool's connections are made by a factory class that does not log its start
        and stop (it relies on HTTPConnectionPool._factory)."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import HTTPConnectionPool

        from wsgate.dataplane._compat import quiet_pool

        pool = quiet_pool(MemoryReactorClock())
        self.assertIsInstance(pool, HTTPConnectionPool)
        self.assertFalse(pool._factory.noisy)
        self.assertTrue(HTTPConnectionPool._factory.noisy)  # the class itself is left alone

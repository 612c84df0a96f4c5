"""
The reach-ins of ``wsgate/dataplane/_compat.py`` against the installed Twisted and Autobahn: each fails when an upstream
release changes what it relies on.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.abstract import FileDescriptor
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, make_config
from wsgate.dataplane._compat import dispatch_directly
from wsgate.dataplane.bridge import BackendLeg, ClientLeg


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


class LegSlotsTests(SynchronousTestCase):
    """
    The legs' ``__slots__`` (``AUTOBAHN_STATE`` and its server and client parts) against the
    installed Autobahn.
    """

    def open_session(self) -> Any:
        backend = BackendFactory()
        net = Network(make_config(["ws://a.test:1"]), {"ws://a.test:1": backend})
        client = net.client("/", protocols=["v1"])
        client.proto.sendMessage(b"hi")
        net.flush()
        self.assertEqual(backend.received, [(b"hi", False)])
        return next(iter(net.gateway.sessions.values()))

    def test_every_state_attribute_is_slotted(self) -> None:
        """
        An open session's legs keep in their instance dict only names that are class attributes
        (Twisted's ``transport``, ``factory``...): a new per-connection attribute of Autobahn
        fails here, to be added to the lists.
        """
        session = self.open_session()
        for leg in (session.client, session.backend):
            unslotted = [
                name
                for name in vars(leg)
                if not any(name in vars(cls) for cls in type(leg).__mro__)
            ]
            self.assertEqual(unslotted, [], type(leg).__name__)

    def test_no_slot_hides_a_class_default(self) -> None:
        """A slot named like a class attribute of a base would hide its default (AttributeError
        where the base's value was read before): none is."""
        for leg in (ClientLeg, BackendLeg):
            bases = leg.__mro__[1:]
            hidden = [n for n in leg.__slots__ if any(n in vars(cls) for cls in bases)]
            self.assertEqual(hidden, [], leg.__name__)
            self.assertEqual(len(set(leg.__slots__)), len(leg.__slots__))


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

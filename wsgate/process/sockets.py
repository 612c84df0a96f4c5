"""
The listening sockets the parent binds and its workers share: the parent's side (a factory that
refuses, the address family of a bound port) and the worker's (an endpoint that adopts an
inherited descriptor, and a port that accepts a few connections per wake-up so that idle workers
win the race for a burst).

Must not: decide which sockets to bind (``pool.py`` binds every ``[[listen]]``) or build a gate.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, protocol, tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from wsgate.dataplane._compat import adopt_port

__all__ = ["SharedSocketEndpoint", "RefuseConnections", "address_family"]


# Connections a worker accepts from the shared socket each time it wakes up (see _TakeTurnsPort).
ACCEPTS_PER_WAKEUP = 8


class _TakeTurnsPort(tcp.Port):
    """
    A TCP port that accepts a few connections per wake-up.  Every worker polls the shared socket;
    Twisted's default accepts up to a hundred at once, so one worker would take a whole burst of
    connections while the others get none.  A few at a time, the idle workers win the race.
    Measured with two workers on two cores: 8 per wake-up opened 5,400-5,600 sessions/s (200
    handshakes in flight) against 4,000-4,200 with 1, and spread 64 connections evenly (74 open
    descriptors in each worker; with 1: 88 and 60).
    """

    def doRead(self) -> None:
        self.numberAccepts = ACCEPTS_PER_WAKEUP
        super().doRead()


@implementer(IStreamServerEndpoint)
class SharedSocketEndpoint:
    """A listening socket inherited from the parent (``fd``), shared with the other workers."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: protocol.Factory) -> defer.Deferred:
        try:
            if self.family == socket.AF_UNIX:
                port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
            else:
                port = adopt_port(_TakeTurnsPort, self.reactor, self.fd, self.family, factory)
                port.startListening()
            os.close(self.fd)
        except Exception:  # noqa: BLE001  a Deferred's failure, as endpoints report it
            return defer.fail()
        return defer.succeed(port)


class RefuseConnections(protocol.Factory):
    """The parent never accepts on the shared sockets; should it, the connection is dropped."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


def address_family(address: Any) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot share a listener on {address!r}")

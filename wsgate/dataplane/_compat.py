"""
Reach-ins into Twisted's and Autobahn's private names, each with the reason and a test
(``tests/dataplane/test_compat.py``) that fails when an upstream release changes the assumption.

This module must not hold policy: it only adapts a library object, and says what it relies on.
Every reach-in of the package is here.

Some of them only make the gate faster: the *fast paths* (:func:`lazy_debug_arguments`,
:func:`dispatch_directly`, :func:`read_more`, :func:`write_eagerly`, :func:`read_through`,
:func:`send_data`, :func:`autobahn_receive`, :func:`unwrap_endpoint`).  ``WSGATE_FAST_PATHS=0``
in the gate's environment switches them off, so the gate runs on Twisted's and Autobahn's own code
paths, slower and otherwise the same: a way to tell whether a fault seen after upgrading either
library comes from one of them.  The in-memory test suite runs both ways (``scripts/test.sh``).
The rest are needed either way (the legs' hand-over to the relay, and the cycles cut when a
session ends), only save memory, or only change what is logged.
"""

from __future__ import annotations

import errno
import functools
import os
import pprint
from collections.abc import Callable
from typing import Any

from autobahn import util as autobahn_util
from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.websocket import WebSocketAdapterProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol, WebSocketServerProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, main, tcp
from twisted.internet.epollreactor import EPOLLIN, EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log as legacy_log
from twisted.web.client import HTTPConnectionPool

__all__ = [
    "AUTOBAHN_CLIENT_STATE",
    "AUTOBAHN_SERVER_STATE",
    "AUTOBAHN_STATE",
    "CONNECTION_DONE",
    "CONNECTION_LOST",
    "FAST_PATHS",
    "READ_SIZE",
    "adopt_port",
    "autobahn_receive",
    "dispatch_directly",
    "hand_over",
    "lazy_debug_arguments",
    "no_open_close_futures",
    "plain_read",
    "quiet_pool",
    "raise_listen_errors",
    "read_more",
    "read_through",
    "release_connector",
    "release_leg",
    "send_data",
    "send_fd",
    "unwrap_endpoint",
    "write_eagerly",
]

# Whether the fast paths are on (module docstring); read at each call, so tests can switch it.
FAST_PATHS = os.environ.get("WSGATE_FAST_PATHS", "1") != "0"

# The instance attributes Autobahn's WebSocket protocols (24.4 to 26.x) set on every connection,
# none of them a class attribute anywhere in the protocol's classes.  The legs declare them as
# ``__slots__`` so that a held session's two legs keep them in fixed slots (8 bytes each) instead
# of two instance dicts of about 60 keys (1,584 bytes each): a held session measured 11.2 KiB of
# traced allocations before and 8.9 after (tracemalloc, 1,000 sessions).  A name Autobahn adds
# later lands in the instance dict as before (nothing breaks, the saving shrinks);
# tests/dataplane/test_compat.py fails then, so the list is kept whole.
AUTOBAHN_STATE = (
    "_perMessageCompress",
    "_transport_details",
    "autoPingPending",
    "autoPingPendingCall",
    "autoPingPendingSent",
    "autoPingPendingSeq",
    "autoPingTimeoutCall",
    "closeHandshakeTimeoutCall",
    "closedByMe",
    "current_frame",
    "data",
    "droppedByMe",
    "failedByMe",
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "inside_message",
    "is_closed",
    "is_open",
    "localCloseCode",
    "localCloseReason",
    "openHandshakeTimeoutCall",
    "remoteCloseCode",
    "remoteCloseReason",
    "send_queue",
    "send_state",
    "serverConnectionDropTimeoutCall",
    "state",
    "trackedTimings",
    "trafficStats",
    "triggered",
    "utf8validator",
    "wasClean",
    "wasCloseHandshakeTimeout",
    "wasMaxFramePayloadSizeExceeded",
    "wasMaxMessagePayloadSizeExceeded",
    "wasNotCleanReason",
    "wasOpenHandshakeTimeout",
    "wasServerConnectionDropTimeout",
    "wasServingFlashSocketPolicyFile",
    "websocket_extensions_in_use",
    "websocket_protocol_in_use",
    "websocket_version",
)
# What only the server side (WebSocketServerProtocol) sets: the parsed upgrade request.
AUTOBAHN_SERVER_STATE = (
    "_wskey",
    "http_request_host",
    "http_request_params",
    "http_request_path",
    "http_request_uri",
    "websocket_extensions",
    "websocket_origin",
    "websocket_protocols",
)
# What only the client side (WebSocketClientProtocol) sets.
AUTOBAHN_CLIENT_STATE = ("websocket_key",)


def quiet_pool(reactor: Any) -> HTTPConnectionPool:
    """
    A persistent HTTP connection pool whose connections do not log "Starting factory" and
    "Stopping factory" at info level: two lines per new connection, which forward auth would
    write for every handshake to a service that closes its connections.  Relies on the pool
    making each connection's factory from its ``_factory`` class attribute (Twisted's
    ``_HTTP11ClientFactory``), the only way to set ``noisy`` on it.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = type("QuietHTTP11ClientFactory", (pool._factory,), {"noisy": False})  # type: ignore[assignment]
    return pool


class _Lazy:
    """A debug-log argument, formatted when (if ever) its line is written."""

    __slots__ = ("function", "args")

    def __init__(self, function: Any, *args: Any) -> None:
        self.function = function
        self.args = args

    def __str__(self) -> str:
        return str(self.function(*self.args))


# What Autobahn's protocol modules compute for their debug-log arguments, by the names they import.
_DEBUG_ARGUMENTS = {
    "pformat": pprint.pformat,
    "hltype": autobahn_util.hltype,
    "hlval": autobahn_util.hlval,
}


def lazy_debug_arguments() -> None:
    """
    Autobahn computes its debug-log arguments on every connection even with debug logging off:
    ``pprint.pformat`` of its options and transport details (a quarter of a handshake's CPU),
    and ``hltype``/``hlval`` (the colours of function names and values in the line: 2 %).  In
    its two protocol modules each becomes a :class:`_Lazy`, which formats when (if ever) the line
    is written, the same text.  Relies on those modules importing the three by name and using
    them only in log arguments.
    """
    if not FAST_PATHS:
        return
    for module in (autobahn_protocol, autobahn_twisted):
        for name, function in _DEBUG_ARGUMENTS.items():
            if vars(module).get(name) is function:
                setattr(module, name, functools.partial(_Lazy, function))


def dispatch_directly(reactor: Any) -> bool:
    """
    Make an epoll reactor call each ready connection directly, instead of through
    ``log.callWithLogger``, which pushes and pops a legacy log context (a dict and two
    context-tracker calls) around every read and every write; and, for the commonest event (only
    readable), do what ``_doReadOrWrite`` does for it inline: ``doRead``, logging what it raises,
    then ``_disconnectSelectable`` if it returned a reason.  Every other event goes through
    ``_doReadOrWrite`` itself.  Nothing is lost but the legacy log prefix, which wsgate does not
    use.  Measured with 64 connections of 64 B messages on one core (bench/build/wsload, gate on
    core 1): 40-49k -> 53-64k msg/s, and 1 KiB x 8 in flight: 206-324k -> 342-365k msg/s
    (callWithLogger alone).

    Relies on EPollReactor's ``_poller``, ``_selectables``, ``_doReadOrWrite`` and
    ``_disconnectSelectable`` and on what ``_doReadOrWrite`` does with a read event (Twisted 26:
    ``fileno() == -1`` means ``_NO_FILEDESC``; a reason from ``doRead`` disconnects with
    ``inRead`` True, an exception with it False), and on ``mainLoop`` calling
    ``self.doIteration``.  Returns False (and changes nothing) for any other reactor, or with the
    fast paths off.
    """
    if not FAST_PATHS or type(reactor) is not EPollReactor:
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    ready = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    error = legacy_log.err

    def doPoll(timeout: float | None) -> None:
        try:
            events = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:  # removed by an earlier event of this round
                continue
            if event != EPOLLIN:
                ready(selectable, fd, event)
                continue
            reading = False
            why: BaseException | None
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    why = selectable.doRead()
                    reading = True
            except BaseException as e:
                why = e
                error()
            if why:
                disconnect(selectable, why, reading)

    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


# -- the legs: Autobahn until both 101s, the relay afterwards ------------------------------------


def autobahn_receive(leg: Any, data: bytes) -> None:
    """
    Autobahn's own reading of a connection's bytes (``_dataReceived``), which its
    ``dataReceived`` wraps with per-read debug-log arguments the gate does not want to pay for.
    """
    if FAST_PATHS:
        WebSocketProtocol._dataReceived(leg, data)
    else:
        WebSocketAdapterProtocol.dataReceived(leg, data)


# Twisted reads at most this much from a TCP connection at a time (``Connection.bufferSize``).
READ_SIZE = tcp.Connection.bufferSize
_LARGE_READ_SIZE = 4 * READ_SIZE


def read_more(transport: Any) -> None:
    """
    Let a TCP connection whose last read filled Twisted's 64 KiB buffer read 256 KiB at a time: it
    carries large messages, and fewer, larger reads relay them faster (64 KiB messages on one
    core: tunnel mode 990 -> 1,760 MB/s, message mode 360 -> 470 MB/s).  Only then, because
    ``recv`` allocates the whole buffer on every call, which small messages would pay for.
    Relies on ``doRead`` reading ``self.bufferSize`` bytes on each call.
    """
    if (
        FAST_PATHS
        and isinstance(transport, tcp.Connection)
        and transport.bufferSize < _LARGE_READ_SIZE
    ):
        transport.bufferSize = _LARGE_READ_SIZE


class _EagerWrite(tcp.Connection):
    """What :func:`write_eagerly` mixes into a TCP connection's class: its ``write``."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        if send_fd(self) < 0:
            # Gone (its socket too: Twisted drops nothing silently there), or queued bytes to
            # keep the order behind: Twisted's own write.
            super().write(data)
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the queued write will report as connection loss
        if sent < len(data):
            super().write(data[sent:])


def send_fd(transport: Any) -> int:
    """
    The socket bytes may go to at once, bypassing Twisted's queue (:class:`_EagerWrite`'s
    ``write``, :meth:`Relay.read`): a TCP transport with :func:`write_eagerly`'s ``write`` that is
    connected, still writing (Twisted drops writes after ``loseWriteConnection``) and has nothing
    queued; -1 otherwise.
    """
    if (
        isinstance(transport, _EagerWrite)
        and transport.connected
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        return transport.socket.fileno()  # type: ignore[no-any-return]
    return -1


_EAGER_CLASSES: dict[type, type] = {}


def write_eagerly(transport: Any) -> None:
    """
    Make a plain TCP transport send at once when nothing is queued, instead of queueing every
    write and asking epoll to wake it when the socket is writable: for small relayed messages the
    send buffer is nearly always empty, and Twisted's queue-then-wait costs two ``epoll_ctl`` calls
    and a loop pass per write.  Whatever the socket does not take at once is queued the usual way,
    so buffering, backpressure (producer pausing) and error handling stay Twisted's.

    Measured (64 B echo, 64 connections, gate on one core): tunnel mode 33.5k -> 52k msg/s with
    it.  Both modes write once per read now (the frame engine's output), so both use it.  Each
    leg takes it in ``connectionMade``, so that the handshake's writes (the upgrade request, the
    101) go at once too: 14 -> 10 ``epoll_ctl`` calls per session (``perf stat`` of the gate
    over 5,000 handshakes).  The transport's class becomes a subclass of its own with
    :class:`_EagerWrite`'s ``write`` (one per class, made once), so that a held connection
    carries nothing more (a closure per transport cost 216 bytes and a reference cycle).  Relies on FileDescriptor's ``connected`` and
    queue (``_tempDataLen``, ``offset``, ``dataBuffer``), on ``socket`` while connected (Twisted
    deletes it when the connection is lost), and on a Twisted connection class taking a subclass
    of itself as its ``__class__``.
    """
    if not FAST_PATHS or not isinstance(transport, tcp.Connection):
        return  # TLS and other transports keep their own write path
    cls = type(transport)
    if issubclass(cls, _EagerWrite):
        return
    eager = _EAGER_CLASSES.get(cls)
    if eager is None:
        eager = _EAGER_CLASSES[cls] = type(cls.__name__, (_EagerWrite, cls), {"__slots__": ()})
    transport.__class__ = eager


CONNECTION_DONE = main.CONNECTION_DONE
CONNECTION_LOST = main.CONNECTION_LOST


def plain_read(transport: Any) -> BaseException | None:
    """Twisted's own ``doRead`` of ``transport``, whatever :func:`read_through` put in its place."""
    return type(transport).doRead(transport)  # type: ignore[no-any-return]


def read_through(transport: Any, read: Callable[[], BaseException | None]) -> None:
    """
    Make ``read`` (a relay's :meth:`~wsgate.dataplane.relay.Relay.read`) the ``doRead`` of a
    plain TCP transport, which the reactor calls when the socket is readable: an instance
    attribute, found before the class's method, removed by :func:`release_leg`.  Relies on the
    reactor calling ``doRead`` by attribute and on ``doRead``'s return value (None, or the reason
    the connection is over).  TLS and other transports keep reading the usual way.
    """
    if FAST_PATHS and isinstance(transport, tcp.Connection):
        transport.doRead = read  # type: ignore[method-assign, assignment]


def unwrap_endpoint(transport: Any, leg: Any) -> None:
    """
    A backend connection made through a Twisted client endpoint (``TCP4ClientEndpoint`` and the
    like) reaches its protocol through the endpoint's ``_WrappingProtocol``, which keeps the
    fired connect Deferred, and its connector keeps the endpoint's ``_WrappingFactory``.  Once
    relaying, the connection talks to ``leg`` directly and the connector to the leg's factory
    (the session's ``_BackendRequest``): one call less per read from the backend and about 450
    bytes less per held session.  Relies on ``_WrappingProtocol._wrappedProtocol``, the
    connection's ``protocol`` and ``connector`` attributes, and the connector calling only
    ``clientConnectionLost`` and ``doStop`` on its factory once connected.  TLS connections
    (another wrapper, the TLS protocol) are left as they are.
    """
    wrapper = getattr(transport, "protocol", None)
    if not FAST_PATHS or type(wrapper) is not endpoints._WrappingProtocol:
        return
    if wrapper._wrappedProtocol is not leg:
        return
    transport.protocol = leg
    connector = getattr(transport, "connector", None)
    if connector is not None:
        connector.factory = leg.factory


def send_data(leg: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
    """
    The legs' ``sendData``: Autobahn's, minus the debug-log arguments and traffic statistics it
    computes on every write even with debug logging off (the gate keeps its own counters).
    Queued writes (sync, chopped) keep Autobahn's path.  Relies on Autobahn's ``send_queue``.
    """
    if sync or chopsize or leg.send_queue or not FAST_PATHS:
        WebSocketProtocol.sendData(leg, data, sync, chopsize)
    else:
        leg.transport.write(data)


class _Unwatched:
    """A Deferred nobody waits for, already fired: ``txaio.resolve`` calls its ``callback``."""

    __slots__ = ()
    called = True

    def callback(self, result: object) -> None:
        pass


_UNWATCHED = _Unwatched()


def no_open_close_futures(leg: Any) -> None:
    """
    Replace the ``is_open`` and ``is_closed`` Deferreds Autobahn makes for every connection (in
    ``_connectionMade``) by one shared stand-in: only Autobahn's client agent waits on them, the
    legs never do, and a held session kept four of them (512 bytes), ``is_closed`` in a cycle
    with its leg.  Relies on Autobahn touching them only through ``txaio.resolve``.
    """
    leg.is_open = leg.is_closed = _UNWATCHED


def hand_over(leg: Any, receive: Any) -> None:
    """
    From both 101s on, ``receive`` (a relay's ``dataReceived``) reads the leg's bytes: an
    instance attribute, which the transport's ``protocol.dataReceived`` finds first.  Autobahn
    neither decodes, sends nor fires events on the leg any more, so its handshake buffers,
    message state and observer tables (``_results``, ``_valid_events``: txaio's ObservableMixin)
    are freed: a few KiB a session; and the negotiated extensions' and offered subprotocols' lists
    become an empty tuple (four lists a session fewer for the cycle collector to visit).
    """
    leg.dataReceived = receive
    empty: Any = ()  # Autobahn annotates them as lists; nothing iterates them any more
    leg.websocket_extensions_in_use = empty
    if isinstance(leg, WebSocketServerProtocol):  # what it parsed of the request
        leg.websocket_extensions = leg.websocket_protocols = empty
    leg.http_request_data = leg.http_response_data = None
    leg.utf8validator = leg.trafficStats = leg.send_queue = None
    leg._results = leg._valid_events = leg._transport_details = None
    leg._perMessageCompress = None


def release_leg(leg: Any) -> None:
    """
    Break the cycles a finished leg is in: the relay's bound methods (:func:`hand_over`,
    :func:`read_through`).
    """
    leg.__dict__.pop("dataReceived", None)
    getattr(getattr(leg, "transport", None), "__dict__", {}).pop("doRead", None)


def release_connector(transport: Any) -> None:
    """
    Twisted's client ``Connector`` and its connection refer to each other (the connection's
    ``connector``; the connector's ``transport`` and ``factory``) until the connector is
    garbage-collected: cut them once the backend connection is over.  Under TLS, the TCP
    transport is the TLS one's ``transport``.
    """
    transport = getattr(transport, "transport", transport)
    connector = getattr(transport, "connector", None)
    if connector is not None:
        connector.transport = connector.factory = None


# -- listeners --------------------------------------------------------------------------------


def raise_listen_errors(listener: StreamServerEndpointService) -> StreamServerEndpointService:
    """
    Make a listener's service raise a failed bind (a busy port) from its start, as
    ``strports.service`` does, instead of logging it and running without the port.  Relies on
    ``StreamServerEndpointService._raiseSynchronously``.
    """
    listener._raiseSynchronously = True
    return listener


def adopt_port(port_class: type[tcp.Port], reactor: Any, fd: int, family: int, factory: Any) -> Any:
    """
    A ``port_class`` (a ``tcp.Port`` subclass) on an inherited listening socket: what
    ``reactor.adoptStreamPort`` does for Twisted's own Port, which it cannot be told to replace.
    The caller starts it.  Relies on ``tcp.Port._fromListeningDescriptor``.
    """
    return port_class._fromListeningDescriptor(reactor, fd, family, factory)

"""
Reach-ins into Twisted's private names, each with the reason and a test
(``tests/test_compat.py``) that fails when an upstream release changes the assumption.

This module must not hold policy: it only adapts a library object, and says what it relies on.
(The older reach-ins, into Autobahn's protocol callbacks and Twisted's connection buffers, still
live beside their users in ``bridge.py`` and ``service.py``; they are to move here.)
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.web.client import HTTPConnectionPool

__all__ = [
    "AUTOBAHN_CLIENT_STATE",
    "AUTOBAHN_SERVER_STATE",
    "AUTOBAHN_STATE",
    "dispatch_directly",
    "quiet_pool",
]

# The instance attributes Autobahn's WebSocket protocols (24.4 to 26.x) set on every connection,
# none of them a class attribute anywhere in the protocol's classes.  The legs declare them as
# ``__slots__`` so that a held session's two legs keep them in fixed slots (8 bytes each) instead
# of two instance dicts of about 60 keys (1,584 bytes each): a held session measured 11.2 KiB of
# traced allocations before and 8.9 after (tracemalloc, 1,000 sessions).  A name Autobahn adds
# later lands in the instance dict as before (nothing breaks, the saving shrinks);
# tests/test_compat.py fails then, so the list is kept whole.
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


def dispatch_directly(reactor: Any) -> bool:
    """
    Make an epoll reactor call each ready connection's ``_doReadOrWrite`` directly, instead of
    through ``log.callWithLogger``, which pushes and pops a legacy log context (a dict and two
    context-tracker calls) around every read and every write.  ``_doReadOrWrite`` catches every
    exception of ``doRead``/``doWrite`` itself and disconnects the connection, so nothing is lost
    but the legacy log prefix, which wsgate does not use.  Measured with 64 connections of 64 B
    messages on one core (bench/build/wsload, gate on core 1): 40-49k -> 53-64k msg/s, and 1 KiB
    x 8 in flight: 206-324k -> 342-365k msg/s.

    Relies on EPollReactor's ``_poller``, ``_selectables`` and ``_doReadOrWrite`` and on
    ``mainLoop`` calling ``self.doIteration``.  Returns False (and changes nothing) for any other
    reactor.
    """
    if type(reactor) is not EPollReactor:
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    ready = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        try:
            events = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:  # removed by an earlier event of this round
                ready(selectable, fd, event)

    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True

"""
The data path: one client WebSocket session bridged to one backend WebSocket session.

Theory of operation
===================

Three objects make a session:

- :class:`ClientLeg`: an Autobahn server protocol, one per accepted client connection.
- :class:`BackendLeg`: an Autobahn client protocol, one per backend connection.  All of them come
  from one shared :class:`BackendLegFactory`; each session connects through a small
  :class:`_BackendRequest` view of it (its request, subprotocols and timeouts), because an
  Autobahn client factory is costly to make.
- :class:`Session`: owns both legs, pairs their handshakes, relays messages and closes both.

States of a session::

    CONNECTING --backend accepted--> OPEN --either side closes--> CLOSING --both legs gone--> CLOSED
        |
        +--route/servers/timeouts fail--> REFUSED (the client got an HTTP error, never a 101)

Opening (``CONNECTING``).  Autobahn parses the client's upgrade request and calls
``ClientLeg.onConnect``, which does not answer yet: the :class:`Session` matches a route (no route:
404), asks the route's upstream for a server and opens a :class:`BackendLeg` to
``server URL + client path?query``.  The backend handshake offers the client's subprotocols and
carries the forwarded headers (below).  When the backend answers 101, the Deferred returned from
``onConnect`` fires with the backend's subprotocol and only then does Autobahn send the client its
101.  A failed attempt (refused, unreachable, TLS error, non-101, timeout) moves on to the next
server, at most ``tries`` servers within ``try_timeout`` in all; when none works the client is
refused with 502 (503 when no server could be tried at all, 504 when the last attempt timed out).
A client that leaves meanwhile abandons the attempt: the pending connect is cancelled or the half
open backend connection aborted.

Relay (``OPEN``), message mode.  Each direction is a :class:`Relay` whose methods *are* the source
leg's Autobahn message hooks (wired as instance attributes in place of Autobahn's ``_onMessage*``
adapters, so Autobahn calls them directly).  A message that arrives as a single frame of up to
``_WHOLE_FRAME`` bytes is sent on as one message (framed by the relay itself up to
``_SMALL_MESSAGE``); anything else (fragmented or large) is streamed frame by frame as it arrives,
so the gate never holds a large message in memory.  Text stays text, binary stays binary.  Pings
are hop by hop (Autobahn answers them per leg); compression is not negotiated on either leg.

Relay, tunnel mode (a route's ``mode = "tunnel"``).  After both handshakes each leg's bytes go to
a :class:`~wsgate.tunnel.Tunnel` instead of Autobahn: frame headers are parsed, payloads forwarded
untouched, the close handshake runs end to end, and the gate's own Close and Ping frames are
injected at frame boundaries (see ``tunnel.py``).  The Session reacts to its ``closed`` and
``violation`` events and, when a leg's connection is lost, closes the other (``_tunnel_leg_lost``).

Backpressure, both modes: each leg's transport has a :class:`_ReadThrottle` registered as its
producer, which pauses reading on the *other* leg while this leg's send buffer is full.

Closing (``CLOSING``).  When one leg ends, :func:`partner_close` decides what the other leg is sent:

================================  =================================  ==============================
how the leg ended                 client leg ended -> backend gets   backend leg ended -> client gets
================================  =================================  ==============================
its peer sent Close(code, reason) the same code and reason           the same code and reason
its peer sent an empty Close      an empty Close                     an empty Close
the gate failed it (1002, 1007,   1001 "client error <code>: ..."    1011 "backend error <code>: ..."
1009: protocol error, bad UTF-8,
too big)
TCP dropped without a Close       1001 "client went away"            1011 "backend connection lost"
================================  =================================  ==============================

Codes travel through ``sendCloseFrame``, which (unlike Autobahn's ``sendClose``) accepts every
code that is valid on the wire (1000-1003, 1007-1014, 3000-4999).  An operator's
:meth:`Session.close` sends its code to the client and 1001 to the backend.  Autobahn answers a
peer's Close itself (echoing code and reason) and drops a peer that does not answer ours within
the close-handshake timeout, so no leg outlives its partner by more than that.

Forwarded headers.  Toward the backend: the client's ``Origin``, ``Cookie``, ``Authorization`` and
``User-Agent``; ``X-Forwarded-For`` (the client's value with the connecting peer appended),
``X-Forwarded-Proto`` (``https`` when the client came over TLS, else ``http``),
``X-Forwarded-Host`` (the client's ``Host``) and ``X-Real-IP`` (the client address, which behind a
trusted proxy or the PROXY protocol is the real client's).  ``Host`` is the backend's own.

Plain HTTP.  A request that is not an upgrade (Autobahn answers 426, or 405 for a method other
than GET) on a route with ``http = true`` is handed to ``httpproxy.start_http`` instead: the
:class:`ClientLeg` then passes every byte and the loss of its connection to that exchange.

This module must not choose servers (``upstream.py`` does) or build TLS contexts (``tls.py`` does:
the ``connect`` callable it receives opens backend connections).
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny, ConnectionRequest
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate.config import ServerSpec
from wsgate.gateway import Gateway
from wsgate.httpproxy import start_http
from wsgate.limits import MessageRate, client_address
from wsgate.tunnel import READ_SIZE, Tunnel, data_frame, read_more
from wsgate.upstream import Server

__all__ = [
    "BackendLeg",
    "ClientLeg",
    "ClientLegFactory",
    "Connect",
    "Relay",
    "Session",
    "partner_close",
]

_OPEN = WebSocketProtocol.STATE_OPEN
# A single-frame message up to this size is relayed as one message; larger or fragmented ones stream.
_WHOLE_FRAME = 128 * 1024
# Messages up to this size are framed (and masked toward a backend) by the relay itself.
_SMALL_MESSAGE = 4096
# How much of a message the console's tap sees.
_TAP_PREVIEW = 64

Connect = Callable[[ServerSpec, Any, float], Deferred]
"""Opens a connection to a backend server with a protocol factory and a connect timeout."""

_FORWARDED_AS_IS = ("cookie", "authorization")
_CLIENT_REASONS = {
    502: "No backend server accepted the session",
    503: "No backend server available",
    504: "No backend server answered in time",
}


def partner_close(side: str, kind: str, code: int | None, reason: str) -> tuple[int | None, str]:
    """
    The close code and reason to send to the partner of the leg on ``side`` (``"client"`` or
    ``"backend"``) that ended in the way ``kind`` says:

    - ``"close"``: its peer sent a Close with ``code`` (None for an empty Close) and ``reason``;
    - ``"failed"``: the gate failed that leg itself with ``code`` (protocol error, invalid UTF-8,
      message too big);
    - ``"dropped"``: the connection went away without a Close.

    See the table in this module's docstring.
    """
    if kind == "close":
        return code, reason
    if side == "client":
        if kind == "failed":
            return 1001, f"client error {code}: {reason}"
        return 1001, "client went away"
    if kind == "failed":
        return 1011, f"backend error {code}: {reason}"
    return 1011, "backend connection lost"


@implementer(IPushProducer)
class _ReadThrottle:
    """
    Registered as the producer of one leg's transport: pauses and resumes reading on the other
    leg's transport.  When the consuming transport goes away, reading resumes instead of the other
    connection being closed (Twisted would call ``stopProducing``): the Session closes it properly,
    with a Close frame, and it must be able to read its peer's answer.
    """

    __slots__ = ("_transport", "paused", "pauses")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        self.resumeProducing()


class Relay:
    """
    One direction of a session: messages received on ``source`` are sent on ``sink``.

    Its ``onMessage*`` methods replace the source leg's Autobahn hooks, so Autobahn calls them
    directly for every frame.  ``messages``, ``bytes`` (payload bytes) and ``last`` (time of the last
    complete message) are read by the registry, the access log and the idle timer.
    """

    __slots__ = (
        "source", "sink", "max_size", "max_frame", "rate", "_throttle", "_clock", "messages",
        "bytes", "last", "tap", "_first", "_now", "_binary", "_size", "_chunks", "_streaming",
        "_dropping", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        source: Any,
        sink: Any,
        max_size: int,
        now: Callable[[], float],
        max_frame: int = 0,
    ) -> None:
        self.source = source
        self.sink = sink
        self.max_size = max_size
        self.max_frame = max_frame
        self.rate: MessageRate | None = None
        self._throttle = False
        self._clock: Any = None
        self.messages = 0
        self.bytes = 0
        self.last = now()
        # Called with (is_binary, size, first chunk) after each relayed message while someone
        # taps the session (the console's tap); None otherwise, so the relay pays one test.
        self.tap: Callable[[bool, int, bytes], None] | None = None
        self._first = b""
        self._now = now
        self._binary = False
        self._size = 0
        self._chunks: list[bytes] | None = None
        self._streaming = False
        self._dropping = False

    def limit_rate(self, route: Any, clock: Any) -> None:
        """Hold this direction to the route's messages/s and bytes/s: over the budget, pause
        reading until the second is over (``throttle = true``) or close the source with 1008."""
        self.rate = MessageRate(
            route.max_messages_per_second, route.max_bytes_per_second, self._now
        )
        self._throttle = route.throttle
        self._clock = clock

    def _spend(self, size: int) -> None:
        assert self.rate is not None
        wait = self.rate.spend(size)
        if not wait:
            return
        if self._throttle:
            self.source.transport.pauseProducing()
            self._clock.callLater(wait, self.source.transport.resumeProducing)
        elif self.source.state == _OPEN:
            self._dropping = True
            self.source._fail_connection(
                WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION, "message rate limit exceeded"
            )

    def wire(self) -> None:
        """Take over the source leg's message hooks."""
        src = self.source
        # Autobahn calls its adapter's _onMessageX, which only calls onMessageX: the relay takes
        # the adapter's place (one call less per frame; five attributes, not ten, per leg).
        src._onMessageBegin = self.onMessageBegin
        src._onMessageFrameBegin = self.onMessageFrameBegin
        src._onMessageFrameData = self.onMessageFrameData
        src._onMessageFrameEnd = self.onMessageFrameEnd
        src._onMessageEnd = self.onMessageEnd

    def onMessageBegin(self, isBinary: bool) -> None:
        self._binary = isBinary
        self._size = 0
        self._chunks = None
        self._streaming = False
        self._dropping = self.sink.state != _OPEN or self.source.failedByMe

    def onMessageFrameBegin(self, length: int) -> None:
        self._size += length
        if self._size > self.max_size > 0 or length > self.max_frame > 0:
            self._dropping = True
            limit = "message" if self._size > self.max_size > 0 else "frame"
            self.source._fail_connection(
                WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                f"{limit} larger than {self.max_size if limit == 'message' else self.max_frame} bytes",
            )
        if self._dropping or self.source.failedByMe:
            # Autobahn goes on delivering frames it has just failed: forward nothing of them.
            self._dropping = True
            return
        if self._streaming:
            self.sink.beginMessageFrame(length)
        elif self.source.current_frame.fin and length <= _WHOLE_FRAME:
            self._chunks = []
            return
        else:
            self.sink.beginMessage(self._binary)
            self.sink.beginMessageFrame(length)
            self._streaming = True
        if length == 0:
            self.sink.sendMessageFrameData(b"")

    def onMessageFrameData(self, payload: bytes) -> None:
        if self._dropping or self.source.failedByMe:
            # Autobahn goes on delivering a frame it has just failed (bad UTF-8, ...): drop it.
            self._dropping = True
            return
        if self.tap is not None and not self._first:
            self._first = payload[:_TAP_PREVIEW]
        self.bytes += len(payload)
        if self._chunks is not None:
            self._chunks.append(payload)
        else:
            self.sink.sendMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        self.messages += 1
        self.last = self._now()
        if self.tap is not None:
            self.tap(self._binary, self._size, self._first)
            self._first = b""
        if self.rate is not None:
            self._spend(self._size)
        if self._dropping or self.source.failedByMe:
            return
        if self._chunks is not None:
            sink = self.sink
            if sink.state == _OPEN:
                chunks = self._chunks
                payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if len(payload) <= _SMALL_MESSAGE:
                    # Framed here: Autobahn's sendMessage costs more than the relay itself.
                    sink.sendData(data_frame(payload, self._binary, not sink.factory.isServer))
                else:
                    sink.sendMessage(payload, self._binary)  # Autobahn's C masking
            self._chunks = None
        else:
            self.sink.endMessage()


class Session:
    """
    One client session and its backend session: the handshake pairing, the relay in both
    directions and the close of both legs.  See the module docstring for the states.
    """

    log = Logger()
    __slots__ = (
        "id", "gateway", "client", "request", "backend", "server", "route_path", "subprotocol",
        "state", "started", "opened_at", "up", "down", "throttles", "client_close",
        "backend_close", "closed_by", "_connect", "_tried", "_attempting", "_attempt", "_pending",
        "_handshake", "_timer", "_lost", "tunnel", "_ping_timer", "_close_timer", "_ping_seq",
        "peer_address", "client_address", "client_port", "_admitted", "tls", "target", "route",
        "upstream", "__weakref__",
    )  # fmt: skip

    def __init__(
        self, gateway: Gateway, connect: Connect, client: ClientLeg, request: ConnectionRequest
    ) -> None:
        self.id = gateway.new_session_id()
        self.gateway = gateway
        self.client = client
        self.request = request
        self.backend: BackendLeg | None = None
        self.server: Server | None = None
        self.route_path = ""
        self.subprotocol: str | None = None
        self.state = "CONNECTING"
        self.started = gateway.clock.seconds()
        self.opened_at: float | None = (
            None  # when the backend accepted (connect time = this - started)
        )
        # client -> backend and backend -> client: Relays in message mode, Tunnels in tunnel mode
        self.up: Relay | Tunnel | None = None
        self.down: Relay | Tunnel | None = None
        self.throttles: tuple[_ReadThrottle, _ReadThrottle] | None = None
        self.client_close: str | None = None
        self.backend_close: str | None = None
        self.closed_by: str | None = None
        self._connect = connect
        self._tried: list[Server] = []
        self._attempting: Server | None = None  # the server of the attempt in progress
        self._attempt: Deferred | None = None
        self._pending: BackendLeg | None = None
        self._handshake: Deferred | None = None
        self._timer: Any = None
        self._lost: set[str] = set()
        self.tunnel = False
        self._ping_timer: Any = None
        self._close_timer: Any = None
        self._ping_seq = 0
        peer = client.transport.getPeer()
        self.peer_address = str(getattr(peer, "host", peer))
        self.client_address = client_address(
            self.peer_address, request.headers.get("x-forwarded-for"), gateway.config.limits
        )
        self.client_port = getattr(peer, "port", None)
        self._admitted = False
        self.tls = ISSLTransport.providedBy(client.transport)
        self.target = client.http_request_uri

    # -- opening ------------------------------------------------------------------------------

    def start(self) -> Deferred:
        """Route the request and start the first backend attempt; the Deferred fires with the
        backend's subprotocol, or fails with ``ConnectionDeny``."""
        gateway = self.gateway
        if gateway.closing:
            raise ConnectionDeny(503, "The gateway is shutting down")
        route = gateway.router.match(self.request.host, self.request.path)
        if route is None:
            raise ConnectionDeny(404, "No route for this path")
        if route.allowed_origins and self.request.origin not in route.allowed_origins:
            raise ConnectionDeny(403, "Origin not allowed")
        if route.required_subprotocol and route.required_subprotocol not in self.request.protocols:
            raise ConnectionDeny(400, f"Subprotocol {route.required_subprotocol} required")
        refusal = gateway.admission.admit(self.client_address)
        if refusal is not None:
            raise ConnectionDeny(*refusal)
        self._admitted = True
        self.route = route
        self.route_path = route.path
        self.upstream = self.gateway.upstreams[route.upstream]
        # In tunnel mode Autobahn stops reading frames after the handshake: the gate pings itself.
        self.tunnel = route.mode == "tunnel"
        self.client.autoPingInterval = 0 if self.tunnel else route.ping_interval
        self.client.autoPingTimeout = route.ping_timeout
        handshake = self._handshake = Deferred()
        self._timer = self.gateway.clock.callLater(
            self.upstream.spec.try_timeout, self._try_timeout_passed
        )
        self._try_next(None)  # may already have refused the client, when every try fails at once
        return handshake

    def _try_next(self, failure: tuple[int, str] | None) -> None:
        spec = self.upstream.spec
        server = None
        if len(self._tried) < spec.tries:
            request = self.request
            server = self.upstream.pick(
                self._tried,
                client=self.client_address,
                headers=request.headers,
                params=request.params,
            )
        if server is None:
            self._refuse(failure or (503, "No backend server available"))
            return
        self._tried.append(server)
        self._attempting = server
        self.upstream.attempt_started(server)
        factory = _BackendRequest(self.client.factory.backend_legs, self, server)
        self._attempt = self._connect(server.spec, factory, spec.connect_timeout)
        self._attempt.addCallbacks(self._connected, self._connect_failed, errbackArgs=(server,))

    def _connected(self, leg: BackendLeg) -> None:
        self._attempt = None
        self._pending = leg

    def _connect_failed(self, reason: Failure, server: Server) -> None:
        self._attempt = None
        if self.state != "CONNECTING":
            return
        if reason.check(TimeoutError):
            self._attempt_failed(server, (504, "backend connect timed out"))
        else:
            self._attempt_failed(
                server, (502, f"backend connect failed: {reason.getErrorMessage()}")
            )

    def _end_attempt(self, ok: bool | None) -> None:
        """Report the attempt in progress to the upstream: accepted, failed or abandoned (None)."""
        if self._attempting is not None:
            server, self._attempting = self._attempting, None
            self.upstream.attempt_ended(server, ok)

    def _attempt_failed(self, server: Server, failure: tuple[int, str]) -> None:
        self._end_attempt(False)
        self.log.warn(
            "backend_attempt_failed {session_id} server={server} status={status} reason={reason}",
            session_id=self.id,
            server=server.url,
            status=failure[0],
            reason=failure[1],
        )
        self._try_next(failure)

    def _try_timeout_passed(self) -> None:
        self._timer = None
        self._abandon_attempt()
        self._refuse((504, "No backend server answered in time"))

    def _abandon_attempt(self) -> None:
        """Stop the backend attempt in progress, if any."""
        self._end_attempt(None)
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            self.state = "ABANDONING"
            attempt.cancel()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.transport.abortConnection()

    def _refuse(self, failure: tuple[int, str]) -> None:
        self.state = "REFUSED"
        self._cancel_timer()
        status, reason = failure
        self.log.warn(
            "session_refused {session_id} client={client} path={path} status={status} reason={reason}",
            session_id=self.id,
            client=self.client_address,
            path=self.target,
            status=status,
            reason=reason,
        )
        if self._handshake is not None:
            d, self._handshake = self._handshake, None
            # The client gets a generic reason: backend names and TLS errors stay in the log.
            d.errback(Failure(ConnectionDeny(status, _CLIENT_REASONS.get(status, "Bad Gateway"))))

    def backend_opened(self, leg: BackendLeg) -> None:
        """The backend accepted: answer the client's handshake with the backend's subprotocol."""
        self._pending = None
        if self.state != "CONNECTING":
            leg.sendCloseFrame(1001, b"client went away")
            return
        self._cancel_timer()
        self._end_attempt(True)
        self.state = "OPEN"
        self.opened_at = self.gateway.clock.seconds()
        self.backend = leg
        assert self.server is None
        self.server = self._tried[-1]
        self.server.active += 1
        self.server.sessions_total += 1
        self.subprotocol = leg.websocket_protocol_in_use
        d, self._handshake = self._handshake, None
        assert d is not None
        d.callback(self.subprotocol)

    def backend_handshake_failed(self, leg: BackendLeg) -> None:
        """A backend connection ended before its handshake completed."""
        if leg is not self._pending:
            return
        self._pending = None
        if self.state != "CONNECTING":
            return
        if leg.timed_out:
            failure = (504, "backend handshake timed out")
        elif leg.refusal is not None:
            failure = (502, f"backend refused the handshake: {leg.refusal}")
        else:
            failure = (502, f"backend connection lost during handshake: {leg.wasNotCleanReason}")
        self._attempt_failed(self._tried[-1], failure)

    def client_opened(self) -> None:
        """The client got its 101: start relaying."""
        client, backend = self.client, self.backend
        assert backend is not None
        legs: tuple[Any, Any] = (client, backend)
        for leg in legs:
            # Autobahn keeps each leg's raw handshake for its test suite; nothing reads it after
            # the handshake (the session keeps the parsed request), so free it (~1 KiB a session).
            leg.http_request_data = leg.http_response_data = None
        legs[1].http_headers = None  # the backend's parsed response headers
        if self.tunnel:
            self._start_tunnel()
        else:
            self._start_relay()
        self.throttles = (_ReadThrottle(backend.transport), _ReadThrottle(client.transport))
        client.transport.registerProducer(self.throttles[0], True)
        backend.transport.registerProducer(self.throttles[1], True)
        if self.tunnel:
            _write_eagerly(client.transport)
            _write_eagerly(backend.transport)
        self.gateway.handshake_result("ok")
        self.gateway.session_opened(self)
        if self.gateway.closing:
            self.close(1001, "gateway shutting down")
        if self.route.idle_timeout > 0:
            self._timer = self.gateway.clock.callLater(self.route.idle_timeout, self._check_idle)

    def _start_relay(self) -> None:
        """Message mode: Autobahn decodes each side, the relays re-encode toward the other."""
        client, backend = self.client, self.backend
        now = self.gateway.clock.seconds
        route = self.route
        self.up = Relay(client, backend, route.max_message_size, now, route.max_frame_size)
        self.down = Relay(backend, client, route.max_message_size, now, route.max_frame_size)
        if route.max_messages_per_second or route.max_bytes_per_second:
            self.up.limit_rate(route, self.gateway.clock)
        self.up.wire()
        self.down.wire()

    def _start_tunnel(self) -> None:
        """
        Tunnel mode: from now on each leg's bytes go to a Tunnel instead of Autobahn, including
        what Autobahn had already read past the handshake.
        """
        client, backend = self.client, self.backend
        assert backend is not None
        route = self.route
        limits = (route.max_message_size, route.max_frame_size, self.gateway.clock.seconds)
        up = Tunnel(backend.transport, self, True, *limits)
        down = Tunnel(client.transport, self, False, *limits)
        up.partner, down.partner = down, up
        up.source, down.source = client.transport, backend.transport
        self.up, self.down = up, down
        for leg, tunnel in ((client, up), (backend, down)):
            leg.dataReceived = tunnel.dataReceived  # type: ignore[method-assign]
            early, leg.data = leg.data, b""
            if early:
                tunnel.dataReceived(early)
            # Autobahn neither decodes, sends nor fires events on this leg any more: free its
            # message state and its observer tables.
            autobahn: Any = leg
            autobahn.utf8validator = autobahn.trafficStats = autobahn.send_queue = None
            autobahn._results = autobahn._valid_events = autobahn._transport_details = None
        if route.ping_interval > 0:
            self._ping_timer = self.gateway.clock.callLater(route.ping_interval, self._tunnel_ping)

    # -- tunnel events (wsgate/tunnel.py) -----------------------------------------------------------

    def closed(self, tunnel: Tunnel, code: int | None, reason: str) -> None:
        """A peer sent a Close through the tunnel (already forwarded to the other peer)."""
        side = "client" if tunnel is self.up else "backend"
        self._record_end(side, _describe_close("close", code, reason))

    def violation(self, tunnel: Tunnel, code: int, reason: str) -> None:
        """A peer broke the frame rules or a limit: ``code`` to it, the policy's close to the other."""
        side = "client" if tunnel is self.up else "backend"
        self._warn_failed(side, code, reason)
        self._record_end(side, _describe_close("failed", code, reason))
        assert tunnel.partner is not None
        tunnel.partner.close(code, reason)  # toward the peer at fault
        tunnel.close(*partner_close(side, "failed", code, reason))
        leg = self.client if side == "client" else self.backend
        assert leg is not None
        leg.transport.loseConnection()

    def _warn_failed(self, side: str, code: int | None, reason: str) -> None:
        """The gate failed one leg (protocol error, limit): logged, rate limited."""
        self.gateway.warnings.warn(
            "session_failed",
            "{session_id} {side} {client} code={code} reason={reason}",
            session_id=self.id,
            side=side,
            client=self.client_address,
            code=code,
            reason=reason,
        )

    def _record_end(self, side: str, description: str) -> None:
        self._closing()
        self._arm_close_timeout()
        if getattr(self, f"{side}_close") is None:
            setattr(self, f"{side}_close", description)
        if self.closed_by is None:
            self.closed_by = side

    def _tunnel_ping(self) -> None:
        """Ping both peers; one that has not answered the previous ping in ping_timeout is dropped."""
        route = self.route
        self._ping_seq += 1
        for tunnel in (self.down, self.up):
            assert isinstance(tunnel, Tunnel)
            tunnel.ping(self._ping_seq)
        self._ping_timer = self.gateway.clock.callLater(route.ping_timeout, self._tunnel_pong_due)

    def _tunnel_pong_due(self) -> None:
        for tunnel, leg in ((self.down, self.client), (self.up, self.backend)):
            assert isinstance(tunnel, Tunnel) and leg is not None
            if tunnel.ping_payload is not None and not tunnel.sink_closed:
                leg.transport.abortConnection()  # its partner is closed by leg_lost
                return
        wait = max(self.route.ping_interval - self.route.ping_timeout, 0.0)
        self._ping_timer = self.gateway.clock.callLater(wait, self._tunnel_ping)

    # -- closing ------------------------------------------------------------------------------

    def close(self, code: int = 1001, reason: str = "", by: str = "gate") -> None:
        """Close both legs: ``code`` and ``reason`` to the client, 1001 and ``reason`` to the backend."""
        if self.state == "CLOSED":
            return  # e.g. a spread shutdown reaching a session that ended meanwhile
        if self.closed_by is None:
            self.closed_by = by
        self._closing()
        if isinstance(self.down, Tunnel) and isinstance(self.up, Tunnel):
            self.down.close(code, reason)
            self.up.close(1001, reason)
            self._arm_close_timeout()
            return
        _send_close(self.client, code, reason)
        if self.backend is not None:
            _send_close(self.backend, 1001, reason)

    def _check_idle(self) -> None:
        assert self.up is not None and self.down is not None
        last = max(self.up.last, self.down.last)
        remaining = last + self.route.idle_timeout - self.gateway.clock.seconds()
        if remaining > 0:
            self._timer = self.gateway.clock.callLater(remaining, self._check_idle)
        else:
            self._timer = None
            self.close(1001, "idle timeout", by="gate (idle timeout)")

    def leg_close_received(self, leg: WebSocketProtocol, code: int | None, reason: str) -> None:
        """The peer of ``leg`` started the close handshake."""
        self._leg_ended(leg, "close", code, reason)

    def leg_lost(self, leg: WebSocketProtocol) -> None:
        """The connection of ``leg`` is gone."""
        side = "client" if leg is self.client else "backend"
        if self.state in ("CONNECTING", "ABANDONING") and side == "client":
            self.closed_by = "client"
            self.client_close = "left during handshake"
            self._abandon_attempt()
            self.state = "REFUSED"
            self._cancel_timer()
        if self.state == "REFUSED":
            self._finish_refused()
            return
        if self.tunnel and self.up is not None:
            self._tunnel_leg_lost(side)
            return
        if leg.failedByMe:
            reason = _text(leg.localCloseReason)
            self._warn_failed(side, leg.localCloseCode, reason)
            self._leg_ended(leg, "failed", leg.localCloseCode, reason)
        elif leg.wasClean:
            self._leg_ended(leg, "close", leg.remoteCloseCode, leg.remoteCloseReason or "")
        else:
            self._leg_ended(leg, "dropped", None, leg.wasNotCleanReason or "")
        self._lost.add(side)
        if len(self._lost) == 2:
            self._finish()

    def _tunnel_leg_lost(self, side: str) -> None:
        """In tunnel mode: a leg is gone; tell its partner (a Close unless one went already) and end it."""
        self._record_end(side, "dropped")
        self._lost.add(side)
        survivor = self.backend if side == "client" else self.client
        toward = self.up if side == "client" else self.down
        if "client" not in self._lost or "backend" not in self._lost:
            assert isinstance(toward, Tunnel) and survivor is not None
            if toward.at_boundary:
                toward.close(*partner_close(side, "dropped", None, ""))
            survivor.transport.loseConnection()
        else:
            self._finish()

    def _leg_ended(self, leg: WebSocketProtocol, kind: str, code: int | None, reason: str) -> None:
        side = "client" if leg is self.client else "backend"
        self._closing()
        if getattr(self, f"{side}_close") is not None:
            return
        setattr(self, f"{side}_close", _describe_close(kind, code, reason))
        if self.closed_by is None:
            self.closed_by = side
        partner = self.backend if side == "client" else self.client
        if partner is not None:
            _send_close(partner, *partner_close(side, kind, code, reason))

    def _closing(self) -> None:
        if self.state == "OPEN":
            self.state = "CLOSING"

    def _arm_close_timeout(self) -> None:
        """
        Tunnel mode has no Autobahn to time out a close handshake: once a close has started,
        both connections are aborted if the session has not ended within the close timeout (a
        peer that never answers, or a kick's Close waiting behind a frame that never completes).
        """
        if self._close_timer is None:
            self._cancel_timer()  # the idle timer has nothing left to do
            self._close_timer = self.gateway.clock.callLater(
                self.gateway.config.limits.close_timeout, self._abort_legs
            )

    def _abort_legs(self) -> None:
        self._close_timer = None
        for leg in (self.client, self.backend):
            if leg is not None and leg.transport is not None:
                leg.transport.abortConnection()

    def _finish(self) -> None:
        self.state = "CLOSED"
        self._release()
        self._cancel_timer()
        for timer in (self._ping_timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self.server is not None:
            self.server.active -= 1
        self.gateway.session_closed(self)
        self.gateway.clock.callLater(0, self._forget)

    def _finish_refused(self) -> None:
        self.state = "CLOSED"
        self._release()
        self.gateway.clock.callLater(0, self._forget)

    def _forget(self) -> None:
        """
        Break the reference cycles of a finished session, so that reference counting frees it and
        both its connections at once.  Left to the cycle collector, every session would be freed
        only by a full collection, whose pause grows with the number of live sessions.  Runs a
        reactor turn after the end, once no connectionLost of either leg is still on the stack;
        the Session itself keeps what the registry and the console read.
        """
        for tunnel in (self.up, self.down):
            if isinstance(tunnel, Tunnel):
                tunnel.events = tunnel.partner = None
        for leg in (self.client, self.backend):
            if leg is None:
                continue
            # the bound methods of relays and tunnels (Relay.wire, _start_tunnel)
            for hook in _INSTANCE_HOOKS:
                leg.__dict__.pop(hook, None)
            if leg.is_closed is not None and leg.is_closed.called:
                leg.is_closed = None  # Autobahn resolved it with the leg itself
            if leg.transport is not None:
                leg.transport.__dict__.pop("write", None)  # _write_eagerly's closure
        self.client.session = None
        if self.backend is not None:
            self.backend.factory.session = None
            transport = self.backend.transport
            transport = getattr(transport, "transport", transport)  # under TLS, the TCP one
            connector = getattr(transport, "connector", None)
            if connector is not None:  # Twisted's Connector and its connection refer to each other
                connector.transport = connector.factory = None

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self.gateway.admission.release(self.client_address)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- what the registry, access log and console show -----------------------------------------

    def describe(self) -> dict[str, Any]:
        now = self.gateway.clock.seconds()
        up, down = self.up, self.down
        return {
            "session_id": self.id,
            "client": self.client_address,
            "route": self.route_path,
            "server": self.server.url if self.server else None,
            "path": self.target,
            "subprotocol": self.subprotocol,
            "tls": self.tls,
            "started": self.started,
            "duration": now - self.started,
            "idle": now - max(up.last, down.last) if up and down else 0.0,
            "messages_up": up.messages if up else 0,
            "bytes_up": up.bytes if up else 0,
            "messages_down": down.messages if down else 0,
            "bytes_down": down.bytes if down else 0,
            "client_close": self.client_close,
            "backend_close": self.backend_close,
            "closed_by": self.closed_by,
        }

    def forwarded_headers(self) -> dict[str, str]:
        """The headers the backend handshake carries on behalf of the client (module docstring)."""
        incoming = self.request.headers
        headers = {name.title(): incoming[name] for name in _FORWARDED_AS_IS if name in incoming}
        xff = incoming.get("x-forwarded-for")
        peer = self.peer_address
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        headers["X-Forwarded-Proto"] = "https" if self.tls else "http"
        headers["X-Forwarded-Host"] = incoming.get("host", "")
        headers["X-Real-IP"] = self.client_address
        return headers


# What a session sets on its legs' instances; Session._forget takes them off again.
_INSTANCE_HOOKS = (
    "_onMessageBegin",
    "_onMessageFrameBegin",
    "_onMessageFrameData",
    "_onMessageFrameEnd",
    "_onMessageEnd",
    "dataReceived",
)


def _write_eagerly(transport: Any) -> None:
    """
    Make a plain TCP transport send at once when nothing is queued, instead of queueing every
    write and asking epoll to wake it when the socket is writable: for small relayed messages the
    send buffer is nearly always empty, and Twisted's queue-then-wait costs two ``epoll_ctl`` calls
    and a loop pass per write.  Whatever the socket does not take at once is queued the usual way,
    so buffering, backpressure (producer pausing) and error handling stay Twisted's.

    Measured (64 B echo, 64 connections, gate on one core): tunnel mode 33.5k -> 52k msg/s with
    it; message mode 15.9k -> 13.4k, because there Twisted's deferred writes coalesce Autobahn's
    several writes per message.  So tunnel sessions only.
    """
    if not isinstance(transport, tcp.Connection):
        return  # TLS and other transports keep their own write path
    queue = transport.write
    send = transport.socket.send

    def write(data: bytes) -> None:
        if transport._tempDataLen or transport.offset != len(transport.dataBuffer):
            queue(data)  # keep order behind what is already queued
            return
        try:
            sent = send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error the queued write will report as connection loss
        if sent < len(data):
            queue(data[sent:])

    transport.write = write  # type: ignore[method-assign]


def _send_close(leg: WebSocketProtocol, code: int | None, reason: str) -> None:
    """
    Start the close handshake on ``leg`` unless it is already closing.  When a frame toward it was
    cut short (its source failed or vanished in the middle of a streamed frame), no Close can
    follow that frame: the connection is dropped instead, and its peer sees an abnormal closure.
    """
    if leg.state != _OPEN:
        return
    if leg.send_state == WebSocketProtocol.SEND_STATE_INSIDE_MESSAGE_FRAME:
        leg.dropConnection(abort=True)
        return
    leg.sendCloseFrame(code, encode_truncate(reason, 123) if code is not None else None)


def _describe_close(kind: str, code: int | None, reason: str) -> str:
    if kind == "dropped":
        return "dropped"
    text = "empty" if code is None else str(code)
    if reason:
        text += f" {reason!r}"
    return f"{text} (gate)" if kind == "failed" else text


def _text(raw: bytes | str | None) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return raw or ""


def _send_data(leg: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
    """
    The legs' ``sendData``: Autobahn's, minus the debug-log arguments and traffic statistics it
    computes on every write even with debug logging off (the gate keeps its own counters).
    Queued writes (sync, chopped) keep Autobahn's path.
    """
    if sync or chopsize or leg.send_queue:
        WebSocketProtocol.sendData(leg, data, sync, chopsize)
    else:
        leg.transport.write(data)


class _QuietLog:
    """
    The legs' Autobahn log: only errors pass.  Autobahn logs every failed handshake and failed
    connection at info/warn level, which a flood of bad clients would turn into a flood of log
    lines; wsgate logs those events itself, rate limited (``Gateway.warnings``).
    """

    def __init__(self) -> None:
        self._log = txaio.make_logger()  # type: ignore[attr-defined]

    def __getattr__(self, level: str) -> Any:
        if level in ("error", "critical", "failure"):
            return getattr(self._log, level)
        return _ignore


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass


def _auto_pong(
    leg: Any, ping_sent: Any, ping_seq: Any, pong_received: Any, pong_rtt: Any, payload: bytes
) -> None:
    """Autobahn's ``onAutoPong`` on both legs: keep the last ping round trip (ms) for the console."""
    leg.ping_rtt = pong_rtt


class ClientLeg(WebSocketServerProtocol):
    """The client side of a session: accepts the upgrade only once the backend has accepted."""

    log = _QuietLog()
    sendData = _send_data
    session: Session | None = None
    transport: Any
    http: Any = None  # an httpproxy.HttpExchange once a plain HTTP request was handed over
    ping_rtt: int | None = None
    onAutoPong = _auto_pong
    autoPingInterval: float
    autoPingTimeout: float

    def onConnect(self, request: ConnectionRequest) -> Deferred:  # type: ignore[override]
        # Autobahn accepts a Deferred from onConnect and answers the handshake when it fires.
        # The request is complete: from here on the backend attempts' own timeouts apply.
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        self.session = Session(self.factory.gateway, self.factory.connect, self, request)
        return self.session.start()

    def processHandshake(self) -> None:
        """Enforce the request header limits, and buffer (bounded) what a client sends early."""
        limits = self.factory.gateway.config.limits
        if self.session is not None:
            # onConnect is waiting for the backend; Autobahn would re-parse early frames as a
            # new request.  They stay in self.data and are relayed once the session is open.
            if len(self.data) > limits.max_header_size:
                self.failHandshake("Too much data before the handshake completed", 400)
            return
        end = self.data.find(b"\r\n\r\n")
        head = self.data if end < 0 else self.data[:end]
        if len(head) > limits.max_header_size:
            self.failHandshake("Request header too large", 431)
        elif head.count(b"\r\n") > limits.max_headers:
            self.failHandshake("Too many request headers", 431)
        elif end >= 0:
            super().processHandshake()

    def onOpen(self) -> None:
        assert self.session is not None
        self.session.client_opened()

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        return _close_frame_received(self, WebSocketServerProtocol, code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.http is not None:
            self.http.client_lost()
        if self.session is not None:
            self.session.leg_lost(self)

    def dataReceived(self, data: bytes) -> None:
        if self.http is not None:
            self.http.client_data(data)
        else:
            if len(data) == READ_SIZE:
                read_more(self.transport)
            self._dataReceived(data)  # Autobahn's, without its per-read debug-log arguments

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if code in (405, 426) and self.http is None and self.session is None:
            self.http = start_http(self, self.factory.gateway, self.factory.connect)
            if self.http is not None:
                return
        gateway = self.factory.gateway
        if (
            code == 426
            and gateway.router.match(self.http_request_host, self.http_request_path) is None
        ):
            code, reason = 404, "No route for this path"
        elif any(name == "Sec-WebSocket-Version" for name, _ in responseHeaders or ()):
            code = 426  # RFC 6455 4.4: a version we do not speak is "Upgrade Required"
        gateway.handshake_result(str(code))
        if code >= 500 or code in (400, 429, 431):
            peer = self.transport.getPeer()
            gateway.warnings.warn(
                f"handshake_{code}",
                "client={client} reason={reason}",
                client=getattr(peer, "host", peer),
                reason=reason,
            )
        super().failHandshake(reason, code, responseHeaders)

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders: Any = None) -> None:
        """An HTTP error with its standard reason phrase and a short plain-text body."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = f"{code} {phrase}: {reason}\n".encode()
        headers = [
            ("Server", "wsgate"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        extra = list(responseHeaders or ())
        if code == 426:
            headers.append(("Upgrade", "websocket"))
            if not any(name == "Sec-WebSocket-Version" for name, _ in extra):
                headers.append(("Sec-WebSocket-Version", "13"))
        if code in (429, 503):
            headers.append(("Retry-After", str(self.factory.gateway.config.limits.retry_after)))
        headers += extra
        head = f"HTTP/1.1 {code} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.sendData(head.encode("latin-1", "replace") + b"\r\n" + body)


def _close_frame_received(
    leg: Any, base: Any, code: int | None, reasonRaw: bytes | None
) -> bool | None:
    """Let Autobahn answer the Close, then tell the session if the peer started the close."""
    peer_started = leg.state == _OPEN
    result = base.onCloseFrame(leg, code, reasonRaw)
    session = leg.session
    if peer_started and result is None and session is not None and not leg.failedByMe:
        session.leg_close_received(leg, leg.remoteCloseCode, leg.remoteCloseReason or "")
    return result


class ClientLegFactory(WebSocketServerFactory):
    """Builds a :class:`ClientLeg` per accepted connection; shared by every listener."""

    protocol = ClientLeg

    def __init__(self, gateway: Gateway, connect: Connect) -> None:
        super().__init__(server="wsgate")
        self.gateway = gateway
        self.connect = connect
        limits = gateway.config.limits
        self.backend_legs = BackendLegFactory(limits.close_timeout)
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,
            echoCloseCodeReason=True,
            openHandshakeTimeout=limits.handshake_timeout,
            closeHandshakeTimeout=limits.close_timeout,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
        )

    def setProtocolOptions(self, **options: Any) -> None:  # type: ignore[override]
        super().setProtocolOptions(**options)
        self.protocol = _options_on_class(ClientLeg, self)


def _options_on_class(protocol: type[Any], factory: Any) -> type[Any]:
    """
    A subclass of ``protocol`` that carries ``factory``'s protocol options as class attributes and
    leaves Autobahn nothing to copy: it copies its 30-odd options into every protocol instance when
    the connection is made, which costs CPU on each handshake and memory in each leg's ``__dict__``.
    """
    options = {name: getattr(factory, name) for name in protocol.CONFIG_ATTRS}
    for name, value in options.items():
        if callable(value):  # e.g. perMessageCompressionAccept: must not become a method
            options[name] = staticmethod(value)
    return type(protocol.__name__, (protocol,), {**options, "CONFIG_ATTRS": ()})


class BackendLeg(WebSocketClientProtocol):
    """The backend side of a session: reports its handshake's outcome to the session."""

    log = _QuietLog()
    sendData = _send_data

    def dataReceived(self, data: bytes) -> None:
        if len(data) == READ_SIZE:
            read_more(self.transport)
        self._dataReceived(data)  # Autobahn's, without its per-read debug-log arguments

    transport: Any
    ping_rtt: int | None = None
    onAutoPong = _auto_pong
    autoPingInterval: float
    autoPingTimeout: float
    openHandshakeTimeout: float

    def __init__(self) -> None:
        super().__init__()
        self.timed_out = False
        self.refusal: str | None = None

    @property
    def session(self) -> Session:
        return self.factory.session

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        """The handshake request: the client's path, query, subprotocols and forwarded headers."""
        session, server = self.factory.session, self.factory.server
        request = session.request
        return ConnectingRequest(
            host=server.host,
            port=server.port,
            resource=session.target,
            headers=session.forwarded_headers(),
            useragent=request.headers.get("user-agent", ""),
            origin=request.origin,
            protocols=request.protocols,
        )

    def onOpen(self) -> None:
        self.session.backend_opened(self)

    def onOpenHandshakeTimeout(self) -> None:
        self.timed_out = True
        super().onOpenHandshakeTimeout()

    def failHandshake(self, reason: str) -> None:
        self.refusal = reason
        super().failHandshake(reason)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:
        return _close_frame_received(self, WebSocketClientProtocol, code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session.backend is self:
            self.session.leg_lost(self)
        else:
            self.session.backend_handshake_failed(self)


class BackendLegFactory(WebSocketClientFactory):
    """
    Builds every BackendLeg of the gateway (one per ClientLegFactory).  Autobahn's client factory
    is costly to make (it reseeds the RNG, builds a timer wheel and parses its options), so each
    session connects through a :class:`_BackendRequest` instead: a small view of this factory
    carrying what differs per session.
    """

    protocol = BackendLeg

    def __init__(self, close_timeout: float) -> None:
        super().__init__()
        self.setProtocolOptions(
            failByDrop=False,
            closeHandshakeTimeout=close_timeout,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
        )

    def setProtocolOptions(self, **options: Any) -> None:  # type: ignore[override]
        super().setProtocolOptions(**options)
        self.protocol = _options_on_class(BackendLeg, self)


class _BackendRequest:
    """
    The factory one session connects to one server through: ``buildProtocol`` makes a BackendLeg
    whose ``factory`` is this view, so Autobahn reads the session's subprotocols and timeouts here
    (the handshake request itself comes from ``BackendLeg.onConnecting``) and everything else from
    the shared :class:`BackendLegFactory`.
    """

    isServer = False

    def __init__(self, shared: BackendLegFactory, session: Session, server: Server) -> None:
        self._shared = shared
        self.session = session
        self.server = server.spec
        self.protocols = session.request.protocols

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    def buildProtocol(self, addr: Any) -> BackendLeg:
        leg: BackendLeg = self._shared.protocol()
        leg.factory = self
        # The options that differ per session; the rest are the shared factory's (on the class).
        session = self.session
        leg.openHandshakeTimeout = session.upstream.spec.handshake_timeout
        leg.autoPingInterval = 0 if session.tunnel else session.route.ping_interval
        leg.autoPingTimeout = session.route.ping_timeout
        return leg

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

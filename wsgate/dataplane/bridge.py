"""
The data path: one client WebSocket session bridged to one backend WebSocket session.

Theory of operation
===================

Three objects make a session:

- :class:`ClientLeg` (here): an Autobahn server protocol, one per accepted client connection.
- :class:`BackendLeg` (here): an Autobahn client protocol, one per backend connection.  All of
  them come from one shared :class:`BackendLegFactory`; each session connects through a small
  ``_BackendRequest`` view of it (its request, subprotocols and timeouts), because an Autobahn
  client factory is costly to make.
- :class:`~wsgate.dataplane.session.Session`: owns both legs; the driver of a
  :class:`~wsgate.core.session.SessionMachine`, which decides (pairing the handshakes, the
  tries, the close policy, the timers, teardown): the Session feeds it what the legs, relays
  (:class:`~wsgate.dataplane.relay.Relay`) and timers report and carries out the commands it
  returns.  This module keeps the legs and the theory of operation of all three.

States of a session (:class:`~wsgate.core.session.SessionState`)::

    CONNECTING --backend accepted--> OPEN --either side closes--> CLOSING --both legs gone--> CLOSED
      |  |                                                                                   ^
      |  +--route, auth, webhook, servers or try_timeout fail--> REFUSED --client gone--------+
      |                                                          ^   (an HTTP error, never a 101)
      +--client left, or try_timeout, during an attempt--> ABANDONING (the attempt is cancelled)

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

Webhook (``CONNECTING``).  On a route with ``on_connect``, the first attempt is a call to that
webhook (``webhooks.py``): the backend attempts start only once it allows, carrying the headers it
added; its refusal is the client's answer.  A client that leaves, or ``try_timeout``, cancels it.

Relay (``OPEN``), both modes.  When both 101s are done, each leg's bytes go to a :class:`Relay`
(one per direction) instead of Autobahn, including what Autobahn had already read past the
handshake.  The relay feeds them to a :class:`~wsgate.core.frames.FrameEngine` and writes what it
returns to the other leg: payloads pass untouched (client frames stay masked with the client's
key), a read of whole frames goes on as the same bytes, and a frame cut by a read goes on as a
fragment, so the output always ends at a frame boundary and a frame is never held whole.  The
route's ``mode`` is the engine's validation policy, not a second data path: ``message`` (the
default) checks everything an endpoint checks, UTF-8 of text included; ``tunnel`` checks framing
and Close frames only.  Pings and pongs run end to end (the far endpoint answers); the gate's own
keepalive Pings (``ping_interval``) are answered by Pongs the engine consumes.  The client's
permessage-deflate offer goes to the backend (``compression = "pass"``) and the backend's answer
back to the client unchanged; compressed frames pass untouched.

Pushed messages (the control API's, :meth:`Session.push`) go to the client between two relayed
messages, in both modes: while a fragmented message is in flight they wait in a small bounded queue
and follow its final fragment.

Backpressure: each leg's transport has a :class:`ReadThrottle` registered as its producer, which
pauses reading on the *other* leg while this leg's send buffer is full.  Everything the gate
queues toward a peer (relayed frames, the far endpoint's pongs, Closes) comes from the other leg,
so one bound per leg (Twisted's buffer size, at most 256 KiB) holds whatever a peer does.

Closing (``CLOSING``).  The close handshake runs end to end: a valid Close from one side is
forwarded and the answer comes from the other endpoint; once the client has both sent and been
sent a Close, the gate closes the client's connection (the backend closes its own).  When the
gate ends a side itself, :func:`partner_close` decides what the other side is sent:

================================  =================================  ==============================
how the leg ended                 client leg ended -> backend gets   backend leg ended -> client gets
================================  =================================  ==============================
its peer sent Close(code, reason) the same Close, forwarded           the same Close, forwarded
its peer sent an empty Close      the same empty Close               the same empty Close
the gate failed it (1002, 1007,   1001 "client error <code>: ..."    1011 "backend error <code>: ..."
1008, 1009: protocol error, bad
UTF-8, rate, too big)
TCP dropped without a Close       1001 "client went away"            1011 "backend connection lost"
                                                                     (tunnel mode: its TCP closed
                                                                     too, no Close, unless the gate
                                                                     dropped the backend itself)
================================  =================================  ==============================

The peer at fault is sent the endpoint's code (1002, 1007, 1008, 1009).  An operator's
:meth:`Session.close` (kick, shutdown, idle timeout) sends its code to the client and 1001 to the
backend.  A peer that does not answer a Close within ``close_timeout`` is dropped.

Timers.  Every timeout (the front door's and the backend's handshake, pings, idle, close) runs
on the gateway's clock (``callLater``), never on Autobahn's txaio timers, which batch deadlines
into whole seconds and fire up to a second early.

Forwarded headers.  Toward the backend: the client's ``Origin``, ``Cookie``, ``Authorization`` and
``User-Agent``; ``X-Forwarded-For`` (the client's value with the connecting peer appended),
``X-Forwarded-Proto`` (``https`` when the client came over TLS, else ``http``),
``X-Forwarded-Host`` (the client's ``Host``) and ``X-Real-IP`` (the client address, which behind a
trusted proxy or the PROXY protocol is the real client's) and ``X-Request-ID`` (the client's, kept
to 128 characters of ``A-Za-z0-9._-``, or a new random one; the access-log line carries it too).
``Host`` is the backend's own.

Plain HTTP.  A request that is not an upgrade (Autobahn answers 426, or 405 for a method other
than GET) on a route with ``http = true`` is handed to ``httpproxy.start_http`` instead: the
:class:`ClientLeg` then passes every byte and the loss of its connection to that exchange.

This module must not choose servers (``upstream.py`` does) or build TLS contexts (``tls.py`` does:
the ``connect`` callable it receives opens backend connections).

A little over 500 lines, a fifth of them this theory of operation, which is the data plane's
map and belongs with the legs it describes.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import PerMessageDeflateResponseAccept
from autobahn.websocket.types import ConnectingRequest, ConnectionRequest
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from wsgate.core.redact import redact_text
from wsgate.core.session import (
    SessionState,
    partner_close,
)
from wsgate.dataplane._compat import (
    AUTOBAHN_CLIENT_STATE,
    AUTOBAHN_SERVER_STATE,
    AUTOBAHN_STATE,
    READ_SIZE,
    autobahn_receive,
    no_open_close_futures,
    read_more,
    send_data,
    write_eagerly,
)
from wsgate.dataplane.auth import Authenticator
from wsgate.dataplane.gateway import Gateway
from wsgate.dataplane.httpproxy import start_http
from wsgate.dataplane.relay import PUSH_QUEUE, Relay
from wsgate.dataplane.session import Connect, Session

__all__ = [
    "BackendLeg",
    "ClientLeg",
    "ClientLegFactory",
    "Connect",
    "PUSH_QUEUE",
    "Relay",
    "Session",
    "partner_close",
]


def deflate_offers(header: str) -> str:
    """
    The permessage-deflate offers of a client's ``Sec-WebSocket-Extensions``, with their
    parameters, in the client's order; other extensions are dropped, since the gate does not know
    what their reserved bits mean.
    """
    offers = [o.strip() for o in header.split(",")]
    return ", ".join(o for o in offers if o.split(";", 1)[0].strip() == "permessage-deflate")


def _cancel_handshake_timer(leg: Any) -> None:
    """Both legs' ``cancel_handshake_timer``: stop the opening-handshake timer, if it runs."""
    timer, leg.handshake_timer = leg.handshake_timer, None
    if timer is not None and timer.active():
        timer.cancel()


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass


class _QuietLog:
    """
    The legs' Autobahn log: only errors pass.  Autobahn logs every failed handshake and failed
    connection at info/warn level, which a flood of bad clients would turn into a flood of log
    lines; wsgate logs those events itself, rate limited (``Gateway.warnings``).  The levels
    below error are attributes of the class (Autobahn calls them about 20 times a handshake); any
    other name is ignored too.
    """

    trace = debug = info = warn = staticmethod(_ignore)

    def __init__(self) -> None:
        self._log = txaio.make_logger()  # type: ignore[attr-defined]

    def __getattr__(self, level: str) -> Any:
        if level in ("error", "critical", "failure"):
            return getattr(self._log, level)
        return _ignore


def _tls_reason(error: SSL.Error) -> str:
    """OpenSSL's reasons in a pyOpenSSL error (``[(lib, func, reason), ...]``), or its text."""
    errors = error.args[0] if error.args else None
    if isinstance(errors, list):
        reasons = [e[2] for e in errors if isinstance(e, tuple) and len(e) > 2 and e[2]]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__


class ClientLeg(WebSocketServerProtocol):
    """The client side of a session: accepts the upgrade only once the backend has accepted."""

    __slots__ = (*AUTOBAHN_STATE, *AUTOBAHN_SERVER_STATE)
    log = _QuietLog()
    sendData = send_data
    session: Session | None = None
    transport: Any
    http: Any = None  # an httpproxy.HttpExchange once a plain HTTP request was handed over
    ping_rtt: int | None = None  # the last round trip of the gate's ping (ms)
    handshake_timer: Any = None

    def connectionMade(self) -> None:
        write_eagerly(self.transport)  # the 101 too
        super().connectionMade()
        no_open_close_futures(self)
        # The request must be complete within handshake_timeout.  Timed on the reactor's clock,
        # not Autobahn's openHandshakeTimeout: txaio batches its timers into whole seconds, so
        # they fire up to a second early.
        gateway = self.factory.gateway
        timeout = gateway.config.limits.handshake_timeout
        if timeout > 0:
            self.handshake_timer = gateway.clock.callLater(timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        """No complete request within handshake_timeout: a rate-limited warning (a slowloris
        is a bad client, and an operator needs to see it), then the connection is dropped."""
        self.handshake_timer = None
        self.wasOpenHandshakeTimeout = True
        peer = self.transport.getPeer()
        self.factory.gateway.warnings.warn(
            "handshake_timeout",
            "client={client} client_port={client_port} received={received}",
            client=getattr(peer, "host", peer),
            client_port=getattr(peer, "port", None),
            received=len(self.data or b""),
        )
        self.dropConnection(abort=True)

    # The request is complete: from here on the backend attempts' own timeouts apply.
    cancel_handshake_timer = _cancel_handshake_timer

    def onConnect(self, request: ConnectionRequest) -> Deferred:  # type: ignore[override]
        # Autobahn accepts a Deferred from onConnect and answers the handshake when it fires.
        self.cancel_handshake_timer()
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: B008
        """
        A client whose TLS handshake failed (a plain HTTP request on the TLS port, an old
        protocol, a scanner) is a bad client, not the gate's error: one rate-limited warning with
        its address, instead of Autobahn's error-level line without it.
        """
        if isinstance(reason.value, SSL.Error):
            gateway = self.factory.gateway
            peer = self.transport.getPeer()
            why = _tls_reason(reason.value)
            gateway.warnings.warn(
                "tls_handshake_failed",
                "client={client} client_port={client_port} reason={reason}",
                client=getattr(peer, "host", peer),
                client_port=getattr(peer, "port", None),
                reason=why,
            )
            reason = Failure(ConnectionLost(f"TLS handshake failed: {why}"))
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.cancel_handshake_timer()
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
            autobahn_receive(self, data)  # Autobahn's, without its per-read debug-log arguments

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
        if responseHeaders is None and self.session is not None:
            responseHeaders = list(self.session.refusal_headers)  # [route.auth]'s challenge
        gateway.handshake_result(str(code))
        # One access-log line per refusal; a session the machine refused has written its own.
        session = self.session
        target = _request_target(self)
        peer = self.transport.getPeer()
        if session is None:
            headers = getattr(self, "http_headers", None) or {}
            gateway.handshake_refused(code, reason, peer, target, headers)
        elif session.state != SessionState.REFUSED:
            gateway.session_refused(session, code, reason)
            session.refused_at_front_door()
        if code >= 500 or code in (400, 429, 431):
            gateway.warnings.warn(
                f"handshake_{code}",
                "client={client} reason={reason}",
                client=getattr(peer, "host", peer),
                reason=redact_text(reason, gateway.config.log, target),
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


def _request_target(leg: ClientLeg) -> str | None:
    """The request target of a refused request, as far as it was read (for its log line)."""
    target: str | None = getattr(leg, "http_request_uri", None)
    if target:
        return target
    line = getattr(leg, "http_status_line", None)
    if line is None:  # refused before Autobahn parsed the head (431)
        line = leg.data[:8192].split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    return parts[1] if len(parts) > 1 else None


class ClientLegFactory(WebSocketServerFactory):
    """Builds a :class:`ClientLeg` per accepted connection; shared by every listener."""

    protocol = ClientLeg

    def __init__(self, gateway: Gateway, connect: Connect) -> None:
        super().__init__(server="wsgate")
        self.gateway = gateway
        self.connect = connect
        self.auth = Authenticator(gateway, gateway.clock)  # a Service: service.py starts it
        limits = gateway.config.limits
        self.backend_legs = BackendLegFactory(limits.close_timeout)
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,
            echoCloseCodeReason=True,
            openHandshakeTimeout=0,  # ClientLeg times the handshake itself
            closeHandshakeTimeout=limits.close_timeout,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            versions=[13],  # RFC 6455 only: other versions get 426 with Sec-WebSocket-Version: 13
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

    __slots__ = (*AUTOBAHN_STATE, *AUTOBAHN_CLIENT_STATE, "refusal", "timed_out")
    log = _QuietLog()
    sendData = send_data

    def dataReceived(self, data: bytes) -> None:
        if len(data) == READ_SIZE:
            read_more(self.transport)
        autobahn_receive(self, data)  # Autobahn's, without its per-read debug-log arguments

    transport: Any
    ping_rtt: int | None = None  # the last round trip of the gate's ping (ms)
    extensions_answer: str | None = None  # the backend's Sec-WebSocket-Extensions, as sent
    handshake_timer: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.timed_out = False
        self.refusal: str | None = None

    def connectionMade(self) -> None:
        write_eagerly(self.transport)  # the upgrade request, which Autobahn writes in super()'s
        super().connectionMade()
        no_open_close_futures(self)
        # The upstream's handshake_timeout, on the reactor's clock (see ClientLeg.connectionMade).
        session = self.factory.session
        timeout = session.upstream.spec.handshake_timeout
        if timeout > 0:
            self.handshake_timer = session.gateway.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.handshake_timer = None
        self.timed_out = True
        self.dropConnection(abort=True)

    cancel_handshake_timer = _cancel_handshake_timer

    @property
    def session(self) -> Session:
        return self.factory.session

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        """The handshake request: the client's path, query, subprotocols and forwarded headers."""
        session, server = self.factory.session, self.factory.server
        request = session.request
        headers = session.forwarded_headers()
        offer = deflate_offers(request.headers.get("sec-websocket-extensions", ""))
        if offer and session.route.compression == "pass":
            headers["Sec-WebSocket-Extensions"] = offer
        return ConnectingRequest(
            host=server.host,
            port=server.port,
            resource=session.target,
            headers=headers,
            useragent=request.headers.get("user-agent", ""),
            origin=request.origin,
            protocols=request.protocols,
        )

    def onOpen(self) -> None:
        self.cancel_handshake_timer()
        self.extensions_answer = self.http_headers.get("sec-websocket-extensions")
        self.session.backend_opened(self)

    def failHandshake(self, reason: str) -> None:
        self.refusal = reason
        super().failHandshake(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.cancel_handshake_timer()
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
            openHandshakeTimeout=0,  # BackendLeg times the handshake itself
            closeHandshakeTimeout=close_timeout,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            # The client's permessage-deflate offer went to the backend as it was; whatever the
            # backend chose goes back to the client unchanged, and the frame engine relays the
            # compressed frames without inflating them.
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )

    def setProtocolOptions(self, **options: Any) -> None:  # type: ignore[override]
        super().setProtocolOptions(**options)
        self.protocol = _options_on_class(BackendLeg, self)

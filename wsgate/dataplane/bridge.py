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
- :class:`Session`: owns both legs; the driver of a
  :class:`~wsgate.core.session.SessionMachine`, which decides (pairing the handshakes, the
  tries, the close policy, the timers, teardown): the Session feeds it what the legs, relays
  and timers report and carries out the commands it returns.

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

Backpressure: each leg's transport has a :class:`_ReadThrottle` registered as its producer, which
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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import PerMessageDeflateResponseAccept
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate.config import ServerSpec
from wsgate.core.auth import Identity, backend_view
from wsgate.core.frames import PING, FrameEngine, close_frame, control_frame, message_frame
from wsgate.core.limits import MessageRate, client_address
from wsgate.core.redact import new_request_id, redact_target, redact_text, sanitize_request_id
from wsgate.core.session import (
    AbortConnection,
    AbortPending,
    Accept,
    AttemptFailed,
    AuthAllowed,
    AuthDenied,
    BackendAccepted,
    BackendConnected,
    BackendFailed,
    CallHook,
    CancelAttempt,
    CancelTimer,
    ClientOpened,
    CloseReceived,
    CloseRequested,
    DismissBackend,
    EndAttempt,
    HandshakeFailed,
    HookAnswered,
    IdleChecked,
    LegLost,
    LoseConnection,
    OpenRelay,
    PongChecked,
    Record,
    Refuse,
    RelayStarted,
    Release,
    Routed,
    SendClose,
    SendPings,
    SessionMachine,
    SessionPolicy,
    SessionRecord,
    SessionState,
    Side,
    StartAttempt,
    StartTimer,
    Stuck,
    Timer,
    TimerFired,
    Violation,
    WarnFailed,
    partner_close,
)
from wsgate.core.upstream import Server
from wsgate.dataplane._compat import (
    AUTOBAHN_CLIENT_STATE,
    AUTOBAHN_SERVER_STATE,
    AUTOBAHN_STATE,
    READ_SIZE,
    autobahn_receive,
    hand_over,
    read_more,
    release_connector,
    release_leg,
    send_data,
    write_eagerly,
)
from wsgate.dataplane.auth import Authenticator, Lifetime, authenticate, start_lifetime
from wsgate.dataplane.backend_failures import connect_failure_reason, handshake_failure_reason
from wsgate.dataplane.gateway import Gateway
from wsgate.dataplane.httpproxy import start_http

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
# Pushed messages (and their bytes) that may wait per session for a fragmented message to end.
PUSH_QUEUE = 64
PUSH_QUEUE_BYTES = 4 * 1024 * 1024
# How much of a message the console's tap sees.
_TAP_PREVIEW = 64

Connect = Callable[[ServerSpec, Any, float], Deferred]
"""Opens a connection to a backend server with a protocol factory and a connect timeout."""

_FORWARDED_AS_IS = ("cookie", "authorization")


@implementer(IPushProducer)
class _ReadThrottle:
    """
    Registered as the producer of one leg's transport: pauses and resumes reading on the other
    leg's transport while this leg's send buffer is over its bound.  When the consuming transport
    goes away, reading resumes instead of the other connection being closed (Twisted would call
    ``stopProducing``): the Session closes it properly, with a Close frame, and it must be able to
    read its peer's answer.  A leg whose buffer stays over the bound for ``send_timeout`` seconds
    is a slow consumer: ``stuck()`` is called (NGINX's ``proxy_send_timeout``).
    """

    __slots__ = ("_transport", "_stuck", "_clock", "_timeout", "_timer", "paused", "pauses")

    def __init__(
        self,
        transport: Any,
        stuck: Callable[[], None] | None = None,
        clock: Any = None,
        timeout: float = 0.0,
    ) -> None:
        self._transport = transport
        self._stuck = stuck
        self._clock = clock
        self._timeout = timeout
        self._timer: Any = None
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self._transport.pauseProducing()
            if self._timeout > 0 and self._stuck is not None:
                self._timer = self._clock.callLater(self._timeout, self._stuck)

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._transport.resumeProducing()
            timer, self._timer = self._timer, None
            if timer is not None and timer.active():
                timer.cancel()

    def stopProducing(self) -> None:
        self.resumeProducing()

    def cancel(self) -> None:
        """No more slow-consumer checks: the session is over (and must not be kept alive)."""
        self._stuck = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class Relay:
    """
    One direction of an open session, in either mode: the source leg's bytes go through a
    :class:`~wsgate.core.frames.FrameEngine` and what it returns is written to the sink leg.  It
    is the source's ``dataReceived`` from both 101s on, and the way the gate writes its own frames
    (Close, Ping) toward the sink: always between two reads, where the engine's output ends at a
    frame boundary.

    ``messages``, ``bytes`` (data payload bytes), ``last`` (time of the last complete message) and
    ``tap`` are read by the registry, the access log, the idle timer and the console.
    """

    __slots__ = (
        "engine", "source", "sink", "session", "partner", "last", "rate", "_clock", "_now",
        "_tap", "_masked", "_pinged", "close_sent", "_pushed", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        engine: FrameEngine,
        source: Any,
        sink: Any,
        session: Session,
        now: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.source = source  # the transport read from
        self.sink = sink  # the transport written to
        self.session = session
        self.partner: Relay | None = None  # the other direction: answers to our pings come there
        self._now = now
        self.last = now()
        self.rate: MessageRate | None = None
        self._clock: Any = None
        self.close_sent: int | None = (
            None  # the code of the Close written to the sink (1005: empty)
        )
        # Called with (is_binary, size, first bytes) after each message while someone taps the
        # session (the console's tap); None otherwise.
        self._tap: Callable[[bool, int, bytes], None] | None = None
        self._masked = engine.from_client  # frames toward a backend are masked
        self._pinged = False  # the gate pinged this relay's source and awaits its pong
        # Pushed messages waiting for the end of the message in flight (see push); None: none.
        self._pushed: deque[bytes] | None = None

    @property
    def tap(self) -> Callable[[bool, int, bytes], None] | None:
        return self._tap

    @tap.setter
    def tap(self, listener: Callable[[bool, int, bytes], None] | None) -> None:
        self._tap = listener
        self.engine.tap = None if listener is None else []

    def limit_rate(self, route: Any, clock: Any) -> None:
        """Hold this direction to the route's messages/s and bytes/s (control frames count too):
        over the budget, pause reading until the second is over (``throttle = true``) or close
        the source with 1008.  The message budget holds to the message (the engine's quota);
        the byte budget to the read."""
        self.rate = MessageRate(
            route.max_messages_per_second, route.max_bytes_per_second, self._now
        )
        self.engine.hold = route.throttle
        self._clock = clock

    def dataReceived(self, data: bytes) -> None:
        if len(data) == READ_SIZE:
            read_more(self.source)
        engine = self.engine
        rate = self.rate
        if rate is not None:
            engine.quota = rate.remaining()
        messages, controls, spent = engine.messages, engine.controls, engine.bytes
        out = engine.receive(data)
        if out:
            self.sink.write(out)
        if self._pushed is not None and not engine.in_message:
            self._write_pushed()
        count = engine.messages - messages + engine.controls - controls
        if count:
            if engine.messages != messages:  # idle means no message: pings do not count
                self.last = self._now()
            if self._pinged and engine.expect_pong is None:
                self._pinged = False
                self.session.pong_received(self)
            if engine.tap:
                self._tell_tap()
            if rate is not None:
                self._spend(rate, count, engine.bytes - spent)
        if engine.held:
            assert rate is not None
            self._pause(rate.wait())
        if engine.done:
            self.session.relay_done(self)

    def _tell_tap(self) -> None:
        tapped, self.engine.tap = self.engine.tap or [], []
        for binary, size, first in tapped:
            if self._tap is not None:
                self._tap(binary, size, first)

    def _spend(self, rate: MessageRate, count: int, size: int) -> None:
        wait = rate.spend(size, count)
        engine = self.engine
        if not wait or engine.done or engine.held:
            return
        if engine.hold:
            self._pause(wait)
        else:
            engine.done = True
            engine.failed = (1008, "byte rate limit exceeded")

    def _pause(self, wait: float) -> None:
        """Stop reading the source until the rate's window is over, then go on where it stopped."""
        self.source.pauseProducing()
        self._clock.callLater(wait, self._resume)

    def _resume(self) -> None:
        if not self.engine.done:
            self.source.resumeProducing()
            self.dataReceived(b"")

    # -- the gate's own frames toward the sink -------------------------------------------------------

    def send_close(self, code: int | None, reason: str) -> None:
        """Send the sink a Close (once; nothing more goes to it afterwards)."""
        if self.engine.sink_open:
            self.engine.sink_open = False
            self.close_sent = 1005 if code is None else code
            self.sink.write(close_frame(code, reason, self._masked))

    def push(self, payload: bytes, binary: bool) -> bool:
        """
        Send the sink a whole message of the gate's own (the control API's push), in either mode:
        now when the relayed stream is between two messages (True), else queued until the
        fragmented message in flight ends (False), since a data frame in the middle of another
        message would break it.  ValueError when the sink is closing; OverflowError when
        :data:`PUSH_QUEUE` messages or :data:`PUSH_QUEUE_BYTES` already wait.
        """
        if not self.engine.sink_open:
            raise ValueError("the session is closing")
        frame = message_frame(payload, binary, self._masked)
        if self._pushed is None and not self.engine.in_message:
            self.sink.write(frame)
            return True
        pushed = self._pushed if self._pushed is not None else deque()
        if len(pushed) >= PUSH_QUEUE or sum(map(len, pushed)) + len(frame) > PUSH_QUEUE_BYTES:
            raise OverflowError("too many pushed messages wait for the message in flight")
        pushed.append(frame)
        self._pushed = pushed
        return False

    def _write_pushed(self) -> None:
        pushed, self._pushed = self._pushed or (), None
        if self.engine.sink_open:
            self.sink.write(b"".join(pushed))

    def ping(self, payload: bytes) -> None:
        """Ping the sink; its answer comes through the partner and is consumed there."""
        if self.engine.sink_open and self.partner is not None:
            self.partner.engine.expect_pong = payload
            self.partner._pinged = True
            self.sink.write(control_frame(PING, payload, self._masked))

    @property
    def awaiting_pong(self) -> bool:
        """Whether the sink has not yet answered the gate's last ping (and can still be sent to)."""
        partner = self.partner
        return (
            partner is not None
            and partner.engine.expect_pong is not None
            and self.engine.sink_open
            and not partner.engine.done
        )

    @property
    def messages(self) -> int:
        return self.engine.messages

    @property
    def bytes(self) -> int:  # last in the class: the name would shadow the type in annotations
        return self.engine.bytes


class Session:
    """
    The driver of one session: feeds its :class:`~wsgate.core.session.SessionMachine` the
    events of both legs, the relays and the timers, and carries out the commands it returns
    through Autobahn and Twisted.  See the module docstring for the states.
    """

    log = Logger()
    __slots__ = (
        "id", "gateway", "client", "request", "backend", "server", "route_path", "subprotocol",
        "machine", "started", "opened_at", "up", "down", "throttles", "_connect", "_attempt",
        "_pending", "_handshake", "_timers", "extensions", "_ping_sent",
        "peer_address", "client_address", "client_port", "_admitted", "tls", "target", "route",
        "upstream", "request_id", "__weakref__",
        "added_headers", "auth", "lifetime", "refusal_headers",
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
        self.machine = SessionMachine()
        self.started = gateway.clock.seconds()
        self.opened_at: float | None = (
            None  # when the backend accepted (connect time = this - started)
        )
        # client -> backend and backend -> client, from both 101s on
        self.up: Relay | None = None
        self.down: Relay | None = None
        self.throttles: tuple[_ReadThrottle, _ReadThrottle] | None = None
        self._connect = connect
        self._attempt: Deferred | None = None  # the connect or webhook call in progress
        self._pending: BackendLeg | None = None  # the backend leg whose handshake runs
        self._handshake: Deferred | None = None
        self._timers: dict[Timer, Any] = {}
        self.extensions: str | None = None  # the backend's Sec-WebSocket-Extensions answer
        self._ping_sent = 0.0
        peer = client.transport.getPeer()
        self.peer_address = str(getattr(peer, "host", peer))
        self.client_address = client_address(
            self.peer_address, request.headers.get("x-forwarded-for"), gateway.config.limits
        )
        self.client_port = getattr(peer, "port", None)
        self._admitted = False
        self.tls = ISSLTransport.providedBy(client.transport)
        self.target = client.http_request_uri
        self.request_id = (
            sanitize_request_id(request.headers.get("x-request-id")) or new_request_id()
        )
        self.added_headers: dict[str, str] | None = None  # by the on_connect webhook
        self.auth: Identity | None = None  # who [route.auth] found the client to be
        self.lifetime: Lifetime | None = None  # credential expiry and max_session_age timers
        self.refusal_headers: tuple[tuple[str, str], ...] = ()  # e.g. WWW-Authenticate

    @property
    def state(self) -> SessionState:
        return self.machine.state

    @property
    def closed_by(self) -> str | None:
        return self.machine.closed_by

    @property
    def client_close(self) -> str | None:
        return self.machine.client_close

    @property
    def backend_close(self) -> str | None:
        return self.machine.backend_close

    def _feed(self, event: object) -> None:
        """Hand the machine an event and carry out its commands, in order."""
        for command in self.machine.handle(event):
            getattr(self, "_do_" + type(command).__name__)(command)

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
        self.upstream = upstream = self.gateway.upstreams[route.upstream]
        limits = gateway.config.limits
        policy = SessionPolicy(
            tries=upstream.spec.tries,
            try_timeout=upstream.spec.try_timeout,
            auth=route.auth is not None,
            hook=route.on_connect is not None,
            mode=route.mode,
            idle_timeout=route.idle_timeout,
            ping_interval=route.ping_interval,
            ping_timeout=route.ping_timeout,
            close_timeout=limits.close_timeout,
            send_timeout=limits.send_timeout,
        )
        handshake = self._handshake = Deferred()
        self._feed(Routed(policy, self._pick))
        if route.auth is not None:  # calls back authenticated() or deny()
            authenticate(self, self.client.factory.auth)
        return handshake

    def _pick(self, tried: list[Server]) -> Server | None:
        request = self.request
        return self.upstream.pick(
            tried, client=self.client_address, headers=request.headers, params=request.params
        )

    def authenticated(self, identity: Identity) -> None:
        """[route.auth] accepted the client: the backend gets the identity's headers (and the
        credential only with forward_token)."""
        self.auth = identity
        if not identity.forward:
            self.target = backend_view(identity.source, {}, self.target or "/")[1]
        self._feed(AuthAllowed())

    def deny(
        self, status: int, reason: str, client_reason: str, headers: tuple[tuple[str, str], ...]
    ) -> None:
        """[route.auth] refused the client: ``status`` with ``headers``; ``reason`` is logged."""
        self.refusal_headers = headers
        self._feed(AuthDenied(status, reason, client_reason))

    def _do_CallHook(self, command: CallHook) -> None:
        # The webhook's call is the first attempt: a client that leaves cancels it.
        hooks = self.gateway.webhooks
        assert hooks is not None, "service.py gives the gateway its webhooks"
        hook = self.route.on_connect
        assert hook is not None
        call = hooks.on_connect(hook, self.describe(), self.request, self.target)
        self._attempt = call  # before the callback, which may run at once and replace it
        call.addCallback(self._connect_hook_answered)

    def _connect_hook_answered(self, verdict: dict[str, str] | tuple[int, str]) -> None:
        """The on_connect webhook allowed (headers to add) or refused (status, reason)."""
        self._attempt = None
        if isinstance(verdict, tuple):
            self._feed(HookAnswered(verdict))
        else:
            if self.state == SessionState.CONNECTING:
                self.added_headers = verdict
            self._feed(HookAnswered(None))

    def _do_StartAttempt(self, command: StartAttempt) -> None:
        server = command.server
        self.upstream.attempt_started(server)
        factory = _BackendRequest(self.client.factory.backend_legs, self, server)
        attempt = self._attempt = self._connect(
            server.spec, factory, self.upstream.spec.connect_timeout
        )
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, leg: BackendLeg) -> None:
        self._attempt = None
        self._pending = leg
        self._feed(BackendConnected())

    def _connect_failed(self, reason: Failure) -> None:
        self._attempt = None
        if self.state != SessionState.CONNECTING:
            return
        why = connect_failure_reason(reason)
        if reason.check(TimeoutError):
            self._feed(AttemptFailed(504, "backend connect timed out", why))
        else:
            message = f"backend connect failed: {reason.getErrorMessage()}"
            self._feed(AttemptFailed(502, message, why))

    def _do_EndAttempt(self, command: EndAttempt) -> None:
        self.upstream.attempt_ended(command.server, command.ok)

    def _do_BackendFailed(self, command: BackendFailed) -> None:
        self.gateway.backend_failed(self.upstream.name, command.server.url, command.why)
        if command.logged:
            self.log.warn(
                "backend_attempt_failed {session_id} server={server} status={status} "
                "reason={reason}",
                session_id=self.id,
                server=command.server.url,
                status=command.status,
                reason=command.reason,
            )

    def _do_CancelAttempt(self, command: CancelAttempt) -> None:
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()

    def _do_AbortPending(self, command: AbortPending) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.transport.abortConnection()

    def _do_Refuse(self, command: Refuse) -> None:
        self.gateway.session_refused(self, command.status, command.reason)
        if self._handshake is not None:
            d, self._handshake = self._handshake, None
            d.errback(Failure(ConnectionDeny(command.status, command.client_reason)))

    def backend_opened(self, leg: BackendLeg) -> None:
        """The backend accepted: answer the client's handshake with the backend's subprotocol and
        its answer to the client's permessage-deflate offer."""
        self._pending = leg  # until the machine accepts or dismisses it
        self._feed(BackendAccepted())

    def _do_DismissBackend(self, command: DismissBackend) -> None:
        leg, self._pending = self._pending, None
        assert leg is not None
        leg.sendCloseFrame(1001, b"client went away")

    def _do_Accept(self, command: Accept) -> None:
        leg, self._pending = self._pending, None
        assert leg is not None and self.server is None
        self.backend = leg
        self.opened_at = self.gateway.clock.seconds()
        self.server = command.server
        self.server.active += 1
        self.server.sessions_total += 1
        self.subprotocol = leg.websocket_protocol_in_use
        self.extensions = leg.extensions_answer
        d, self._handshake = self._handshake, None
        assert d is not None
        if self.extensions:
            d.callback((self.subprotocol, {"Sec-WebSocket-Extensions": self.extensions}))
        else:
            d.callback(self.subprotocol)

    def backend_handshake_failed(self, leg: BackendLeg) -> None:
        """A backend connection ended before its handshake completed."""
        if leg is not self._pending:
            return
        self._pending = None
        if self.state != SessionState.CONNECTING:
            return
        if leg.timed_out:
            status, reason = 504, "backend handshake timed out"
        elif leg.refusal is not None:
            status, reason = 502, f"backend refused the handshake: {leg.refusal}"
        else:
            status, reason = (
                502,
                f"backend connection lost during handshake: {leg.wasNotCleanReason}",
            )
        why = handshake_failure_reason(
            leg.timed_out, leg.refusal, getattr(leg, "http_status_line", None)
        )
        self._feed(AttemptFailed(status, reason, why))

    def client_opened(self) -> None:
        """The client got its 101: the relays take both legs' bytes (:meth:`_do_OpenRelay`)."""
        self._feed(ClientOpened())
        if self.gateway.closing:
            self.close(1001, "gateway shutting down")
        self._feed(RelayStarted())
        self.lifetime = start_lifetime(self)

    def _do_OpenRelay(self, command: OpenRelay) -> None:
        """
        From now on each leg's bytes go to a :class:`Relay` and its frame engine instead of
        Autobahn, including what Autobahn had already read past the handshake.
        """
        client, backend = self.client, self.backend
        assert backend is not None
        route = self.route
        now = self.gateway.clock.seconds
        deflate = "permessage-deflate" in (self.extensions or "")
        engines = [
            FrameEngine(
                from_client,
                validate_utf8=route.mode == "message",
                deflate=deflate,
                max_message=route.max_message_size,
                max_frame=route.max_frame_size,
            )
            for from_client in (True, False)
        ]
        up = Relay(engines[0], client.transport, backend.transport, self, now)
        down = Relay(engines[1], backend.transport, client.transport, self, now)
        up.partner, down.partner = down, up
        self.up, self.down = up, down
        if route.max_messages_per_second or route.max_bytes_per_second:
            up.limit_rate(route, self.gateway.clock)
        clock, send_timeout = self.gateway.clock, self.gateway.config.limits.send_timeout
        self.throttles = (
            _ReadThrottle(backend.transport, self._client_stuck, clock, send_timeout),
            _ReadThrottle(client.transport, self._backend_stuck, clock, send_timeout),
        )
        client.transport.registerProducer(self.throttles[0], True)
        backend.transport.registerProducer(self.throttles[1], True)
        write_eagerly(client.transport)
        write_eagerly(backend.transport)
        for leg, relay in ((client, up), (backend, down)):
            hand_over(leg, relay.dataReceived)
        cast(Any, backend).http_headers = None  # the backend's parsed response headers
        self.gateway.handshake_result("ok")
        self.gateway.session_opened(self)
        for leg, relay in ((client, up), (backend, down)):
            early, leg.data = leg.data, b""
            if early and not relay.engine.done:
                relay.dataReceived(early)

    # -- relay events ---------------------------------------------------------------------------

    def relay_done(self, relay: Relay) -> None:
        """A direction's source sent a Close (already forwarded), or broke a rule or a limit."""
        side: Side = "client" if relay is self.up else "backend"
        engine = relay.engine
        if engine.failed is not None:
            self._feed(Violation(side, *engine.failed))
            return
        assert engine.closed is not None
        if engine.forwarded_close:
            relay.close_sent = 1005 if engine.closed[0] is None else engine.closed[0]
        self._feed(CloseReceived(side, *engine.closed, engine.forwarded_close))

    def _client_stuck(self) -> None:
        self._feed(Stuck("client"))

    def _backend_stuck(self) -> None:
        self._feed(Stuck("backend"))

    def _relay_toward(self, side: Side) -> Relay | None:
        """The relay that writes to ``side``'s peer."""
        return self.down if side == "client" else self.up

    def _leg(self, side: Side) -> Any:
        return self.client if side == "client" else self.backend

    def _do_WarnFailed(self, command: WarnFailed) -> None:
        """The gate failed one leg (protocol error, limit): logged, rate limited."""
        self.gateway.warnings.warn(
            "session_failed",
            "{session_id} {side} {client} code={code} reason={reason}",
            session_id=self.id,
            side=command.side,
            client=self.client_address,
            code=command.code,
            reason=command.reason,
        )

    def _do_SendClose(self, command: SendClose) -> None:
        relay = self._relay_toward(command.side)
        if relay is not None:
            relay.send_close(command.code, command.reason)

    def _do_LoseConnection(self, command: LoseConnection) -> None:
        leg = self._leg(command.side)
        if leg is not None and leg.transport is not None:
            leg.transport.loseConnection()

    def _do_AbortConnection(self, command: AbortConnection) -> None:
        leg = self._leg(command.side)
        if leg is not None and leg.transport is not None:
            leg.transport.abortConnection()

    def _do_SendPings(self, command: SendPings) -> None:
        for relay in (self.down, self.up):
            assert relay is not None
            relay.ping(command.payload)
        self._ping_sent = self.gateway.clock.seconds()

    def pong_received(self, relay: Relay) -> None:
        """The peer ``relay`` reads from answered the gate's ping: keep the round trip (ms)."""
        leg = self.client if relay is self.up else self.backend
        if leg is not None:
            leg.ping_rtt = round((self.gateway.clock.seconds() - self._ping_sent) * 1000)

    # -- timers ---------------------------------------------------------------------------------

    def _do_StartTimer(self, command: StartTimer) -> None:
        self._timers[command.timer] = self.gateway.clock.callLater(
            command.delay, self._timer_fired, command.timer
        )

    def _do_CancelTimer(self, command: CancelTimer) -> None:
        call = self._timers.pop(command.timer, None)
        if call is not None and call.active():
            call.cancel()

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        if timer == Timer.IDLE:
            assert self.up is not None and self.down is not None
            last = max(self.up.last, self.down.last)
            self._feed(IdleChecked(last, self.gateway.clock.seconds()))
        elif timer == Timer.PONG:
            silent: Side | None = None
            for side, relay in (("client", self.down), ("backend", self.up)):
                assert relay is not None
                if relay.awaiting_pong:
                    silent = cast(Side, side)
                    break
            self._feed(PongChecked(silent))
        else:
            self._feed(TimerFired(timer))

    # -- closing ------------------------------------------------------------------------------

    def push(self, payload: bytes, binary: bool) -> bool:
        """Send the client a message of the gate's own (see :meth:`Relay.push`)."""
        if self.state != SessionState.OPEN or self.down is None:
            raise ValueError(f"session {self.id} is not open ({self.state})")
        return self.down.push(payload, binary)

    def close(self, code: int = 1001, reason: str = "", by: str = "gate") -> None:
        """Close both legs: ``code`` and ``reason`` to the client, 1001 and ``reason`` to the backend."""
        self._feed(CloseRequested(code, reason, by))

    def leg_lost(self, leg: WebSocketProtocol) -> None:
        """The connection of ``leg`` is gone."""
        self._feed(LegLost("client" if leg is self.client else "backend"))

    def _do_Release(self, command: Release) -> None:
        """The session is over: its admission slot and the helpers the machine does not time."""
        if self._admitted:
            self._admitted = False
            self.gateway.admission.release(self.client_address)
        for throttle in self.throttles or ():
            throttle.cancel()
        if self.lifetime is not None:
            self.lifetime.cancel()
        self.gateway.clock.callLater(0, self._forget)

    def _do_Record(self, command: Record) -> None:
        if command.kind == "closed":
            if self.server is not None:
                self.server.active -= 1
            self.gateway.session_closed(self.record())

    def _forget(self) -> None:
        """
        Break the reference cycles of a finished session, so that reference counting frees it and
        both its connections at once.  Left to the cycle collector, every session would be freed
        only by a full collection, whose pause grows with the number of live sessions.  Runs a
        reactor turn after the end, once no connectionLost of either leg is still on the stack;
        the Session itself keeps what the registry and the console read.
        """
        for relay in (self.up, self.down):
            if relay is not None:
                relay.partner = relay.session = None  # type: ignore[assignment]
        for leg in (self.client, self.backend):
            if leg is not None:
                release_leg(leg)
        self.client.session = None
        if self.backend is not None:
            self.backend.factory.session = None
            release_connector(self.backend.transport)

    # -- what the registry, access log and console show -----------------------------------------

    def client_close_code(self) -> int:
        """The close code the client saw: its own when it closed first, else the one it was sent
        (1005 for an empty Close), 1006 when neither side's Close reached it."""
        up, down = self.up, self.down
        if up is None or down is None:
            return 1006
        if self.closed_by == "client" and up.engine.closed is not None:
            code = up.engine.closed[0]
            return 1005 if code is None else code
        return 1006 if down.close_sent is None else down.close_sent

    def record(self) -> SessionRecord:
        """The frozen record of a finished session that the gateway keeps figures and logs of."""
        up, down = self.up, self.down
        upstream = getattr(self, "upstream", None)
        return SessionRecord(
            id=self.id,
            route=getattr(self, "route", None),
            route_path=self.route_path,
            upstream=upstream.name if upstream is not None else "",
            server=self.server.url if self.server is not None else "",
            started=self.started,
            client_code=self.client_close_code(),
            messages_up=up.messages if up else 0,
            bytes_up=up.bytes if up else 0,
            messages_down=down.messages if down else 0,
            bytes_down=down.bytes if down else 0,
            row=self.describe(),
        )

    def describe(self) -> dict[str, Any]:
        """
        The fields the access log, the registry and the console show (the query string redacted
        as ``[log]`` says).  ``client_code``/``client_reason`` (``backend_...``): the Close that
        ended that leg, its peer's own or the one the gate failed it with; None when it dropped
        (and the code None for an empty Close).
        """
        now = self.gateway.clock.seconds()
        up, down = self.up, self.down
        client_end = (up.engine.failed or up.engine.closed) if up else None
        backend_end = (down.engine.failed or down.engine.closed) if down else None
        upstream = getattr(self, "upstream", None)
        return {
            "session_id": self.id,
            "client": self.client_address,
            "client_port": self.client_port,
            "route": self.route_path,
            "upstream": upstream.name if upstream is not None else None,
            "server": self.server.url if self.server else None,
            "tried": [server.url for server in self.machine.tried],
            "path": redact_target(self.target, self.gateway.config.log),
            "request_id": self.request_id,
            "subprotocol": self.subprotocol,
            "extensions": self.extensions,
            "tls": self.tls,
            "started": self.started,
            "duration": now - self.started,
            "idle": now - max(up.last, down.last) if up and down else 0.0,
            "messages_up": up.messages if up else 0,
            "bytes_up": up.bytes if up else 0,
            "messages_down": down.messages if down else 0,
            "bytes_down": down.bytes if down else 0,
            "client_close": self.client_close,
            "client_code": client_end[0] if client_end else None,
            "client_reason": client_end[1] if client_end else None,
            "backend_close": self.backend_close,
            "backend_code": backend_end[0] if backend_end else None,
            "backend_reason": backend_end[1] if backend_end else None,
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
        headers["X-Request-ID"] = self.request_id
        if self.auth is not None:
            if not self.auth.forward:
                headers = backend_view(self.auth.source, headers, "")[0]
            headers.update(self.auth.headers)
        if self.added_headers:
            headers.update(self.added_headers)
        return headers


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
        super().connectionMade()
        # The request must be complete within handshake_timeout.  Timed on the reactor's clock,
        # not Autobahn's openHandshakeTimeout: txaio batches its timers into whole seconds, so
        # they fire up to a second early.
        gateway = self.factory.gateway
        timeout = gateway.config.limits.handshake_timeout
        if timeout > 0:
            self.handshake_timer = gateway.clock.callLater(timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self.handshake_timer = None
        self.wasOpenHandshakeTimeout = True
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
        # One access-log line per refusal; a session refused by _refuse has written its own.
        session = self.session
        target = _request_target(self)
        peer = self.transport.getPeer()
        if session is None:
            headers = getattr(self, "http_headers", None) or {}
            gateway.handshake_refused(code, reason, peer, target, headers)
        elif session.state != SessionState.REFUSED:
            gateway.session_refused(session, code, reason)
            session.machine.handle(HandshakeFailed())
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
        super().connectionMade()
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
        return leg

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

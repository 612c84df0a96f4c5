"""
The driver of one session: :class:`Session` feeds its
:class:`~wsgate.core.session.SessionMachine` what the legs, the relays and the timers report, and
carries out the commands the machine returns through Autobahn and Twisted (connect to a server,
answer or refuse the client's handshake, set up the relays, write Closes and Pings, drop
connections, run timers, tell the gateway).

Owns the I/O of a session and what the registry, access log and console read of it (``describe``,
the forwarded headers, the frozen record of a finished session).  Must not decide: which server,
when to give up, who is sent which Close and when to drop a connection are the machine's (see
``bridge.py``'s docstring for the theory of operation).  Over 500 lines because each of the
machine's ~25 commands has its small ``_do_`` method here, beside the handshake and relay set-up
it drives; split by concern, they would all reach into the same per-session state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate.config import ServerSpec
from wsgate.core.auth import Identity, backend_view
from wsgate.core.frames import FrameEngine
from wsgate.core.limits import client_address
from wsgate.core.redact import new_request_id, redact_target, sanitize_request_id
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
)
from wsgate.core.upstream import Server
from wsgate.dataplane._compat import (
    hand_over,
    read_through,
    release_connector,
    release_leg,
    unwrap_endpoint,
)
from wsgate.dataplane.auth import Lifetime, authenticate, start_lifetime
from wsgate.dataplane.backend_failures import connect_failure_reason, handshake_failure_reason
from wsgate.dataplane.gateway import Gateway
from wsgate.dataplane.relay import ReadThrottle, Relay
from wsgate.net.tls import tls_facts

if TYPE_CHECKING:
    from wsgate.dataplane.auth import Authenticator

__all__ = ["BackendSide", "ClientSide", "Connect", "Session"]

Connect = Callable[[ServerSpec, Any, float], Deferred]
"""Opens a connection to a backend server with a protocol factory and a connect timeout."""

# What a session uses of its two legs and of the front door's factory.  The legs
# (:mod:`wsgate.dataplane.bridge`) build sessions, so this module names interfaces, not classes.


class _Leg(Protocol):
    transport: Any
    data: bytes  # what Autobahn had read past the handshake
    ping_rtt: int | None

    @property
    def wasNotCleanReason(self) -> str | None: ...


class BackendSide(_Leg, Protocol):
    """A backend connection whose handshake this session runs (bridge.py's ``BackendLeg``)."""

    factory: _BackendRequest

    @property
    def refusal(self) -> str | None: ...

    @property
    def timed_out(self) -> bool: ...

    @property
    def websocket_protocol_in_use(self) -> str | None: ...

    @property
    def extensions_answer(self) -> str | None: ...

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None) -> None: ...


class _FrontDoor(Protocol):
    auth: Authenticator
    backend_legs: _LegMaker


class _LegMaker(Protocol):
    def protocol(self) -> BackendSide:
        """A new backend leg."""


class ClientSide(_Leg, Protocol):
    """The client's connection (bridge.py's ``ClientLeg``)."""

    factory: _FrontDoor
    http_request_uri: str
    session: Session | None


_FORWARDED_AS_IS = ("cookie", "authorization")


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
        "peer_address", "client_address", "client_port", "_admitted", "tls", "tls_version", "sni", "target", "route",
        "upstream", "request_id", "__weakref__",
        "added_headers", "auth", "lifetime", "refusal_headers",
    )  # fmt: skip

    def __init__(
        self, gateway: Gateway, connect: Connect, client: ClientSide, request: ConnectionRequest
    ) -> None:
        self.id = gateway.new_session_id()
        self.gateway = gateway
        self.client = client
        self.request = request
        self.backend: BackendSide | None = None
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
        self.throttles: tuple[ReadThrottle, ReadThrottle] | None = None
        self._connect = connect
        self._attempt: Deferred | None = None  # the connect or webhook call in progress
        self._pending: BackendSide | None = None  # the backend leg whose handshake runs
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
        self.tls_version, self.sni = tls_facts(client.transport)
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

    def _pick(self, tried: tuple[Server, ...]) -> Server | None:
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

    def refused_at_front_door(self) -> None:
        """Autobahn failed the client's handshake (its log line is written): the attempt in
        progress, if any, is abandoned, so that no backend's 101 can follow."""
        self._feed(HandshakeFailed())

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

    def _connected(self, leg: BackendSide) -> None:
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

    def backend_opened(self, leg: BackendSide) -> None:
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

    def backend_handshake_failed(self, leg: BackendSide) -> None:
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
            ReadThrottle(backend.transport, self, "client", clock, send_timeout),
            ReadThrottle(client.transport, self, "backend", clock, send_timeout),
        )
        client.transport.registerProducer(self.throttles[0], True)
        backend.transport.registerProducer(self.throttles[1], True)
        unwrap_endpoint(backend.transport, backend)
        for leg, relay in ((client, up), (backend, down)):
            hand_over(leg, relay.dataReceived)
            read_through(relay.source, relay.read)
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

    def stuck(self, side: Side) -> None:
        """``side``'s peer takes nothing (its read throttle's ``send_timeout``)."""
        self._feed(Stuck(side))

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

    def leg_lost(self, leg: ClientSide | BackendSide) -> None:
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
        elif command.kind == "abandoned":  # NGINX's 499: every admitted request has its line
            self.gateway.session_refused(self, 499, "client left before the backend answered")

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
            "tls_version": self.tls_version,
            "sni": self.sni,
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


class _BackendRequest:
    """
    The factory one session connects to one server through: ``buildProtocol`` makes a BackendLeg
    whose ``factory`` is this view, so Autobahn reads the session's subprotocols and timeouts here
    (the handshake request itself comes from ``BackendLeg.onConnecting``) and everything else from
    the shared :class:`BackendLegFactory`.
    """

    isServer = False
    __slots__ = ("_shared", "session", "server", "protocols")

    def __init__(self, shared: _LegMaker, session: Session, server: Server) -> None:
        self._shared = shared
        self.session: Session | None = session
        self.server = server.spec
        self.protocols = session.request.protocols

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    def buildProtocol(self, addr: Any) -> BackendSide:
        leg: BackendSide = self._shared.protocol()
        leg.factory = self
        return leg

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

"""
The life of one gateway session as a state machine without I/O: events in, commands out.

Owns the decisions of a session's opening (routing admitted, auth, the on_connect webhook, the
backend attempts with their tries and ``try_timeout``, pairing the backend's 101 with the
client's) and of its closing (who is sent which Close, when a connection is dropped, the idle,
ping and close timers, teardown).  Must not do I/O, hold a socket, a Deferred or a timer handle,
nor import Twisted or Autobahn: :class:`wsgate.dataplane.session.Session` is the driver that feeds
it events and carries its commands out.

States::

    CONNECTING --BackendAccepted--> OPEN --Close, violation, loss, kick--> CLOSING --both lost--> CLOSED
      |  |                                                                                     ^
      |  +--route, auth, webhook, servers or try_timeout refuse--> REFUSED --client lost--------+
      |                                                            ^
      +--client lost, or try_timeout, during an attempt--> ABANDONING (while it is cancelled)

A client that leaves during the opening, or that the front door refuses (``HandshakeFailed``:
Autobahn's own checks), moves CONNECTING (or ABANDONING) to REFUSED, and the loss of the client's
connection moves REFUSED to CLOSED.  Every event the machine does not expect in its state is
ignored (a late answer of a cancelled attempt, a timer that fired as it was cancelled).

Over 500 lines because the machine's vocabulary, about 45 events and commands that are each a
small frozen dataclass, sits beside the machine, so that a reader sees every input and output of
one decision in one file.

The close policy (:func:`partner_close`) is in the table of ``bridge.py``'s docstring.  Timers are
named (:class:`Timer`); the machine knows which run, and cancels each on every way out.  Each
session has exactly one access record: its :class:`Refuse`, the front door's refusal, its
``Record("closed")``, or ``Record("abandoned")`` for a client that left before any answer (the
driver writes it as a ``session_refused`` line with status 499, NGINX's "client closed request").
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CLIENT_REASONS",
    "SessionMachine",
    "SessionPolicy",
    "SessionRecord",
    "SessionState",
    "Timer",
    "describe_close",
    "other",
    "partner_close",
]

Side = Literal["client", "backend"]


class SessionState(enum.StrEnum):
    """A session's state; its value is the name the console and status pages show."""

    CONNECTING = "CONNECTING"
    ABANDONING = "ABANDONING"
    REFUSED = "REFUSED"
    OPEN = "OPEN"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class Timer(enum.StrEnum):
    TRY = "try"  # try_timeout: every backend attempt (and the webhook) within it
    IDLE = "idle"  # idle_timeout: no message either way
    PING = "ping"  # ping_interval: the next keepalive ping
    PONG = "pong"  # ping_timeout: the answer to the last ping is due
    CLOSE = "close"  # close_timeout: a close has started, both legs must be gone by then


# What the client is told when no server answered: backend names and TLS errors stay in the log.
CLIENT_REASONS = {
    502: "No backend server accepted the session",
    503: "No backend server available",
    504: "No backend server answered in time",
}


def other(side: Side) -> Side:
    return "backend" if side == "client" else "client"


def partner_close(side: str, kind: str, code: int | None, reason: str) -> tuple[int | None, str]:
    """
    The close code and reason to send to the partner of the leg on ``side`` (``"client"`` or
    ``"backend"``) that ended in the way ``kind`` says:

    - ``"close"``: its peer sent a Close with ``code`` (None for an empty Close) and ``reason``;
    - ``"failed"``: the gate failed that leg itself with ``code`` (protocol error, invalid UTF-8,
      message too big);
    - ``"dropped"``: the connection went away without a Close (in tunnel mode a backend that
      goes away by itself takes the client's connection with it instead, see ``LegLost``).

    See the table in ``bridge.py``'s docstring.
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


def describe_close(kind: str, code: int | None, reason: str) -> str:
    """How a leg ended, as the access log's ``client_close``/``backend_close`` show it."""
    if kind == "dropped":
        return "dropped"
    text = "empty" if code is None else str(code)
    if reason:
        text += f" {reason!r}"
    return f"{text} (gate)" if kind == "failed" else text


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What the route, its upstream and the limits decide for one session."""

    tries: int = 1
    try_timeout: float = 10.0
    auth: bool = False  # [route.auth]: wait for AuthAllowed or AuthDenied
    hook: bool = False  # on_connect: the first attempt is the webhook's call
    mode: str = "message"
    idle_timeout: float = 0.0
    ping_interval: float = 0.0
    ping_timeout: float = 0.0
    close_timeout: float = 5.0
    send_timeout: float = 0.0


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Routed:
    """The request has a route and was admitted; ``pick(tried)`` chooses the next server or None."""

    policy: SessionPolicy
    pick: Callable[[tuple[Any, ...]], Any]


@dataclass(frozen=True)
class AuthAllowed:
    pass


@dataclass(frozen=True)
class AuthDenied:
    status: int
    reason: str
    client_reason: str


@dataclass(frozen=True)
class HookAnswered:
    """The on_connect webhook allowed (``refusal`` None) or refused with (status, reason)."""

    refusal: tuple[int, str] | None


@dataclass(frozen=True)
class BackendConnected:
    """The attempt's connection is made; its handshake runs."""


@dataclass(frozen=True)
class AttemptFailed:
    """The attempt in progress failed (connect or handshake); ``why`` is its metrics reason."""

    status: int
    reason: str
    why: str


@dataclass(frozen=True)
class BackendAccepted:
    """The backend answered 101."""


@dataclass(frozen=True)
class HandshakeFailed:
    """The client's handshake failed at the front door (Autobahn's failHandshake), logged there."""


@dataclass(frozen=True)
class ClientOpened:
    """The client got its 101."""


@dataclass(frozen=True)
class RelayStarted:
    """Both relays run (and what was read early went through them)."""


@dataclass(frozen=True)
class CloseReceived:
    """A valid Close came from ``side``; ``forwarded`` when it went on to the other side."""

    side: Side
    code: int | None
    reason: str
    forwarded: bool


@dataclass(frozen=True)
class Violation:
    """``side`` broke the frame rules or a limit: it is sent ``code``."""

    side: Side
    code: int
    reason: str


@dataclass(frozen=True)
class Stuck:
    """``side`` has not read what the gate holds for it for send_timeout."""

    side: Side


@dataclass(frozen=True)
class CloseRequested:
    """An operator's or the gate's close (kick, shutdown, drain): ``code`` to the client."""

    code: int
    reason: str
    by: str


@dataclass(frozen=True)
class LegLost:
    side: Side


@dataclass(frozen=True)
class TimerFired:
    timer: Timer


@dataclass(frozen=True)
class IdleChecked:
    """The idle timer fired: the last message either way was at ``last``; it is ``now``."""

    last: float
    now: float


@dataclass(frozen=True)
class PongChecked:
    """The pong timer fired: ``silent`` has not answered the last ping (None: both did)."""

    silent: Side | None


# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartAttempt:
    server: Any


@dataclass(frozen=True)
class CallHook:
    pass


@dataclass(frozen=True)
class EndAttempt:
    """Tell the upstream how the attempt on ``server`` ended: True, False, None (abandoned)."""

    server: Any
    ok: bool | None


@dataclass(frozen=True)
class BackendFailed:
    server: Any
    status: int
    reason: str
    why: str
    logged: bool = True


@dataclass(frozen=True)
class CancelAttempt:
    """Cancel the connect (or the webhook call) in progress."""


@dataclass(frozen=True)
class AbortPending:
    """Abort the half-open backend connection (its handshake runs)."""


@dataclass(frozen=True)
class Refuse:
    status: int
    reason: str  # logged
    client_reason: str  # sent to the client


@dataclass(frozen=True)
class Accept:
    """Answer the client with the backend's subprotocol and extensions; ``server`` holds it."""

    server: Any


@dataclass(frozen=True)
class DismissBackend:
    """A backend that answered 101 for a client that is gone: Close 1001."""


@dataclass(frozen=True)
class OpenRelay:
    pass


@dataclass(frozen=True)
class SendClose:
    """Send ``side`` a Close of the gate's own (once)."""

    side: Side
    code: int | None
    reason: str


@dataclass(frozen=True)
class LoseConnection:
    side: Side


@dataclass(frozen=True)
class AbortConnection:
    side: Side


@dataclass(frozen=True)
class SendPings:
    payload: bytes


@dataclass(frozen=True)
class WarnFailed:
    side: Side
    code: int
    reason: str


@dataclass(frozen=True)
class StartTimer:
    timer: Timer
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True)
class Release:
    """Release the client's admission slot and stop the session's own helpers."""


@dataclass(frozen=True)
class Record:
    """The session's one end record: ``refused`` (with status and reason), ``closed``, or
    ``abandoned`` (the client left before any answer)."""

    kind: str
    status: int = 0
    reason: str = ""


@dataclass(frozen=True)
class SessionRecord:
    """
    A finished session, as the gateway keeps it: the figures that outlive it (metrics, totals)
    and ``row``, its access-log fields (``Session.describe``).  ``route`` is the route's spec (its
    ``on_disconnect`` webhook), None for a session refused before routing.
    """

    id: int
    route: Any
    route_path: str
    upstream: str
    server: str
    started: float
    client_code: int
    messages_up: int
    bytes_up: int
    messages_down: int
    bytes_down: int
    row: dict[str, Any]


_LIVE = (SessionState.OPEN, SessionState.CLOSING)


@dataclass(slots=True)
class SessionMachine:
    """
    One session's decisions.  :meth:`handle` takes an event and returns the commands to carry
    out, in order; the state and what the access log shows (``closed_by``, ``client_close``,
    ``backend_close``, ``tried``, ``server``) are read by the driver.

    Slotted, and its sets are frozensets replaced on change: a held session shares the empty one
    instead of owning five empty sets (1 KiB a session; they change at the open, the close and
    the timers' firings, never per message).  ``tried`` is a tuple for the same reason.
    """

    state: SessionState = SessionState.CONNECTING
    policy: SessionPolicy = SessionPolicy()
    tried: tuple[Any, ...] = ()  # grows once a try, so a tuple: nothing for the collector to visit
    server: Any = None  # the server that accepted
    closed_by: str | None = None
    client_close: str | None = None
    backend_close: str | None = None
    timers: frozenset[Timer] = frozenset()
    recorded: bool = False
    _pick: Callable[[tuple[Any, ...]], Any] | None = None
    _attempting: Any = None  # the server of the attempt in progress
    _attempt: str | None = None  # what the opening waits for: "auth", "hook", "connecting", ...
    _relaying: bool = False
    _received: frozenset[str] = frozenset()  # sides whose Close came (valid)
    _sent: frozenset[str] = frozenset()  # sides sent a Close
    _ended: frozenset[str] = frozenset()  # sides whose frames ended (Close, violation)
    _lost: frozenset[str] = frozenset()
    _backend_aborted: bool = False  # the gate dropped the backend itself (ping timeout)
    _ping_seq: int = 0

    def handle(self, event: object) -> list[object]:
        method = getattr(self, "_on_" + type(event).__name__)
        commands: list[object] = method(event)
        return commands

    # -- opening --------------------------------------------------------------------------------

    def _on_Routed(self, event: Routed) -> list[object]:
        self.policy, self._pick = event.policy, event.pick
        if event.policy.auth:
            self._attempt = "auth"
            return []
        return self._open_backend()

    def _open_backend(self) -> list[object]:
        commands: list[object] = [self._start(Timer.TRY, self.policy.try_timeout)]
        if self.policy.hook:
            self._attempt = "hook"
            return [*commands, CallHook()]
        return commands + self._try_next(None)

    def _expecting(self, attempt: str) -> bool:
        """Whether the opening waits for ``attempt`` ("auth", "hook", "connecting",
        "handshaking"): its answer is taken (and cleared) only then."""
        if self.state != SessionState.CONNECTING or self._attempt != attempt:
            return False
        self._attempt = None
        return True

    def _on_AuthAllowed(self, event: AuthAllowed) -> list[object]:
        return self._open_backend() if self._expecting("auth") else []

    def _on_AuthDenied(self, event: AuthDenied) -> list[object]:
        if not self._expecting("auth"):
            return []
        return self._refuse((event.status, event.reason), event.client_reason)

    def _on_HookAnswered(self, event: HookAnswered) -> list[object]:
        if not self._expecting("hook"):
            return []
        if event.refusal is not None:
            return self._refuse(event.refusal)
        return self._try_next(None)

    def _try_next(self, failure: tuple[int, str] | None) -> list[object]:
        """The next server, or the refusal: StartAttempt is always the last command."""
        server = None
        if len(self.tried) < self.policy.tries:
            assert self._pick is not None
            server = self._pick(self.tried)
        if server is None:
            return self._refuse(failure or (503, "No backend server available"))
        self.tried = (*self.tried, server)
        self._attempting = server
        self._attempt = "connecting"
        return [StartAttempt(server)]

    def _on_BackendConnected(self, event: BackendConnected) -> list[object]:
        if self._attempt == "connecting":
            self._attempt = "handshaking"
        return []

    def _on_AttemptFailed(self, event: AttemptFailed) -> list[object]:
        if not (self._expecting("connecting") or self._expecting("handshaking")):
            return []
        server, self._attempting = self._attempting, None
        failure = (event.status, event.reason)
        return [
            EndAttempt(server, False),
            BackendFailed(server, event.status, event.reason, event.why),
            *self._try_next(failure),
        ]

    def _on_BackendAccepted(self, event: BackendAccepted) -> list[object]:
        if self.state != SessionState.CONNECTING:
            return [DismissBackend()]
        if not self._expecting("handshaking"):
            return []
        server, self._attempting = self._attempting, None
        self.state = SessionState.OPEN
        self.server = self.tried[-1]
        self._pick = None  # the opening is over (and the driver's method must not be kept)
        return [*self._cancel(Timer.TRY), EndAttempt(server, True), Accept(self.server)]

    def _on_ClientOpened(self, event: ClientOpened) -> list[object]:
        if self.state != SessionState.OPEN or self._relaying:
            return []
        self._relaying = True
        return [OpenRelay()]

    def _on_RelayStarted(self, event: RelayStarted) -> list[object]:
        if self.state != SessionState.OPEN:
            return []
        commands: list[object] = []
        if self.policy.idle_timeout > 0:
            commands.append(self._start(Timer.IDLE, self.policy.idle_timeout))
        if self.policy.ping_interval > 0:
            commands.append(self._start(Timer.PING, self.policy.ping_interval))
        return commands

    def _on_HandshakeFailed(self, event: HandshakeFailed) -> list[object]:
        """The front door refused the client and wrote its access-log line: an attempt in
        progress is abandoned, so that no backend's 101 can follow the refusal."""
        if self.state != SessionState.CONNECTING:
            return []
        self.recorded = True
        commands = self._abandon()
        self.state, self._pick = SessionState.REFUSED, None
        return commands + self._cancel(Timer.TRY)

    def _abandon(self) -> list[object]:
        """Stop the attempt in progress, if any."""
        commands: list[object] = []
        if self._attempting is not None:
            server, self._attempting = self._attempting, None
            commands.append(EndAttempt(server, None))
        attempt, self._attempt = self._attempt, None
        if attempt in ("hook", "connecting"):
            self.state = SessionState.ABANDONING
            commands.append(CancelAttempt())
        elif attempt == "handshaking":
            commands.append(AbortPending())
        return commands

    def _refuse(self, failure: tuple[int, str], client_reason: str | None = None) -> list[object]:
        self.state = SessionState.REFUSED
        self._pick = None
        status, reason = failure
        if client_reason is None:
            client_reason = CLIENT_REASONS.get(status, reason if status < 500 else "Bad Gateway")
        self.recorded = True
        return [*self._cancel(Timer.TRY), Refuse(status, reason, client_reason)]

    # -- timers ---------------------------------------------------------------------------------

    def _start(self, timer: Timer, delay: float) -> StartTimer:
        self.timers |= {timer}
        return StartTimer(timer, delay)

    def _cancel(self, *timers: Timer) -> list[object]:
        running = [t for t in timers if t in self.timers]
        self.timers = self.timers.difference(running)
        return [CancelTimer(t) for t in running]

    def _on_TimerFired(self, event: TimerFired) -> list[object]:
        """The try, ping and close timers (the idle and pong timers come with their facts, as
        IdleChecked and PongChecked)."""
        if event.timer not in self.timers or event.timer in (Timer.IDLE, Timer.PONG):
            return []
        self.timers -= {event.timer}
        if event.timer == Timer.TRY:
            commands: list[object] = []
            if self._attempting is not None:
                server = self._attempting
                commands.append(
                    BackendFailed(server, 504, "try_timeout", "try_timeout", logged=False)
                )
            commands += self._abandon()
            return commands + self._refuse((504, "No backend server answered in time"))
        if event.timer == Timer.CLOSE:
            return [AbortConnection("client"), AbortConnection("backend")]
        self._ping_seq += 1  # Timer.PING: ping both peers, their pongs are due in ping_timeout
        return [SendPings(b"wsgate:%d" % self._ping_seq), self._pong_timer()]

    def _pong_timer(self) -> StartTimer:
        return self._start(Timer.PONG, self.policy.ping_timeout)

    def _on_IdleChecked(self, event: IdleChecked) -> list[object]:
        if Timer.IDLE not in self.timers:
            return []
        self.timers -= {Timer.IDLE}
        remaining = event.last + self.policy.idle_timeout - event.now
        if remaining > 0:
            return [self._start(Timer.IDLE, remaining)]
        return self._close(1001, "idle timeout", "gate (idle timeout)")

    def _on_PongChecked(self, event: PongChecked) -> list[object]:
        if Timer.PONG not in self.timers:
            return []
        self.timers -= {Timer.PONG}
        if event.silent is not None:
            self._backend_aborted = event.silent == "backend"
            return [AbortConnection(event.silent)]  # its partner is closed by LegLost
        wait = max(self.policy.ping_interval - self.policy.ping_timeout, 0.0)
        return [self._start(Timer.PING, wait)]

    # -- closing --------------------------------------------------------------------------------

    def _on_CloseReceived(self, event: CloseReceived) -> list[object]:
        self._received |= {event.side}
        self._ended |= {event.side}
        if event.forwarded:
            self._sent |= {other(event.side)}
        commands = self._record_end(event.side, describe_close("close", event.code, event.reason))
        return commands + self._progress()

    def _on_Violation(self, event: Violation) -> list[object]:
        self._ended |= {event.side}
        return self._violation(event.side, event.code, event.reason)

    def _violation(self, side: Side, code: int, reason: str) -> list[object]:
        return [
            WarnFailed(side, code, reason),
            *self._record_end(side, describe_close("failed", code, reason)),
            *self._send_close(side, code, reason),  # toward the peer at fault
            *self._send_close(other(side), *partner_close(side, "failed", code, reason)),
            LoseConnection(side),
        ]

    def _on_Stuck(self, event: Stuck) -> list[object]:
        if self.state != SessionState.OPEN:
            return []
        reason = f"slow consumer: nothing read for {self.policy.send_timeout:g}s"
        return self._violation(event.side, 1013, reason)

    def _on_CloseRequested(self, event: CloseRequested) -> list[object]:
        return self._close(event.code, event.reason, event.by)

    def _close(self, code: int, reason: str, by: str) -> list[object]:
        """Close both legs: ``code`` and ``reason`` to the client, 1001 to the backend."""
        if self.state == SessionState.CLOSED or not self._relaying:
            return []
        if self.closed_by is None:
            self.closed_by = by
        self._closing()
        return [
            *self._send_close("client", code, reason),
            *self._send_close("backend", 1001, reason),
            *self._arm_close_timeout(),
            *self._progress(),
        ]

    def _on_LegLost(self, event: LegLost) -> list[object]:
        side = event.side
        commands: list[object] = []
        if side == "client" and self.state in (SessionState.CONNECTING, SessionState.ABANDONING):
            self.closed_by = "client"
            self.client_close = "left during handshake"
            commands += self._abandon()
            self.state, self._pick = SessionState.REFUSED, None
            commands += self._cancel(Timer.TRY)
        if self.state == SessionState.REFUSED:
            self.state = SessionState.CLOSED
            if not self.recorded:
                self.recorded = True
                commands.append(Record("abandoned"))
            return [*commands, Release()]
        if self.state == SessionState.CLOSED:
            return []
        commands += self._record_end(side, "dropped")
        self._lost |= {side}
        if len(self._lost) == 2:
            return commands + self._finish()
        if (
            side == "backend"
            and self.policy.mode == "tunnel"
            and not (self._backend_aborted or "backend" in self._ended)
        ):
            # Tunnel mode: the backend went away without a Close, so does the client's
            # connection, once what was relayed to it is written, as on a direct connection; the
            # backend is the endpoint that checks UTF-8 here.  Message mode speaks for it: 1011.
            return [*commands, LoseConnection("client")]
        # Tell the survivor (a Close unless one went already) and let it answer.
        commands += self._send_close(other(side), *partner_close(side, "dropped", None, ""))
        return commands + self._progress()

    def _send_close(self, side: Side, code: int | None, reason: str) -> list[object]:
        if side in self._sent:
            return []
        self._sent |= {side}
        return [SendClose(side, code, reason)]

    def _progress(self) -> list[object]:
        """Once the client has both sent and been sent a Close, the gate (its server) closes the
        TCP connection, as RFC 6455 7.1.1 asks; the backend (the gate's server) closes its own."""
        if "client" in self._received and "client" in self._sent and "client" not in self._lost:
            return [LoseConnection("client")]
        return []

    def _closing(self) -> None:
        if self.state == SessionState.OPEN:
            self.state = SessionState.CLOSING

    def _record_end(self, side: Side, description: str) -> list[object]:
        self._closing()
        commands = self._arm_close_timeout()
        if side == "client" and self.client_close is None:
            self.client_close = description
        elif side == "backend" and self.backend_close is None:
            self.backend_close = description
        if self.closed_by is None:
            self.closed_by = side
        return commands

    def _arm_close_timeout(self) -> list[object]:
        """Once a close has started, both connections are aborted if the session has not ended
        within the close timeout (a peer that never answers, or a Close waiting behind a frame
        that never completes).  The idle timer has nothing left to do."""
        if Timer.CLOSE in self.timers:
            return []
        return [*self._cancel(Timer.IDLE), self._start(Timer.CLOSE, self.policy.close_timeout)]

    def _finish(self) -> list[object]:
        self.state = SessionState.CLOSED
        self.recorded = True
        return [Release(), *self._cancel(*Timer), Record("closed")]

    @property
    def live(self) -> bool:
        """Whether both legs are paired and relaying (OPEN or CLOSING)."""
        return self.state in _LIVE

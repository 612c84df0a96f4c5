"""
The session state machine (``wsgate/core/session.py``) without sockets: a table of transitions,
and a hypothesis stateful test of its invariants over any order of events.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.trial.unittest import SynchronousTestCase

from wsgate.core.session import (
    CLIENT_REASONS,
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
    SessionState,
    StartAttempt,
    StartTimer,
    Stuck,
    Timer,
    TimerFired,
    Violation,
    WarnFailed,
)

S = SessionState


def _pick(tried: list[Any]) -> Any:
    """Servers "s1" then "s2"."""
    return next((name for name in ("s1", "s2") if name not in tried), None)


def _machine(**policy: Any) -> SessionMachine:
    machine = SessionMachine()
    machine.handle(Routed(SessionPolicy(try_timeout=10.0, **policy), _pick))
    return machine


# The events that open a session.
_OPEN = [BackendConnected(), BackendAccepted(), ClientOpened(), RelayStarted()]

# (what it shows, policy, events before, the event, the commands, the state after)
TRANSITIONS: list[tuple[str, dict[str, Any], list[object], object, list[object], S]] = [
    # -- opening
    (
        "an admitted request starts the try timer and the first attempt",
        {},
        [],
        None,
        [StartTimer(Timer.TRY, 10.0), StartAttempt("s1")],
        S.CONNECTING,
    ),
    ("[route.auth] waits for its answer", {"auth": True}, [], None, [], S.CONNECTING),
    (
        "auth allowed: the attempts start",
        {"auth": True},
        [],
        AuthAllowed(),
        [StartTimer(Timer.TRY, 10.0), StartAttempt("s1")],
        S.CONNECTING,
    ),
    (
        "auth denied: refused with its status and the client's reason",
        {"auth": True},
        [],
        AuthDenied(401, "auth: no token", "Unauthorized"),
        [Refuse(401, "auth: no token", "Unauthorized")],
        S.REFUSED,
    ),
    (
        "on_connect: the webhook's call is the first attempt",
        {"hook": True},
        [],
        None,
        [StartTimer(Timer.TRY, 10.0), CallHook()],
        S.CONNECTING,
    ),
    (
        "the webhook allows: the first server is tried",
        {"hook": True},
        [],
        HookAnswered(None),
        [StartAttempt("s1")],
        S.CONNECTING,
    ),
    (
        "the webhook refuses: its status and reason go to the client",
        {"hook": True},
        [],
        HookAnswered((403, "not you")),
        [CancelTimer(Timer.TRY), Refuse(403, "not you", "not you")],
        S.REFUSED,
    ),
    (
        "no server to try: 503",
        {"tries": 0},
        [],
        None,
        [
            StartTimer(Timer.TRY, 10.0),
            CancelTimer(Timer.TRY),
            Refuse(503, "No backend server available", CLIENT_REASONS[503]),
        ],
        S.REFUSED,
    ),
    (
        "a failed attempt moves on to the next server while tries remain",
        {"tries": 2},
        [],
        AttemptFailed(502, "refused", "refused"),
        [
            EndAttempt("s1", False),
            BackendFailed("s1", 502, "refused", "refused"),
            StartAttempt("s2"),
        ],
        S.CONNECTING,
    ),
    (
        "the last try failed: 502 with a generic reason (the log keeps the real one)",
        {"tries": 1},
        [],
        AttemptFailed(502, "backend connect failed: x", "refused"),
        [
            EndAttempt("s1", False),
            BackendFailed("s1", 502, "backend connect failed: x", "refused"),
            CancelTimer(Timer.TRY),
            Refuse(502, "backend connect failed: x", CLIENT_REASONS[502]),
        ],
        S.REFUSED,
    ),
    (
        "try_timeout during the connect: cancelled, 504",
        {},
        [],
        TimerFired(Timer.TRY),
        [
            BackendFailed("s1", 504, "try_timeout", "try_timeout", logged=False),
            EndAttempt("s1", None),
            CancelAttempt(),
            Refuse(504, "No backend server answered in time", CLIENT_REASONS[504]),
        ],
        S.REFUSED,
    ),
    (
        "try_timeout during the backend handshake: the half-open connection is aborted",
        {},
        [BackendConnected()],
        TimerFired(Timer.TRY),
        [
            BackendFailed("s1", 504, "try_timeout", "try_timeout", logged=False),
            EndAttempt("s1", None),
            AbortPending(),
            Refuse(504, "No backend server answered in time", CLIENT_REASONS[504]),
        ],
        S.REFUSED,
    ),
    (
        "the backend's 101: the client is accepted, the try timer stops",
        {},
        [BackendConnected()],
        BackendAccepted(),
        [CancelTimer(Timer.TRY), EndAttempt("s1", True), Accept("s1")],
        S.OPEN,
    ),
    (
        "a backend 101 after the refusal is dismissed, never passed on",
        {},
        [BackendConnected(), TimerFired(Timer.TRY)],
        BackendAccepted(),
        [DismissBackend()],
        S.REFUSED,
    ),
    (
        "the client leaves during the connect: the attempt is abandoned",
        {},
        [],
        LegLost("client"),
        [
            EndAttempt("s1", None),
            CancelAttempt(),
            CancelTimer(Timer.TRY),
            Record("abandoned"),
            Release(),
        ],
        S.CLOSED,
    ),
    (
        "the client leaves during the webhook's call: it is cancelled",
        {"hook": True},
        [],
        LegLost("client"),
        [CancelAttempt(), CancelTimer(Timer.TRY), Record("abandoned"), Release()],
        S.CLOSED,
    ),
    (
        "the client's connection ends after its refusal: nothing more to record",
        {"tries": 0},
        [],
        LegLost("client"),
        [Release()],
        S.CLOSED,
    ),
    (
        "the front door refused the client during the backend handshake: the attempt ends",
        {},
        [BackendConnected()],
        HandshakeFailed(),
        [EndAttempt("s1", None), AbortPending(), CancelTimer(Timer.TRY)],
        S.REFUSED,
    ),
    (
        "a backend's 101 after the front door's refusal is dismissed",
        {},
        [BackendConnected(), HandshakeFailed()],
        BackendAccepted(),
        [DismissBackend()],
        S.REFUSED,
    ),
    (
        "the front door's refusal wrote the line: the client's loss records nothing more",
        {},
        [HandshakeFailed()],
        LegLost("client"),
        [Release()],
        S.CLOSED,
    ),
    (
        "a late connect failure of an abandoned attempt is ignored",
        {},
        [TimerFired(Timer.TRY)],
        AttemptFailed(502, "cancelled", "refused"),
        [],
        S.REFUSED,
    ),
    # -- open
    (
        "both 101s: the relays start",
        {},
        [BackendConnected(), BackendAccepted()],
        ClientOpened(),
        [OpenRelay()],
        S.OPEN,
    ),
    (
        "the relays run: idle and ping timers start",
        {"idle_timeout": 30.0, "ping_interval": 20.0},
        [BackendConnected(), BackendAccepted(), ClientOpened()],
        RelayStarted(),
        [StartTimer(Timer.IDLE, 30.0), StartTimer(Timer.PING, 20.0)],
        S.OPEN,
    ),
    (
        "ping interval: both peers pinged, their pongs due within ping_timeout",
        {"ping_interval": 20.0, "ping_timeout": 5.0},
        _OPEN,
        TimerFired(Timer.PING),
        [SendPings(b"wsgate:1"), StartTimer(Timer.PONG, 5.0)],
        S.OPEN,
    ),
    (
        "both answered: the next ping after the rest of the interval",
        {"ping_interval": 20.0, "ping_timeout": 5.0},
        [*_OPEN, TimerFired(Timer.PING)],
        PongChecked(None),
        [StartTimer(Timer.PING, 15.0)],
        S.OPEN,
    ),
    (
        "a peer that did not answer is dropped",
        {"ping_interval": 20.0, "ping_timeout": 5.0},
        [*_OPEN, TimerFired(Timer.PING)],
        PongChecked("backend"),
        [AbortConnection("backend")],
        S.OPEN,
    ),
    (
        "not idle yet: the idle timer waits for the rest",
        {"idle_timeout": 30.0},
        _OPEN,
        IdleChecked(last=100.0, now=110.0),
        [StartTimer(Timer.IDLE, 20.0)],
        S.OPEN,
    ),
    (
        "idle: 1001 'idle timeout' to both",
        {"idle_timeout": 30.0},
        _OPEN,
        IdleChecked(last=100.0, now=130.0),
        [
            SendClose("client", 1001, "idle timeout"),
            SendClose("backend", 1001, "idle timeout"),
            StartTimer(Timer.CLOSE, 5.0),
        ],
        S.CLOSING,
    ),
    # -- closing
    (
        "the client's Close (forwarded): closing, the idle timer gives way to the close timer",
        {"idle_timeout": 30.0},
        _OPEN,
        CloseReceived("client", 1000, "bye", forwarded=True),
        [CancelTimer(Timer.IDLE), StartTimer(Timer.CLOSE, 5.0)],
        S.CLOSING,
    ),
    (
        "the backend's answer reaches the client: the gate closes the client's TCP",
        {},
        [*_OPEN, CloseReceived("client", 1000, "bye", forwarded=True)],
        CloseReceived("backend", 1000, "bye", forwarded=True),
        [LoseConnection("client")],
        S.CLOSING,
    ),
    (
        "a client protocol error: its code to it, 1001 to the backend",
        {},
        _OPEN,
        Violation("client", 1002, "bad frame"),
        [
            WarnFailed("client", 1002, "bad frame"),
            StartTimer(Timer.CLOSE, 5.0),
            SendClose("client", 1002, "bad frame"),
            SendClose("backend", 1001, "client error 1002: bad frame"),
            LoseConnection("client"),
        ],
        S.CLOSING,
    ),
    (
        "a slow client: 1013",
        {"send_timeout": 2.0},
        _OPEN,
        Stuck("client"),
        [
            WarnFailed("client", 1013, "slow consumer: nothing read for 2s"),
            StartTimer(Timer.CLOSE, 5.0),
            SendClose("client", 1013, "slow consumer: nothing read for 2s"),
            SendClose("backend", 1001, "client error 1013: slow consumer: nothing read for 2s"),
            LoseConnection("client"),
        ],
        S.CLOSING,
    ),
    (
        "a slow consumer once closing is left to the close timer",
        {"send_timeout": 2.0},
        [*_OPEN, CloseRequested(1001, "", "gate")],
        Stuck("client"),
        [],
        S.CLOSING,
    ),
    (
        "an operator's kick: its code to the client, 1001 to the backend",
        {},
        _OPEN,
        CloseRequested(4000, "kicked", "operator"),
        [
            SendClose("client", 4000, "kicked"),
            SendClose("backend", 1001, "kicked"),
            StartTimer(Timer.CLOSE, 5.0),
        ],
        S.CLOSING,
    ),
    (
        "a kick of a session not relaying yet does nothing",
        {},
        [],
        CloseRequested(4000, "kicked", "operator"),
        [],
        S.CONNECTING,
    ),
    (
        "the client dropped: 1001 'client went away' to the backend",
        {},
        _OPEN,
        LegLost("client"),
        [StartTimer(Timer.CLOSE, 5.0), SendClose("backend", 1001, "client went away")],
        S.CLOSING,
    ),
    (
        "the backend dropped in message mode: 1011 to the client",
        {},
        _OPEN,
        LegLost("backend"),
        [StartTimer(Timer.CLOSE, 5.0), SendClose("client", 1011, "backend connection lost")],
        S.CLOSING,
    ),
    (
        "the backend dropped in tunnel mode: the client's TCP goes too",
        {"mode": "tunnel"},
        _OPEN,
        LegLost("backend"),
        [StartTimer(Timer.CLOSE, 5.0), LoseConnection("client")],
        S.CLOSING,
    ),
    (
        "tunnel mode, but the gate dropped the backend (ping timeout): 1011 to the client",
        {"mode": "tunnel", "ping_interval": 20.0, "ping_timeout": 5.0},
        [*_OPEN, TimerFired(Timer.PING), PongChecked("backend")],
        LegLost("backend"),
        [
            StartTimer(Timer.CLOSE, 5.0),
            SendClose("client", 1011, "backend connection lost"),
        ],
        S.CLOSING,
    ),
    (
        "close timeout: both connections aborted",
        {},
        [*_OPEN, CloseRequested(1001, "", "gate")],
        TimerFired(Timer.CLOSE),
        [AbortConnection("client"), AbortConnection("backend")],
        S.CLOSING,
    ),
    (
        "both legs gone: every timer cancelled, one record",
        {"ping_interval": 20.0},
        [*_OPEN, LegLost("client")],
        LegLost("backend"),
        [Release(), CancelTimer(Timer.PING), CancelTimer(Timer.CLOSE), Record("closed")],
        S.CLOSED,
    ),
]


class TransitionTableTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Each row: from the state its events reach, the event gives exactly those commands."""
        for doc, policy, before, event, commands, state in TRANSITIONS:
            with self.subTest(doc):
                machine = SessionMachine()
                out = machine.handle(Routed(SessionPolicy(try_timeout=10.0, **policy), _pick))
                for earlier in before:
                    out = machine.handle(earlier)
                if event is not None:
                    out = machine.handle(event)
                self.assertEqual(out, commands)
                self.assertEqual(machine.state, state)

    def test_closed_by_and_descriptions(self) -> None:
        """What the access log shows: who closed first and how each leg ended."""
        machine = _machine()
        for event in [*_OPEN, CloseReceived("client", 1000, "bye", True), LegLost("backend")]:
            machine.handle(event)
        self.assertEqual(machine.closed_by, "client")
        self.assertEqual(machine.client_close, "1000 'bye'")
        self.assertEqual(machine.backend_close, "dropped")

    def test_state_names(self) -> None:
        """States compare and print as the names the console and status pages show."""
        self.assertEqual(SessionState.OPEN, "OPEN")
        self.assertEqual(str(SessionState.ABANDONING), "ABANDONING")

    def test_diagram_lists_every_state(self) -> None:
        """The documented diagram names every state of the Enum."""
        import wsgate.core.session as module

        doc = module.__doc__ or ""
        for state in SessionState:
            self.assertIn(state.value, doc)


_SIDES = st.sampled_from(["client", "backend"])


class SessionInvariants(RuleBasedStateMachine):
    """
    Any order of the events the legs, relays, timers and operators can produce; the world
    carries out what matters of the commands (timers, connections it was told to end).
    """

    def __init__(self) -> None:
        super().__init__()
        self.machine: SessionMachine | None = None
        self.timers: set[Timer] = set()
        self.alive = {"client": True, "backend": False}
        self.doomed: set[str] = set()  # connections the gate ended; their loss will come
        self.refused = False
        self.accepted = False
        self.relaying = False
        self.records = 0
        self.front_door = False

    def _feed(self, event: object) -> None:
        assert self.machine is not None
        for command in self.machine.handle(event):
            if isinstance(command, StartTimer):
                assert command.timer not in self.timers, f"{command.timer} started twice"
                self.timers.add(command.timer)
            elif isinstance(command, CancelTimer):
                assert command.timer in self.timers, f"{command.timer} cancelled, not running"
                self.timers.discard(command.timer)
            elif isinstance(command, Refuse):
                self.refused = True
                self.records += 1
            elif isinstance(command, Record):
                self.records += 1
            elif isinstance(command, Accept):
                assert not self.refused, "a 101 after a refusal"
                self.accepted = True
                self.alive["backend"] = True
            elif isinstance(command, OpenRelay):
                self.relaying = True
            elif isinstance(command, LoseConnection | AbortConnection):
                if self.alive[command.side]:
                    self.doomed.add(command.side)

    @rule(
        tries=st.integers(0, 3),
        servers=st.integers(0, 3),
        auth=st.booleans(),
        hook=st.booleans(),
        mode=st.sampled_from(["message", "tunnel"]),
        idle=st.sampled_from([0.0, 30.0]),
        ping=st.sampled_from([0.0, 20.0]),
    )
    @precondition(lambda self: self.machine is None)
    def route(
        self, tries: int, servers: int, auth: bool, hook: bool, mode: str, idle: float, ping: float
    ) -> None:
        names = [f"s{i}" for i in range(servers)]
        self.machine = SessionMachine()
        policy = SessionPolicy(
            tries=tries,
            auth=auth,
            hook=hook,
            mode=mode,
            idle_timeout=idle,
            ping_interval=ping,
            ping_timeout=5.0,
        )
        self._feed(Routed(policy, lambda tried: next((n for n in names if n not in tried), None)))

    def _routed(self) -> bool:
        return self.machine is not None

    @precondition(_routed)
    @rule(allowed=st.booleans())
    def auth_answer(self, allowed: bool) -> None:
        self._feed(AuthAllowed() if allowed else AuthDenied(401, "auth: no", "Unauthorized"))

    @precondition(_routed)
    @rule(allowed=st.booleans())
    def hook_answer(self, allowed: bool) -> None:
        self._feed(HookAnswered(None if allowed else (403, "no")))

    @precondition(_routed)
    @rule()
    def backend_connected(self) -> None:
        self._feed(BackendConnected())

    @precondition(_routed)
    @rule()
    def attempt_failed(self) -> None:
        self._feed(AttemptFailed(502, "refused", "refused"))

    @precondition(lambda self: self._routed() and not self.accepted)
    @rule()
    def backend_accepted(self) -> None:
        self._feed(BackendAccepted())

    @precondition(lambda self: self.accepted and not self.relaying and self.alive["client"])
    @rule()
    def client_opened(self) -> None:
        self._feed(ClientOpened())
        self._feed(RelayStarted())

    @precondition(
        lambda self: (
            self._routed() and not self.front_door and self.machine.state == SessionState.CONNECTING
        )
    )
    @rule()
    def front_door_refuses(self) -> None:
        """Autobahn's failHandshake (e.g. too much early data) wrote the refusal's line."""
        self.front_door = True
        self.records += 1
        self._feed(HandshakeFailed())
        self.doomed.add("client")

    @precondition(lambda self: self._routed() and bool(self.timers))
    @rule(data=st.data())
    def timer_fires(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(sorted(self.timers)))
        self.timers.discard(timer)
        if timer == Timer.IDLE:
            self._feed(IdleChecked(last=0.0, now=data.draw(st.sampled_from([10.0, 40.0]))))
        elif timer == Timer.PONG:
            self._feed(PongChecked(data.draw(st.sampled_from([None, "client", "backend"]))))
        else:
            self._feed(TimerFired(timer))

    @precondition(lambda self: self.relaying)
    @rule(side=_SIDES, forwarded=st.booleans())
    def close_received(self, side: str, forwarded: bool) -> None:
        if self.alive[side]:
            self._feed(CloseReceived(side, 1000, "", forwarded))  # type: ignore[arg-type]

    @precondition(lambda self: self.relaying)
    @rule(side=_SIDES)
    def violation(self, side: str) -> None:
        if self.alive[side]:
            self._feed(Violation(side, 1002, "bad"))  # type: ignore[arg-type]

    @precondition(lambda self: self.relaying)
    @rule(side=_SIDES)
    def stuck(self, side: str) -> None:
        self._feed(Stuck(side))  # type: ignore[arg-type]

    @precondition(_routed)
    @rule()
    def kick(self) -> None:
        self._feed(CloseRequested(4000, "kick", "operator"))

    @precondition(lambda self: self._routed() and any(self.alive.values()))
    @rule(side=_SIDES)
    def leg_lost(self, side: str) -> None:
        if self.alive[side]:
            self.alive[side] = False
            self.doomed.discard(side)
            self._feed(LegLost(side))  # type: ignore[arg-type]

    @invariant()
    def timers_agree(self) -> None:
        if self.machine is not None:
            self.assertions_hold()

    def assertions_hold(self) -> None:
        machine = self.machine
        assert machine is not None
        assert machine.timers == self.timers
        assert self.records <= 1, "more than one access record"
        if machine.state == SessionState.CLOSED:
            assert not self.timers, f"timers left at the end: {self.timers}"
            assert self.records == 1, "no access record"
        # No leg outlives its partner: once one is gone, the other is being ended.
        if machine.live and self.alive["client"] != self.alive["backend"]:
            survivor = "client" if self.alive["client"] else "backend"
            assert Timer.CLOSE in self.timers or survivor in self.doomed

    def teardown(self) -> None:
        """The world runs to its end: the session ends with both legs, every timer cancelled,
        exactly one record (a client that left before any answer: the abandoned record)."""
        machine = self.machine
        if machine is None:
            return
        if machine.live:
            self._feed(CloseRequested(1001, "", "test"))
            if Timer.CLOSE in self.timers:
                self.timers.discard(Timer.CLOSE)
                self._feed(TimerFired(Timer.CLOSE))
        for side in ("client", "backend"):
            if self.alive[side]:
                self.alive[side] = False
                self._feed(LegLost(side))  # type: ignore[arg-type]
        assert machine.state == SessionState.CLOSED, machine.state
        assert not self.timers and not machine.timers
        assert machine.recorded and self.records == 1


SessionInvariants.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None
)


class SessionInvariantTests(SessionInvariants.TestCase):  # type: ignore[name-defined,misc]
    """Hypothesis explores the event orders."""


class DriverTests(SynchronousTestCase):
    """The driver (``wsgate/dataplane/session.py``) carries out what the machine decides."""

    def test_front_door_refusal_abandons_the_attempt(self) -> None:
        """A client refused by the front door (too much data before its handshake completed)
        while the backend connect is pending: the connect is cancelled, the client gets the 400,
        and the session leaves nothing behind."""
        from tests.helpers import Network, make_config, upgrade_request

        url = "ws://a.test:1"
        net = Network(make_config([url]), {url: "hang"})
        raw = net.raw(upgrade_request())
        self.assertEqual(len(net.hanging), 1)
        leg = net.pumps[0].server
        leg.dataReceived(b"x" * (net.gateway.config.limits.max_header_size + 1))
        # At once, not only when the client's connection is gone: no 101 can follow now.
        self.assertEqual(leg.session.state, SessionState.REFUSED)
        self.assertEqual(net.cancelled, net.hanging)
        net.flush()
        self.assertEqual(raw.status, 400)
        self.assertEqual(net.gateway.counters["handshakes.400"], 1)
        net.advance(60)  # no try_timeout fires later: its timer went with the attempt
        self.assertEqual(net.gateway.counters["handshakes.504"], 0)
        self.assertEqual(net.gateway.sessions, {})

"""
One direction of an open session: a :class:`Relay` feeds the source leg's bytes to a frame
engine and writes what it returns to the sink leg; a :class:`ReadThrottle` pauses reading on one
leg while the other's send buffer is full.

Owns the hot path of the data plane (every relayed byte goes through ``Relay.read`` or
``Relay.dataReceived``) and the gate's own frames toward a peer (Close, Ping, pushed messages),
written at frame boundaries.
Must not decide how a session closes: it reports to its :class:`RelayOwner` (the session), which
does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from wsgate.core.frames import PING, FrameEngine, close_frame, control_frame, message_frame
from wsgate.core.limits import MessageRate
from wsgate.core.session import Side
from wsgate.dataplane._compat import (
    CONNECTION_DONE,
    CONNECTION_LOST,
    READ_SIZE,
    plain_read,
    read_more,
    send_fd,
)

__all__ = ["PUSH_QUEUE", "PUSH_QUEUE_BYTES", "ReadThrottle", "Relay", "RelayOwner"]

# Pushed messages (and their bytes) that may wait per session for a fragmented message to end.
PUSH_QUEUE = 64
PUSH_QUEUE_BYTES = 4 * 1024 * 1024


# A relay that pushed nothing shares this count (a slot, not two ints per relay).
_NONE_OWN = (0, 0)


class RelayOwner(Protocol):
    """What a relay tells the session that owns it."""

    def relay_done(self, relay: Relay) -> None:
        """The source sent a Close (already forwarded), or broke a rule or a limit."""

    def pong_received(self, relay: Relay) -> None:
        """The source answered the gate's ping."""

    def stuck(self, side: Side) -> None:
        """``side``'s peer has not taken what the gate sends it for ``send_timeout`` seconds."""


@implementer(IPushProducer)
class ReadThrottle:
    """
    Registered as the producer of one leg's transport: pauses and resumes reading on the other
    leg's transport while this leg's send buffer is over its bound.  When the consuming transport
    goes away, reading resumes instead of the other connection being closed (Twisted would call
    ``stopProducing``): the Session closes it properly, with a Close frame, and it must be able to
    read its peer's answer.  A leg whose buffer stays over the bound for ``send_timeout`` seconds
    is a slow consumer: the owner's ``stuck(side)`` is called (NGINX's ``proxy_send_timeout``).
    """

    __slots__ = (
        "_transport",
        "_owner",
        "_side",
        "_clock",
        "_timeout",
        "_timer",
        "paused",
        "pauses",
    )

    def __init__(
        self,
        transport: Any,
        owner: RelayOwner | None = None,
        side: Side = "client",
        clock: Any = None,
        timeout: float = 0.0,
    ) -> None:
        self._transport = transport
        self._owner = owner  # told stuck(side); not a bound method, which a held session would keep
        self._side = side
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
            if self._timeout > 0 and self._owner is not None:
                self._timer = self._clock.callLater(self._timeout, self._owner.stuck, self._side)

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
        self._owner = None
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
        "_tap", "_masked", "_pinged", "close_sent", "_pushed", "_own", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        engine: FrameEngine,
        source: Any,
        sink: Any,
        session: RelayOwner,
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
        self._own = _NONE_OWN  # (messages, payload bytes) of the gate's own pushed to the sink

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
        self._settle(messages, controls, spent)

    def read(self) -> BaseException | None:
        """
        The source transport's ``doRead`` while relaying over plain TCP (:func:`read_through`):
        between messages, the engine reads the socket and sends whole messages on to the sink's
        socket itself, in C with the C twin (one call a read, nothing copied); otherwise, and
        with a rate limit or pushed messages waiting, Twisted's own read, which calls
        :meth:`dataReceived`.  Returns what ``doRead`` returns: None, or why the connection is
        over.
        """
        source = self.source
        if self.rate is None and self._pushed is None:
            engine = self.engine
            messages, controls = engine.messages, engine.controls
            try:
                got = engine.pump(source.fileno(), send_fd(self.sink), source.bufferSize)
            except OSError:
                return CONNECTION_LOST
            if got is not None:
                n, out = got
                if n <= 0:
                    return None if n else CONNECTION_DONE
                if out:
                    self.sink.write(out)
                if n == READ_SIZE:
                    read_more(source)
                self._settle(messages, controls, engine.bytes)  # no rate: bytes spent unused
                return None
        return plain_read(source)

    def _settle(self, messages: int, controls: int, spent: int) -> None:
        """After a read: what the engine's counters and state changed from ``messages`` and
        ``controls`` (and ``spent`` payload bytes) ask of the relay and the session."""
        engine = self.engine
        rate = self.rate
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
        messages, size = self._own
        self._own = (messages + 1, size + len(payload))
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
        """Data messages sent on to the sink: relayed, and the gate's own (pushed)."""
        return self.engine.messages + self._own[0]

    @property
    def bytes(self) -> int:  # last in the class: the name would shadow the type in annotations
        return self.engine.bytes + self._own[1]

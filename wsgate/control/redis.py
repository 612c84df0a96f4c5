"""
A small Redis client on Twisted: one connection that keeps itself up.

Why not a library.  ``txredisapi`` (maintained, 1.6 in 2026) is the Twisted client; two of its
behaviours go against what the fleet needs: with ``reconnect=True`` a command sent while the
connection is down waits (forever) for the next connection instead of failing (its issue #112,
closed as intended), and a connection with a database number stops reconnecting after the server
restarts (issue #146, open).  The fleet must fail fast and work alone while Redis is down, and
must rejoin, database number and all, when Redis comes back.  ``redis-py`` is asyncio or blocking,
and the gate runs Twisted's epoll reactor.  The fleet uses a handful of commands and pub/sub, so
this module is ~200 lines over the sans-IO parser :mod:`wsgate.core.resp`.

Owns: connecting (an endpoint from ``service.py``), ``AUTH`` and ``SELECT`` on every connection,
reconnecting with a capped backoff, failing commands at once while down, a bound on commands
awaiting replies, and pub/sub mode (``subscribe``).  Must not know what the fleet stores: the
owner's ``ready``/``lost`` callbacks decide (see :mod:`wsgate.control.cluster`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate.core.resp import RedisError, RespParser, RespProtocolError, encode

__all__ = ["RedisDown", "RedisLink", "RedisProtocol"]

# Commands awaiting replies on one connection; more fail at once (Redis is stuck or too slow).
MAX_PENDING = 10_000
_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 5.0
_CONNECT_TIMEOUT = 5.0


class RedisDown(Exception):
    """The command was not sent (or not answered): there is no working connection to Redis."""


class RedisProtocol(Protocol):
    """
    One connection.  ``execute`` sends a command and returns a Deferred of its reply (errback
    with :class:`~wsgate.core.resp.RedisError` for an error reply).  After ``subscribe`` every
    reply goes to ``on_push`` instead (pub/sub mode).
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._parser = RespParser()
        self._pending: deque[tuple[Deferred, float]] = deque()
        self.on_push: Callable[[Any], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.out: Any = None  # the transport, once connected

    def connectionMade(self) -> None:
        self.out = self.transport

    def execute(self, *args: bytes | str | int | float) -> Deferred:
        if self.out is None or not self.connected:
            return fail(RedisDown("not connected"))
        if len(self._pending) >= MAX_PENDING:
            return fail(RedisDown(f"{MAX_PENDING} commands await replies"))
        d: Deferred = Deferred()
        self._pending.append((d, self._clock.seconds()))
        self.out.write(encode(*args))
        return d

    def subscribe(self, channels: list[str], on_push: Callable[[Any], None]) -> None:
        """Enter pub/sub mode: subscribe to ``channels``; every later reply goes to ``on_push``."""
        self.on_push = on_push
        self.out.write(encode("SUBSCRIBE", *channels))

    def oldest(self) -> float | None:
        """When the oldest command still awaiting its reply was sent (None: none awaits)."""
        return self._pending[0][1] if self._pending else None

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except RespProtocolError as e:
            self._fail_all(RedisDown(f"protocol error: {e}"))
            self.out.abortConnection()
            return
        for reply in replies:
            if self._pending:
                d, _ = self._pending.popleft()
                if isinstance(reply, RedisError):
                    d.errback(reply)
                else:
                    d.callback(reply)
            elif self.on_push is not None:
                self.on_push(reply)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail_all(RedisDown(f"connection lost: {why}"))
        if self.on_lost is not None:
            self.on_lost()

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for d, _ in pending:
            d.errback(error)


class RedisLink:
    """
    A connection to Redis kept up: ``start`` connects, and every loss or failed attempt retries
    after a backoff (0.25 s doubling up to 5 s).  Each new connection runs ``AUTH`` (when a
    password is given) and ``SELECT db``, then ``ready(protocol)``, which returns a Deferred
    (e.g. of a rejoin); ``lost()`` is called once for each connection that was ready and went.
    ``protocol`` is the ready connection, or None.
    """

    log = Logger()

    def __init__(
        self,
        connect: Callable[[Factory], Deferred],
        clock: Any,
        ready: Callable[[RedisProtocol], Deferred | None],
        lost: Callable[[], None],
        password: str | None = None,
        db: int = 0,
        name: str = "redis",
    ) -> None:
        self._connect = connect
        self._clock = clock
        self._ready = ready
        self._lost = lost
        self._password = password
        self._db = db
        self.name = name
        self.protocol: RedisProtocol | None = None
        self._connection: RedisProtocol | None = None  # connected, maybe not ready yet
        self._attempt: Deferred | None = None
        self._retry: Any = None
        self._backoff = _BACKOFF_FIRST
        self._running = False
        self.last_error = ""

    def start(self) -> None:
        self._running = True
        self._try()

    def stop(self) -> None:
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        connection, self._connection = self._connection, None
        if connection is not None and connection.out is not None:
            connection.on_lost = None
            connection.out.loseConnection()
        self.protocol = None

    def execute(self, *args: bytes | str | int | float) -> Deferred:
        """Send a command on the ready connection; fails at once with RedisDown when down."""
        if self.protocol is None:
            return fail(RedisDown(self.last_error or "not connected"))
        return self.protocol.execute(*args)

    def abort(self, why: str) -> None:
        """Drop the connection (a reply is overdue); the link reconnects."""
        connection = self._connection
        if connection is not None and connection.out is not None:
            self.last_error = why
            connection.out.abortConnection()

    def _try(self) -> None:
        self._retry = None
        if not self._running:
            return
        factory: Any = Factory.forProtocol(lambda: RedisProtocol(self._clock))
        attempt = self._attempt = self._connect(factory)
        attempt.addTimeout(_CONNECT_TIMEOUT, self._clock)
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: RedisProtocol) -> None:
        self._attempt = None
        self._connection = connection
        connection.on_lost = self._connection_lost
        setup: Deferred[Any] = succeed(None)
        password, db = self._password, self._db
        if password is not None:
            setup.addCallback(lambda _: connection.execute("AUTH", password))
        if db:
            setup.addCallback(lambda _: connection.execute("SELECT", db))
        setup.addCallbacks(
            self._set_up, self._setup_failed, callbackArgs=(connection,), errbackArgs=(connection,)
        )

    def _set_up(self, _: object, connection: RedisProtocol) -> None:
        if connection is not self._connection:
            return
        self._backoff = _BACKOFF_FIRST
        self.protocol = connection
        self.last_error = ""
        d = self._ready(connection)
        if d is not None:
            d.addErrback(self._ready_failed, connection)

    def _setup_failed(self, reason: Failure, connection: RedisProtocol) -> None:
        self.last_error = f"{self.name}: {reason.getErrorMessage()}"
        connection.out.loseConnection()

    def _ready_failed(self, reason: Failure, connection: RedisProtocol) -> None:
        self.last_error = f"{self.name}: {reason.getErrorMessage()}"
        if connection is self._connection:
            connection.out.loseConnection()

    def _failed(self, reason: Failure) -> None:
        self._attempt = None
        self.last_error = f"{self.name}: {reason.getErrorMessage()}"
        self._schedule()

    def _connection_lost(self) -> None:
        was_ready = self.protocol is not None
        self._connection = self.protocol = None
        if was_ready:
            self._lost()
        self._schedule()

    def _schedule(self) -> None:
        if self._running and self._retry is None:
            self._retry = self._clock.callLater(self._backoff, self._try)
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

"""
Authentication at the handshake and credential lifetime: the I/O around ``wsgate/core/auth.py``.

Owns the :class:`Authenticator` (one per gateway, a Service): it reads key files, fetches JWKS
URLs with Twisted's HTTP client (cached, refreshed every ``keys_refresh`` and, at most every
:data:`UNKNOWN_KID_INTERVAL` seconds, when a token names an unknown ``kid``; a JWKS file is
re-read when it changed), calls forward-auth services (bounded answers, ``timeout``, an answer
cache per route) and turns the outcome into an :class:`~wsgate.core.auth.Identity` or an
:class:`~wsgate.core.auth.AuthFailure`.  Also owns :class:`Lifetime`, the timers that warn a
client before its JWT expires, close the session with 1008 "credential expired" when it does,
and close it with 1001 once it is older than the route's ``max_session_age``.

How a session uses it (``session.py``): ``Session.start`` calls :func:`authenticate` after the
route, origin, subprotocol and admission checks and before any backend is contacted; it calls
back ``Session.authenticated`` or ``Session.deny``.  ``Session.client_opened`` starts a
:class:`Lifetime`, the end of the session cancels it.  Every timer runs on the gateway's clock.

Must not decide anything itself (``core/auth.py`` does) nor log a token.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from wsgate.config import AuthSpec
from wsgate.core.auth import (
    AnswerCache,
    AuthFailure,
    Identity,
    KeySet,
    UnknownKey,
    credential_key,
    expiry_warning,
    find_token,
    forward_answer,
    forward_request_headers,
    lifetime_deadlines,
    load_keys,
    verify_jwt,
    www_authenticate,
)
from wsgate.core.frames import control_frame
from wsgate.core.session import SessionState
from wsgate.dataplane._compat import quiet_pool
from wsgate.dataplane.httpclient import read_body

if TYPE_CHECKING:
    from autobahn.websocket.types import ConnectionRequest

    from wsgate.config import Route
    from wsgate.dataplane.gateway import Gateway
    from wsgate.dataplane.relay import Relay

__all__ = [
    "Authenticator",
    "Guarded",
    "Lifetime",
    "UNKNOWN_KID_INTERVAL",
    "auth_detail",
    "authenticate",
    "start_lifetime",
]

# A token with an unknown key id makes a JWKS URL be fetched again at most this often.
UNKNOWN_KID_INTERVAL = 10.0
# Largest JWKS document and forward-auth answer body read (the body is discarded).
MAX_JWKS = 1024 * 1024
MAX_ANSWER_BODY = 64 * 1024
_TEXT = 1
# What the refused client is told; the log gets the precise reason.
CLIENT_REASONS = {
    401: "Authentication required",
    403: "Not allowed",
    503: "Authentication unavailable",
}


class Guarded(Protocol):
    """
    What authentication reads of a session and calls back (the driver,
    :class:`~wsgate.dataplane.session.Session`, is one): an interface rather than the class,
    because the session drives this module.
    """

    id: int
    gateway: Gateway
    request: ConnectionRequest
    route: Route
    target: str
    auth: Identity | None
    down: Relay | None

    @property
    def state(self) -> SessionState: ...

    def forwarded_headers(self) -> dict[str, str]: ...

    def authenticated(self, identity: Identity) -> None: ...

    def deny(
        self, status: int, reason: str, client_reason: str, headers: tuple[tuple[str, str], ...]
    ) -> None: ...

    def close(self, code: int = 1001, reason: str = "", by: str = "gate") -> None: ...


def authenticate(session: Guarded, authenticator: Authenticator) -> None:
    """
    Check the credential of ``session`` for its route's ``auth``; then call
    ``session.authenticated(identity)`` or ``session.deny(status, reason, client_reason,
    headers)``, unless the client left meanwhile.
    """

    def done(result: Identity | Failure) -> None:
        if session.state != SessionState.CONNECTING:
            return
        if isinstance(result, Identity):
            session.authenticated(result)
            return
        failure = result.value
        if not isinstance(failure, AuthFailure):
            authenticator.log.failure("auth_error {session_id}", result, session_id=session.id)
            failure = AuthFailure(503, f"auth error: {result.getErrorMessage()}")
        client_reason = CLIENT_REASONS.get(failure.status, "Authentication failed")
        session.deny(failure.status, f"auth: {failure.reason}", client_reason, failure.headers)

    authenticator.check(session).addBoth(done)


class _KeySource:
    """
    The keys of one ``keys`` file or ``jwks_url``: loaded on first use, reloaded every
    ``refresh`` seconds (a failed load keeps the last good keys), and on demand for an unknown
    ``kid`` (a file when it changed; a URL at most every :data:`UNKNOWN_KID_INTERVAL`).
    """

    def __init__(self, spec: AuthSpec, clock: Any, fetch: Callable[[str, float], Deferred]):
        self.location = spec.keys or spec.jwks_url or ""
        self.is_url = spec.keys is None
        self.refresh = spec.keys_refresh
        self.timeout = spec.timeout
        self._clock = clock
        self._fetch = fetch
        self.keys: KeySet | None = None
        self.loads = 0
        self._stamp: tuple[int, int] | None = None  # a file's (mtime_ns, size) when read
        self._loading: Deferred | None = None
        self._waiters: list[Deferred] = []
        self._timer: Any = None
        self._unknown_at = float("-inf")

    def current(self) -> Deferred:
        """A Deferred of the key set (at once when loaded); fails with AuthFailure 503."""
        if self.keys is not None:
            return succeed(self.keys)
        return self._load()

    def for_unknown_kid(self) -> Deferred | None:
        """Reload for a token whose ``kid`` is unknown; None when that may not happen now."""
        if not self.is_url:
            return self._load() if self._file_stamp() != self._stamp else None
        now = self._clock.seconds()
        if now - self._unknown_at < UNKNOWN_KID_INTERVAL:
            return None
        self._unknown_at = now
        return self._load()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.location)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> Deferred:
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if self._loading is None:
            self._cancel_timer()
            if self.is_url:
                self._loading = self._fetch(self.location, self.timeout)
            else:
                self._loading = self._read_file()
            self._loading.addCallback(load_keys).addBoth(self._loaded)
        return waiter

    def _read_file(self) -> Deferred:
        stamp = self._file_stamp()
        try:
            with open(self.location, "rb") as f:
                data = f.read()
        except OSError as e:
            return fail(ValueError(e.strerror or str(e)))
        self._stamp = stamp
        return succeed(data)

    def _loaded(self, result: KeySet | Failure) -> None:
        self._loading = None
        self.loads += 1
        if isinstance(result, KeySet):
            self.keys = result
        elif not result.check(CancelledError):
            Authenticator.log.warn(
                "auth_keys_failed {location} reason={reason}",
                location=self.location,
                reason=result.getErrorMessage(),
            )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self.keys is not None:
                waiter.callback(self.keys)
            else:
                waiter.errback(AuthFailure(503, f"no keys from {self.location}"))
        self._timer = self._clock.callLater(self.refresh, self._load)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def stop(self) -> None:
        self._cancel_timer()
        if self._loading is not None:
            self._loading.cancel()


class Authenticator(service.Service):
    """
    The gateway's authentication step: key sources by location and answer caches by route
    spec, for the routes of the current config (others are dropped when the config changes).
    ``reactor`` makes HTTP requests (JWKS URLs, forward auth) and runs the timers.
    """

    log = Logger()

    def __init__(self, gateway: Gateway, reactor: Any) -> None:
        self.gateway = gateway
        self.reactor = reactor
        self._sources: dict[str, _KeySource] = {}
        self._caches: dict[AuthSpec, AnswerCache] = {}
        self._config: Any = None
        self._pool: HTTPConnectionPool | None = None

    def startService(self) -> None:
        super().startService()
        self._prune()
        for route in self.gateway.config.routes:  # fetch keys before the first handshake
            if route.auth is not None and route.auth.type == "jwt":
                self._source(route.auth).current().addErrback(lambda _: None)

    def stopService(self) -> Deferred | None:
        super().stopService()
        for source in self._sources.values():
            source.stop()
        self._sources.clear()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            return pool.closeCachedConnections()
        return None

    def _prune(self) -> None:
        """Forget the sources and caches of routes that a reload removed or changed."""
        config = self.gateway.config
        if config is self._config:
            return
        self._config = config
        specs = {route.auth for route in config.routes if route.auth is not None}
        places = {spec.keys or spec.jwks_url for spec in specs if spec.type == "jwt"}
        for place in set(self._sources) - places:
            self._sources.pop(place).stop()
        for spec in set(self._caches) - specs:
            del self._caches[spec]

    def _source(self, spec: AuthSpec) -> _KeySource:
        place = spec.keys or spec.jwks_url or ""
        source = self._sources.get(place)
        if source is None:
            source = self._sources[place] = _KeySource(spec, self.reactor, self._get)
        return source

    def check(self, session: Guarded) -> Deferred:
        """A Deferred of the session's Identity; fails with AuthFailure."""
        self._prune()
        spec = session.route.auth
        assert spec is not None
        if spec.type == "jwt":
            return self._check_jwt(spec, session)
        return self._check_forward(spec, session)

    # -- jwt ---------------------------------------------------------------------------------

    def _check_jwt(self, spec: AuthSpec, session: Guarded) -> Deferred:
        request = session.request
        token, source = find_token(spec.token, request.headers, request.params)
        if token is None:
            challenge = www_authenticate(spec.realm)
            return fail(AuthFailure(401, "no credential", (("WWW-Authenticate", challenge),)))
        keys = self._source(spec)

        def verified(identity: Identity) -> Identity:
            return dataclasses.replace(identity, source=source, forward=spec.forward_token)

        d = keys.current()
        d.addCallback(self._verify, token, spec, keys, True)
        return d.addCallback(verified)

    def _verify(
        self, key_set: KeySet, token: str, spec: AuthSpec, keys: _KeySource, retry: bool
    ) -> Identity | Deferred:
        try:
            return verify_jwt(token, key_set, spec, self.gateway.clock.seconds())
        except UnknownKey:
            reload = keys.for_unknown_kid() if retry else None
            if reload is None:
                challenge = www_authenticate(spec.realm, "invalid_token", "unknown key id")
                raise AuthFailure(
                    401, "unknown key id", (("WWW-Authenticate", challenge),)
                ) from None
            return reload.addCallback(self._verify, token, spec, keys, False)

    # -- forward -----------------------------------------------------------------------------

    def _check_forward(self, spec: AuthSpec, session: Guarded) -> Deferred:
        incoming = session.request.headers
        cache = self._caches.get(spec)
        if cache is None and spec.cache > 0:
            cache = self._caches[spec] = AnswerCache(
                spec.cache, spec.cache_size, self.gateway.clock.seconds
            )
        key = credential_key(spec, incoming)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return succeed(cached) if isinstance(cached, Identity) else fail(cached)
        headers = forward_request_headers(
            spec, incoming, session.forwarded_headers(), "GET", session.target or "/"
        )
        d = self._agent(spec.timeout).request(
            spec.method.encode(),
            (spec.url or "").encode(),
            Headers({name: [value] for name, value in headers.items()}),
        )
        d.addCallback(self._answered, spec)
        d.addTimeout(spec.timeout, self.reactor, onTimeoutCancel=_timed_out)
        d.addErrback(_unreachable, spec)

        def remember(answer: Identity | AuthFailure) -> Identity:
            if cache is not None:
                cache.put(key, answer)
            if isinstance(answer, AuthFailure):
                raise answer
            return answer

        return d.addCallback(remember)

    def _answered(self, response: Any, spec: AuthSpec) -> Deferred:
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in response.headers.getAllRawHeaders()
        }
        answer = forward_answer(spec, response.code, headers)
        # The body is read (and dropped) so that the connection can be reused.
        return read_body(response, MAX_ANSWER_BODY).addBoth(lambda _: answer)

    # -- HTTP --------------------------------------------------------------------------------

    def _agent(self, timeout: float) -> Agent:
        if self._pool is None:
            self._pool = quiet_pool(self.reactor)
            self._pool.maxPersistentPerHost = 16
        return Agent(self.reactor, connectTimeout=timeout, pool=self._pool)

    def _get(self, url: str, timeout: float) -> Deferred:
        """GET ``url``: a Deferred of its body (200 only, at most MAX_JWKS bytes)."""
        d = self._agent(timeout).request(
            b"GET", url.encode(), Headers({"Accept": ["application/json"]})
        )

        def body(response: Any) -> Deferred:
            if response.code != 200:
                read_body(response, MAX_ANSWER_BODY).addErrback(lambda _: None)
                raise ValueError(f"{url} answered {response.code}")
            return read_body(response, MAX_JWKS)

        d.addCallback(body)
        return d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timed_out)


def _timed_out(result: object, timeout: float) -> Failure:
    """``addTimeout``'s outcome whatever the cancelled request failed with (the Agent wraps the
    CancelledError in ResponseNeverReceived)."""
    return Failure(TimeoutError(f"no answer within {timeout:g}s"))


def _unreachable(failure: Failure, spec: AuthSpec) -> AuthFailure:
    """A forward-auth request that got no usable answer: 503."""
    if failure.check(TimeoutError):
        return AuthFailure(503, f"auth service timed out after {spec.timeout:g}s")
    return AuthFailure(503, f"auth service unreachable: {failure.getErrorMessage()}")


# -- lifetime --------------------------------------------------------------------------------


class Lifetime:
    """
    The timers of one open session: the expiry warning (a text message to the client, sent
    between two messages; skipped if none fits before the end), the 1008 close at the JWT's
    ``exp`` and the 1001 close at the route's ``max_session_age`` (spread).
    """

    RETRY = 0.5  # a warning that met a message being relayed tries again this much later

    def __init__(self, session: Guarded, expires: float | None, opened: float) -> None:
        route = session.route
        warning = route.auth.expiry_warning if route.auth is not None else 0.0
        self.session = session
        self.deadlines = lifetime_deadlines(
            opened, expires, warning, route.max_session_age, route.max_session_age_spread
        )
        clock = session.gateway.clock
        self._clock = clock
        self._timers: dict[str, Any] = {}
        for name, when in dataclasses.asdict(self.deadlines).items():
            if when is not None:
                self._timers[name] = clock.callLater(
                    max(when - opened, 0.0), getattr(self, f"_{name}")
                )

    def _warn(self) -> None:
        self._timers.pop("warn", None)
        relay = self.session.down
        expires = self.deadlines.expire
        if relay is None or expires is None or not relay.engine.sink_open:
            return
        now = self._clock.seconds()
        if relay.engine.in_message:
            if now + self.RETRY < expires:
                self._timers["warn"] = self._clock.callLater(self.RETRY, self._warn)
            return
        # A whole short text frame (fin, opcode 1, under 126 bytes): the same shape as a control
        # frame, unmasked toward the client.
        relay.sink.write(control_frame(_TEXT, expiry_warning(expires, now), False))

    def _expire(self) -> None:
        self._timers.pop("expire", None)
        self.session.close(1008, "credential expired", by="gate (credential expired)")

    def _age(self) -> None:
        self._timers.pop("age", None)
        self.session.close(1001, "max session age reached", by="gate (max session age)")

    def cancel(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def describe(self, now: float) -> dict[str, float | None]:
        """Seconds left until each close (None: none due), for the console and status."""
        return {
            "credential_expires_in": None
            if self.deadlines.expire is None
            else self.deadlines.expire - now,
            "max_age_close_in": None if self.deadlines.age is None else self.deadlines.age - now,
        }


def auth_detail(session: Guarded, now: float) -> dict[str, Any]:
    """What the console's session detail shows of authentication and lifetime."""
    identity = getattr(session, "auth", None)
    lifetime = getattr(session, "lifetime", None)
    detail: dict[str, Any] = {
        "auth": None if identity is None else f"{identity.method} {identity.subject or '-'}",
        "credential_expires_in": None,
        "max_age_close_in": None,
    }
    if lifetime is not None:
        detail.update(lifetime.describe(now))
    return detail


def start_lifetime(session: Guarded) -> Lifetime | None:
    """The lifetime timers of a session that just opened, if its route or credential has any."""
    identity = session.auth
    expires = identity.expires if identity is not None else None
    if expires is None and not session.route.max_session_age:
        return None
    return Lifetime(session, expires, session.gateway.clock.seconds())

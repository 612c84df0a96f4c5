"""
The Gateway: the one runtime object of a running wsgate.

Owns the current config, the router, the upstreams, the registry of live sessions and the counters
that the access log, console and metrics share.  Must not do I/O itself: sessions (``bridge.py``)
register and report here; listeners and connections are built by ``service.py``.  Must not import
``bridge.py``: it sees a live session through :class:`LiveSession` and a finished one as a frozen
:class:`~wsgate.core.session.SessionRecord`.

A little over 500 lines: the registry, the operator's verbs on servers and reload share the same
state; the access-log lines are its largest part.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from wsgate.config import Config, server_spec
from wsgate.core.limits import Admission, WarningLimiter, client_address
from wsgate.core.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, Reloads
from wsgate.core.redact import redact_target, redact_text, sanitize_request_id
from wsgate.core.routing import Router
from wsgate.core.session import SessionRecord, SessionState
from wsgate.core.upstream import Server, Upstream, request_key, runtime_resets

if TYPE_CHECKING:
    from wsgate.dataplane.webhooks import Webhooks

__all__ = ["Clock", "Gateway", "LiveSession"]

# The close reason of the sessions a drain deadline closes.
_DRAINED = "server shutting down"


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f, *args, **kwargs): ...  # noqa: ANN001


class LiveSession(Protocol):
    """What the gateway reads of and does to a live session (``dataplane.session.Session``)."""

    id: int
    server: Server | None
    upstream: Upstream
    request: Any  # the client's upgrade request: ``headers``, ``params``
    client_address: str
    started: float
    opened_at: float | None

    @property
    def state(self) -> SessionState: ...

    @property
    def target(self) -> str | None: ...

    def close(self, code: int = 1001, reason: str = "", by: str = "gate") -> None: ...

    def push(self, payload: bytes, binary: bool) -> bool: ...

    def describe(self) -> dict[str, Any]: ...


class Gateway:
    """
    Routes, upstreams, live sessions and counters.

    ``counters`` keys: ``handshakes.<result>`` (``ok``, ``404``, ``502``, ...), ``sessions.opened``,
    ``sessions.closed``, and ``messages.up``/``bytes.up``/``messages.down``/``bytes.down`` of
    finished sessions.  ``closed`` counts finished sessions by route, upstream, server and close
    code; ``connect_time`` and ``session_duration`` are histograms (all read by ``/metrics``).
    ``backend_failures`` counts failed backend attempts by upstream, server and reason,
    ``reloads`` the reload results (``service.py`` records them) and ``certificates()`` lists the
    certificates in use with their expiry (``service.py`` sets it; none by default).
    Figures of live sessions live on each :class:`~wsgate.dataplane.session.Session`.
    """

    log = Logger()

    def __init__(self, config: Config, clock: Clock) -> None:
        self.clock = clock
        # The live Session objects by id: the gateway uses them only as LiveSession; the
        # operations layer (which may import the data plane) reads them whole.
        self.sessions: dict[int, Any] = {}
        self.counters: Counter[str] = Counter()
        # Finished sessions by (route, upstream, server, close code the client saw), for metrics.
        self.closed: Counter[tuple[str, str, str, str]] = Counter()
        self.connect_time = Histogram(CONNECT_BUCKETS)
        self.session_duration = Histogram(DURATION_BUCKETS)
        self.backend_failures: Counter[tuple[str, str, str]] = Counter()
        self.reloads = Reloads(clock.seconds())
        self.certificates: Callable[[], list[dict[str, Any]]] = list
        self._next_id = 1
        self._drain_calls: dict[tuple[str, str], list[Any]] = {}
        self.config = config
        self.router = Router(config.routes)
        self.upstreams = {
            name: Upstream(spec, clock, self.counters) for name, spec in config.upstreams.items()
        }
        self.admission = Admission(config.limits, clock.seconds)
        self.warnings = WarningLimiter(clock.seconds)
        # Set by shutdown(): new sessions are refused and opening ones closed at once.
        self.closing = False
        self._drained: Deferred | None = None
        # The lifecycle webhooks' client; service.py sets it (routes with hooks need it).
        self.webhooks: Webhooks | None = None
        # Told of every session that opens and closes (``session_opened(session)``,
        # ``session_closed(session)``): the fleet's registry (wsgate/control/cluster.py).
        self.watchers: list[Any] = []
        # The fleet this gate is part of ([cluster]: a wsgate.control.cluster.Cluster), or None.
        self.fleet: Any = None

    def reload(self, config: Config) -> list[str]:
        """
        Swap in a new, already validated config for new sessions: routes, upstreams (through
        ``Upstream.update``, which keeps the state of servers that remain and drains removed
        ones) and limits.  Live sessions keep their route and server.  Returns what changed.
        """
        changes = config_changes(self.config, config)
        resets = [
            line
            for name, spec in config.upstreams.items()
            if name in self.upstreams
            for line in runtime_resets(self.upstreams[name], spec)
        ]
        if resets:
            changes = [c for c in changes if c != "nothing changed"] + resets
        upstreams = {}
        for name, spec in config.upstreams.items():
            current = self.upstreams.get(name)
            if current is not None:
                current.update(spec)
                upstreams[name] = current
            else:
                upstreams[name] = Upstream(spec, self.clock, self.counters)
        self.router = Router(config.routes)
        self.upstreams = upstreams
        self.admission.limits = config.limits
        self.config = config
        self.counters["reloads"] += 1
        for line in changes:
            self.log.info("config_reloaded {change}", change=line)
        return changes

    def shutdown(self) -> Deferred:
        """
        Close every session with 1001 ("gateway shutting down"), spread over ``shutdown_spread``
        seconds; the Deferred fires when all are gone or ``shutdown_grace`` has passed.
        """
        self.closing = True
        limits = self.config.limits
        sessions = list(self.sessions.values())
        self.log.info(
            "shutdown closing {count} sessions (grace {grace}s, spread {spread}s)",
            count=len(sessions),
            grace=limits.shutdown_grace,
            spread=limits.shutdown_spread,
        )
        step = limits.shutdown_spread / len(sessions) if sessions else 0.0
        for i, session in enumerate(sessions):
            if step:
                self.clock.callLater(i * step, session.close, 1001, "gateway shutting down")
            else:
                session.close(1001, "gateway shutting down")
        if not self.sessions:
            return succeed(None)
        drained = self._drained = Deferred()
        timeout = self.clock.callLater(limits.shutdown_grace, self._grace_over)
        drained.addBoth(_cancel_call, timeout)
        return drained

    def _grace_over(self) -> None:
        self.log.warn(
            "shutdown grace over with {count} sessions still open", count=len(self.sessions)
        )
        self._fire_drained()

    def _fire_drained(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def new_session_id(self) -> int:
        session_id = self._next_id
        self._next_id += 1
        return session_id

    # -- servers at run time (the console calls these) -----------------------------------------

    def _server(self, url: str, upstream: str | None = None) -> tuple[Upstream, Server]:
        """
        The server ``url`` of the upstream named ``upstream``; without a name, the one upstream
        that has it.  A URL in several upstreams must be named with its upstream: a verb never
        acts on every upstream that holds the same URL.
        """
        if upstream is not None and upstream not in self.upstreams:
            raise LookupError(f"no upstream {upstream}")
        found = [
            (group, server)
            for name, group in self.upstreams.items()
            if upstream in (None, name)
            for server in group.servers
            if server.url == url.rstrip("/") and not server.retired
        ]
        if not found:
            where = f"upstream {upstream}" if upstream is not None else "any upstream"
            raise KeyError(f"no server {url} in {where}")
        if len(found) > 1:
            names = ", ".join(group.name for group, _ in found)
            raise LookupError(f"{url} is in upstreams {names}: name the upstream")
        return found[0]

    def _sessions_on(self, server: Server) -> list[LiveSession]:
        return [
            s for s in self.sessions.values() if s.server is server and s.state == SessionState.OPEN
        ]

    def drain(
        self,
        url: str,
        deadline: float | None = None,
        window: float = 10.0,
        upstream: str | None = None,
    ) -> int:
        """
        Send no new sessions to the server ``url`` (of ``upstream``, which may be left out when
        only one upstream has that URL); its live sessions continue.  With ``deadline`` (seconds),
        its sessions are closed with 1001 by then: those open ``window`` seconds before it (or at
        once, for a shorter deadline) are closed one by one over the rest of the time, and every
        one still open at the deadline (the last of them, or one that finished its handshake
        meanwhile) at the deadline exactly, on the gateway's clock.  Returns how many sessions
        are on it now.
        """
        group, server = self._server(url, upstream)
        self._cancel_drain(group, server)
        group.set_draining(server, True, "operator: drain")
        if deadline is not None:
            spread = min(window, deadline)
            end = self.clock.seconds() + deadline
            self._drain_calls[(group.name, server.url)] = [
                self.clock.callLater(
                    deadline - spread, self._drain_spread, group, server, spread, end
                ),
                self.clock.callLater(deadline, self._drain_deadline, group, server),
            ]
        return len(self._sessions_on(server))

    def _draining_sessions(self, server: Server) -> list[LiveSession]:
        return self._sessions_on(server) if server.draining else []

    def _drain_spread(self, group: Upstream, server: Server, spread: float, end: float) -> None:
        """Close all but the last of the server's sessions evenly over the ``spread`` seconds that
        end at the clock time ``end`` (the deadline closes the rest).  The times are reckoned from
        ``end``, not from now, so that a late call does not push them back."""
        victims = self._draining_sessions(server)
        step = spread / len(victims) if victims else 0.0
        calls = self._drain_calls.setdefault((group.name, server.url), [])
        now = self.clock.seconds()
        for i, session in enumerate(victims[:-1]):
            delay = max(0.0, end - spread + (i + 1) * step - now)
            calls.append(self.clock.callLater(delay, session.close, 1001, _DRAINED))

    def _drain_deadline(self, group: Upstream, server: Server) -> None:
        self._cancel_drain(group, server)
        victims = self._draining_sessions(server)
        self.log.info(
            "drain_deadline {upstream} {server} closing={count}",
            upstream=group.name,
            server=server.url,
            count=len(victims),
        )
        for session in victims:
            session.close(1001, _DRAINED)

    def _cancel_drain(self, group: Upstream, server: Server) -> None:
        for call in self._drain_calls.pop((group.name, server.url), []):
            if call.active():
                call.cancel()

    def undrain(self, url: str, upstream: str | None = None) -> None:
        """The server ``url`` gets new sessions again (a pending drain deadline is cancelled)."""
        group, server = self._server(url, upstream)
        self._cancel_drain(group, server)
        group.set_draining(server, False, "operator: undrain")

    def set_weight(self, url: str, weight: int, upstream: str | None = None) -> None:
        """Change the weight of the server ``url`` for new sessions (live sessions stay)."""
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError("weight must be a whole number of at least 1")
        group, server = self._server(url, upstream)
        self.log.info(
            "server_weight {upstream} {server} {old} -> {new}",
            upstream=group.name,
            server=server.url,
            old=server.weight,
            new=weight,
        )
        server.weight = weight

    def add_server(self, upstream: str, url: str, weight: int = 1, backup: bool = False) -> None:
        """Add the server ``url`` to ``upstream`` until the next reload (which reports it)."""
        group = self.upstreams.get(upstream)
        if group is None:
            raise LookupError(f"no upstream {upstream}")
        group.add_server(server_spec(url, weight, backup))

    def remove_server(self, upstream: str, url: str) -> int:
        """Drain the server ``url`` of ``upstream`` and forget it once its sessions end."""
        group, server = self._server(url, upstream)
        self._cancel_drain(group, server)
        sessions = len(self._sessions_on(server))
        group.remove_server(server.url)
        return sessions

    def rebalance(self, upstream_name: str, window: float = 10.0) -> int:
        """
        Even out the long-lived sessions of an upstream: close just enough sessions (the newest)
        on the servers above their weighted share with 1012 (Service Restart), spread over
        ``window`` seconds, and steer the reconnecting clients to the emptiest servers.  With
        ``hash`` the sessions whose key now belongs to another server are closed instead.
        Returns how many sessions will be closed.
        """
        upstream = self.upstreams[upstream_name]
        per_server: list[list[LiveSession]] = []
        if upstream.spec.balance == "hash":
            moved = []
            for session in self.sessions.values():
                if session.upstream is not upstream or session.state != SessionState.OPEN:
                    continue
                request = session.request
                key = request_key(
                    upstream.spec.key, session.client_address, request.headers, request.params
                )
                if key is not None and upstream.owner(key) not in (session.server, None):
                    moved.append(session)
            per_server.append(moved)
        else:
            for server, extra in upstream.excess().items():
                newest = sorted(self._sessions_on(server), key=lambda s: s.started, reverse=True)
                per_server.append(newest[:extra])
            upstream.start_rebalance(window)
        # Interleave the servers, so that every part of the window takes from each of them.
        victims = [s for group in _zip_longest(per_server) for s in group]
        self.counters["rebalances"] += 1
        self.log.info(
            "rebalance {upstream} closing={count} window={window}s",
            upstream=upstream_name,
            count=len(victims),
            window=window,
        )
        self.close_spread(victims, 1012, "rebalancing, please reconnect", window)
        return len(victims)

    def close_spread(
        self, sessions: list[LiveSession], code: int, reason: str, window: float
    ) -> None:
        """Close ``sessions`` with ``code``, the first at once and the others spread over ``window``."""
        step = window / len(sessions) if sessions and window > 0 else 0.0
        for i, session in enumerate(sessions):
            if i == 0 or not step:
                session.close(code, reason)
            else:
                self.clock.callLater(i * step, session.close, code, reason)

    def handshake_result(self, result: str) -> None:
        """Count one client handshake by its result: ``ok`` or the HTTP status it was refused with."""
        self.counters[f"handshakes.{result}"] += 1

    def backend_failed(self, upstream: str, server: str, reason: str) -> None:
        """Count one failed backend attempt by upstream, server URL and reason (a word of
        :data:`wsgate.core.metrics.BACKEND_FAILURE_REASONS`)."""
        self.backend_failures[(upstream, server, reason)] += 1

    def session_opened(self, session: LiveSession) -> None:
        self.sessions[session.id] = session
        self.counters["sessions.opened"] += 1
        if session.opened_at is not None:
            self.connect_time.observe(session.opened_at - session.started)
        for watcher in self.watchers:
            watcher.session_opened(session)
        if self.config.log_session_opened:
            self.log.info(
                "session_opened session_id={session_id} client={client} client_port={client_port} "
                "route={route} upstream={upstream} server={server} path={path} "
                "request_id={request_id} subprotocol={subprotocol} extensions={extensions} tls={tls} "
                "tls_version={tls_version} sni={sni}",
                **session.describe(),
            )

    def session_closed(self, record: SessionRecord) -> None:
        """Forget a finished session and write its access-log line."""
        if self.sessions.pop(record.id, None) is None:
            return
        if self.closing and not self.sessions:
            self._fire_drained()
        self.counters["sessions.closed"] += 1
        self._count_closed(record)
        row = record.row
        if self.webhooks is not None:
            self.webhooks.session_closed(record.route, row)
        for watcher in self.watchers:
            watcher.session_closed(record)
        self.log.info(
            "session_closed session_id={session_id} client={client} client_port={client_port} "
            "route={route} upstream={upstream} server={server} path={path} "
            "request_id={request_id} subprotocol={subprotocol} extensions={extensions} tls={tls} "
            "tls_version={tls_version} sni={sni} duration={duration:.3f}s messages_up={messages_up} bytes_up={bytes_up} "
            "messages_down={messages_down} bytes_down={bytes_down} "
            "client_close={client_close} client_code={client_code} client_reason={client_reason} "
            "backend_close={backend_close} backend_code={backend_code} "
            "backend_reason={backend_reason} closed_by={closed_by}",
            **row,
        )

    def session_refused(self, session: LiveSession, status: int, reason: str) -> None:
        """The access-log line of a session whose client got an HTTP error instead of a 101."""
        row = session.describe()
        self.log.info(
            "session_refused session_id={session_id} client={client} client_port={client_port} "
            "route={route} upstream={upstream} path={path} request_id={request_id} "
            "status={status} reason={reason} tried={tried} duration={duration:.3f}s",
            session_id=row["session_id"],
            client=row["client"],
            client_port=row["client_port"],
            route=row["route"] or None,
            upstream=row["upstream"],
            path=row["path"],
            request_id=row["request_id"],
            status=status,
            reason=redact_text(reason, self.config.log, session.target),
            tried=row["tried"],
            duration=row["duration"],
        )

    def handshake_refused(
        self,
        status: int,
        reason: str,
        peer: Any,
        target: str | None,
        headers: Mapping[str, str],
    ) -> None:
        """
        The access-log line of a request refused before it became a session (bad request, no
        WebSocket upgrade, header limits): ``peer`` is the connection's address, ``target`` the
        request target and ``headers`` the request headers, as far as they were parsed.
        """
        spec = self.config.log
        peer_host = str(getattr(peer, "host", peer))
        self.log.info(
            "handshake_refused client={client} client_port={client_port} path={path} "
            "request_id={request_id} status={status} reason={reason}",
            client=client_address(peer_host, headers.get("x-forwarded-for"), self.config.limits),
            client_port=getattr(peer, "port", None),
            path=redact_target(target, spec),
            request_id=sanitize_request_id(headers.get("x-request-id")),
            status=status,
            reason=redact_text(reason, spec, target),
        )

    def _count_closed(self, record: SessionRecord) -> None:
        """Fold a finished session's figures into the totals that outlive it (metrics, stats)."""
        self.counters["messages.up"] += record.messages_up
        self.counters["bytes.up"] += record.bytes_up
        self.counters["messages.down"] += record.messages_down
        self.counters["bytes.down"] += record.bytes_down
        self.session_duration.observe(self.clock.seconds() - record.started)
        key = (record.route_path, record.upstream, record.server, str(record.client_code))
        self.closed[key] += 1


def _cancel_call(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


def config_changes(old: Config, new: Config) -> list[str]:
    """What a reload from ``old`` to ``new`` changes, one readable line each."""
    changes = []
    if old.listeners != new.listeners or old.redirects != new.redirects:
        changes.append("listeners changed: restart wsgate to apply them (kept as they are)")
    old_routes = {(r.host, r.path): r for r in old.routes}
    new_routes = {(r.host, r.path): r for r in new.routes}
    for key in new_routes.keys() - old_routes.keys():
        changes.append(f"route {_route_name(key)} added")
    for key in old_routes.keys() - new_routes.keys():
        changes.append(f"route {_route_name(key)} removed")
    for key in new_routes.keys() & old_routes.keys():
        if new_routes[key] != old_routes[key]:
            changes.append(f"route {_route_name(key)} changed")
    for name in new.upstreams.keys() - old.upstreams.keys():
        changes.append(f"upstream {name} added")
    for name in old.upstreams.keys() - new.upstreams.keys():
        changes.append(f"upstream {name} removed (its live sessions continue)")
    for name in new.upstreams.keys() & old.upstreams.keys():
        before = {s.url for s in old.upstreams[name].servers}
        after = {s.url for s in new.upstreams[name].servers}
        for url in sorted(after - before):
            changes.append(f"upstream {name}: server {url} added")
        for url in sorted(before - after):
            changes.append(f"upstream {name}: server {url} removed (drained)")
        if old.upstreams[name] != new.upstreams[name] and before == after:
            changes.append(f"upstream {name} settings changed")
    if old.limits != new.limits:
        changes.append("limits changed")
    if old.log != new.log:
        changes.append("log settings changed")
    if old.cluster != new.cluster:
        changes.append("cluster settings changed: restart wsgate to apply them (kept as they are)")
    return changes or ["nothing changed"]


def _route_name(key: tuple[str | None, str]) -> str:
    host, path = key
    return f"{host or '*'}{path}"


def _zip_longest(groups: list[list[LiveSession]]) -> list[list[LiveSession]]:
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]."""
    rounds = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(rounds)]

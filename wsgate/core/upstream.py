"""
Upstreams: groups of backend servers and the choice of one server for a new session.

Owns each server's runtime state (active sessions, attempts in progress, failures, health, draining)
and the balancing methods.  Must not sleep or connect: the bridge reports what happened to each
attempt, the health checks and DNS discovery report what they saw, the upstream only decides.

Choosing a server (:meth:`Upstream.pick`)
=========================================

A server is *usable* when its state is ``up`` (not draining, not marked down by the active checks,
not within a passive ``fail_timeout``) and it is below its ``max_conns``.  Candidates are the usable
primary servers not yet tried by this session; when there are none, the usable backup servers.  No
candidate: None (the bridge answers 503, or the last failure).  Among candidates:

- ``round_robin``: smooth weighted round robin (the NGINX algorithm): every pick adds each
  candidate's weight to its running score, takes the highest score and subtracts the total weight
  from it.  Weights 5/1/1 give ``a a b a c a a`` rather than ``a a a a a b c``.
- ``least_conn``: the fewest sessions (open plus opening) per unit of weight; ties by round robin.
- ``random_two``: two candidates drawn at random (weighted), the one with fewer sessions per weight.
- ``hash``: weighted rendezvous hashing of the key (client address, a header, a cookie or a query
  parameter) with each server's URL: the candidate with the highest score.  The mapping depends
  only on the server list (URLs and weights), so every gate with the same config agrees, and
  removing one of N servers moves only the keys that were on it (about 1/N).  A request without
  the key falls back to round robin.

While a rebalance is settling (:meth:`Upstream.start_rebalance`), every method except ``hash``
picks like ``least_conn`` so that the reconnecting clients fill the emptiest servers.

Health
======

Passive (NGINX semantics): ``max_fails`` failed attempts within ``fail_timeout`` mark a server down
for ``fail_timeout``; then it gets sessions again, and one more failure takes it down again at once
while one success clears its count.  An upstream with a single server ignores passive health
(like NGINX): there is nothing to fail over to, so it is always tried.  Active checks (``health.py``) set :attr:`Server.healthy`
through :meth:`Upstream.set_healthy`.  Every change of a server's state is logged as one
``server_down``/``server_up``/``server_draining``/``server_undrained`` event with the fields
``upstream``, ``server``, ``source`` and ``reason``, and counted in the counters given to the
upstream (``servers.down``, ``servers.up``, ...).

A little over 500 lines because the balancing methods, passive health and draining all change the
same per-server state (:class:`Server`), which is clearer in one place than spread over modules.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from twisted.logger import Logger

from wsgate.config import ServerSpec, UpstreamSpec

__all__ = ["Server", "Upstream", "address_url", "request_key", "runtime_resets"]

# How long after a rebalance's last close new sessions keep being steered to the emptiest servers.
REBALANCE_SETTLE = 30.0


class Server:
    """
    One backend server and what the gate knows about it right now.  The console, metrics and the
    balancers read ``url``, ``weight``, ``active``, ``state``, ``backup``, ``fails`` and
    ``last_check``.
    """

    def __init__(
        self, spec: ServerSpec, now: Callable[[], float], origin: ServerSpec | None = None
    ):
        self.spec = spec
        # The configured entry this server comes from (for a DNS-discovered server, the entry with
        # the host name; otherwise ``spec`` itself).
        self.origin = origin or spec
        self.url = spec.url
        self.weight = spec.weight
        self.max_conns = spec.max_conns
        self.backup = spec.backup
        self.active = 0
        self.connecting = 0
        self.sessions_total = 0
        # Failed attempts in the current passive-health window (see the module docstring).
        self.fails = 0
        self.fails_total = 0
        self.healthy = True
        self.draining = False
        # Removed from the config or from DNS: drained, and forgotten once it has no sessions.
        self.retired = False
        self.last_check: float | None = None
        self.down_until: float | None = None
        self._window_start: float | None = None
        self._now = now
        # Smooth weighted round robin state (see Upstream.pick).
        self._current_weight = 0

    @property
    def state(self) -> str:
        """``"draining"``, ``"down"`` (active check or passive fail_timeout) or ``"up"``."""
        if self.draining:
            return "draining"
        if not self.healthy or self.passive_down:
            return "down"
        return "up"

    @property
    def passive_down(self) -> bool:
        return self.down_until is not None and self._now() < self.down_until

    @property
    def full(self) -> bool:
        return 0 < self.max_conns <= self.active + self.connecting

    @property
    def load(self) -> float:
        """Sessions (open and opening) per unit of weight."""
        return (self.active + self.connecting) / self.weight

    def __repr__(self) -> str:
        return f"<Server {self.url} {self.state} active={self.active}>"


def address_url(template: str, address: str) -> str:
    """``template``'s URL with its host replaced by ``address`` (IPv6 in brackets)."""
    parts = urlsplit(template)
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def request_key(
    key: str,
    client: str,
    headers: Mapping[str, str] | None,
    params: Mapping[str, list[str]] | None,
) -> str | None:
    """
    The value ``hash`` balances on for a request, by the upstream's ``key`` setting: ``"ip"``,
    ``"header:NAME"``, ``"cookie:NAME"`` or ``"query:NAME"``; None when the request lacks it.
    ``headers`` have lower-case names.
    """
    kind, _, name = key.partition(":")
    if kind == "ip":
        return client or None
    if kind == "header":
        return (headers or {}).get(name.lower())
    if kind == "cookie":
        for part in (headers or {}).get("cookie", "").split(";"):
            cookie, sep, value = part.strip().partition("=")
            if sep and cookie == name:
                return value
        return None
    if kind == "query":
        values = (params or {}).get(name)
        return values[0] if values else None
    return None


def _score(key: str, server: Server) -> float:
    """Weighted rendezvous score: the highest over the servers owns the key."""
    digest = hashlib.blake2b(f"{key}\0{server.url}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -server.weight / math.log(unit)


class Upstream:
    """
    A named set of servers, the balancing method and the servers' health.  See the module
    docstring for how ``pick`` chooses.
    """

    log = Logger()

    def __init__(
        self,
        spec: UpstreamSpec,
        clock: Any = None,
        counters: Counter[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._rng = rng or random.Random()
        self._steer_until: float | None = None
        self.spec = spec
        self.name = spec.name
        self.servers: list[Server] = [Server(s, self.now) for s in spec.servers]

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.monotonic()

    def find(self, url: str) -> Server | None:
        for server in self.servers:
            if server.url == url.rstrip("/"):
                return server
        return None

    # -- choosing -----------------------------------------------------------------------------

    def pick(
        self,
        exclude: Collection[Server] = (),
        *,
        client: str = "",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, list[str]] | None = None,
    ) -> Server | None:
        """
        The server for a new session or request, skipping ``exclude`` (servers already tried);
        None if no server is usable.  ``client``, ``headers`` (lower-case names) and ``params``
        (query parameters) describe the request, for ``hash``.
        """
        self._forget_retired()
        usable = [s for s in self.servers if s not in exclude and s.state == "up" and not s.full]
        candidates = [s for s in usable if not s.backup] or usable
        if not candidates:
            return None
        method = self.spec.balance
        if method == "hash":
            key = request_key(self.spec.key, client, headers, params)
            if key is not None:
                return max(candidates, key=lambda s: _score(key, s))
            return self._round_robin(candidates)
        if self._steer_until is not None:
            if self.now() < self._steer_until:
                method = "least_conn"
            else:
                self._steer_until = None
        if method == "least_conn":
            lowest = min(s.load for s in candidates)
            return self._round_robin([s for s in candidates if s.load == lowest])
        if method == "random_two" and len(candidates) > 1:
            weights = [s.weight for s in candidates]
            a, b = self._rng.choices(candidates, weights, k=2)
            while b is a:
                b = self._rng.choices(candidates, weights)[0]
            return a if a.load <= b.load else b
        return self._round_robin(candidates)

    def _round_robin(self, candidates: list[Server]) -> Server:
        best = candidates[0]
        total = 0
        for server in candidates:
            server._current_weight += server.weight
            total += server.weight
            if server._current_weight > best._current_weight:
                best = server
        best._current_weight -= total
        return best

    def owner(self, key: str) -> Server | None:
        """For ``hash``: the usable server that owns ``key`` now."""
        usable = [s for s in self.servers if s.state == "up" and not s.full]
        candidates = [s for s in usable if not s.backup] or usable
        return max(candidates, key=lambda s: _score(key, s)) if candidates else None

    # -- what the bridge reports --------------------------------------------------------------

    def attempt_started(self, server: Server) -> None:
        server.connecting += 1

    def attempt_ended(self, server: Server, ok: bool | None) -> None:
        """
        An attempt on ``server`` ended: ``ok`` True (the backend accepted), False (it failed: it
        counts against the server's passive health) or None (abandoned: the client left).
        """
        server.connecting = max(0, server.connecting - 1)
        if ok:
            self.succeeded(server)
        elif ok is False:
            self.failed(server)

    def succeeded(self, server: Server) -> None:
        was_down = server.down_until is not None
        server.fails = 0
        server._window_start = None
        server.down_until = None
        if was_down:
            self._event(server, "up", "passive", "an attempt succeeded")

    def failed(self, server: Server) -> None:
        server.fails_total += 1
        max_fails, fail_timeout = self.spec.max_fails, self.spec.fail_timeout
        if max_fails == 0 or sum(not s.retired for s in self.servers) == 1:
            return  # like NGINX: a lone server is always tried
        now = self.now()
        if server.down_until is not None:
            # Back after fail_timeout, and failed again: down again at once.
            server.down_until = now + fail_timeout
            return
        if server._window_start is None or now - server._window_start > fail_timeout:
            server._window_start = now
            server.fails = 0
        server.fails += 1
        if server.fails >= max_fails:
            server.down_until = now + fail_timeout
            self._event(
                server, "down", "passive", f"{server.fails} failed attempts within {fail_timeout}s"
            )

    # -- what the health checks and the operator report ---------------------------------------

    def set_healthy(self, server: Server, healthy: bool, reason: str) -> None:
        """The active checks' verdict (called on a change only)."""
        if server.healthy == healthy:
            return
        server.healthy = healthy
        if healthy:
            # A server the checks bring back starts with a clean passive record.
            server.fails = 0
            server._window_start = None
            server.down_until = None
        self._event(server, "up" if healthy else "down", "active", reason)

    def set_draining(self, server: Server, draining: bool, reason: str = "operator") -> None:
        if server.draining == draining:
            return
        server.draining = draining
        self._event(server, "draining" if draining else "undrained", "operator", reason)

    def _event(self, server: Server, what: str, source: str, reason: str) -> None:
        self.counters[f"servers.{what}"] += 1
        emit = self.log.info if what in ("up", "undrained") else self.log.warn
        emit(
            "server_" + what + " {upstream} {server} source={source} reason={reason}",
            upstream=self.name,
            server=server.url,
            source=source,
            reason=reason,
            state=server.state,
        )

    # -- rebalancing --------------------------------------------------------------------------

    def excess(self) -> dict[Server, int]:
        """
        How many sessions each usable server holds beyond its weighted share of all sessions on
        usable servers (only servers with an excess are listed).
        """
        usable = [s for s in self.servers if s.state == "up" and not s.backup]
        if not usable:
            return {}
        total = sum(s.active for s in usable)
        weight = sum(s.weight for s in usable)
        plan = {}
        for server in usable:
            share = total * server.weight / weight
            extra = server.active - math.ceil(share - 1e-9)
            if extra > 0:
                plan[server] = extra
        return plan

    def imbalance(self) -> float:
        """The most loaded usable server's sessions as a multiple of its weighted share (1.0: even)."""
        usable = [s for s in self.servers if s.state == "up" and not s.backup]
        total = sum(s.active for s in usable)
        if not usable or total == 0:
            return 1.0
        weight = sum(s.weight for s in usable)
        return max(s.active / (total * s.weight / weight) for s in usable)

    @property
    def rebalancing(self) -> bool:
        """Whether a rebalance is settling (new sessions are steered to the emptiest servers)."""
        return self._steer_until is not None and self.now() < self._steer_until

    def start_rebalance(self, window: float) -> None:
        """Steer new sessions to the emptiest servers while a rebalance's closes come in."""
        self._steer_until = self.now() + window + REBALANCE_SETTLE

    # -- changing the server list -------------------------------------------------------------

    def update(self, spec: UpstreamSpec) -> None:
        """
        Take a new spec for this upstream (config reload): servers that remain (same URL) keep
        their runtime state (active sessions, failures, health, draining) and take the new weight,
        ``max_conns`` and ``backup``; new servers are added; removed ones are drained and
        forgotten once their last session ends.  DNS-discovered servers of an entry that remains
        stay until the next resolution.
        """
        self.spec = spec
        self.name = spec.name
        wanted = {s.url: s for s in spec.servers}
        origins = {s.url for s in spec.servers if s.resolve}
        kept = set()
        for server in self.servers:
            new = wanted.get(server.url)
            if new is None and server.origin.url in origins and server.origin is not server.spec:
                new_origin = wanted[server.origin.url]
                self._respec(server, _address_spec(new_origin, server.url), new_origin)
                kept.add(server.url)
            elif new is not None and not server.retired:
                self._respec(server, new, new)
                kept.add(server.url)
            elif not server.retired:
                self._retire(server, "removed from the config")
        for url, new in wanted.items():
            if url not in kept and not any(
                s.origin.url == url and s.url != url and not s.retired for s in self.servers
            ):
                self.servers.append(Server(new, self.now))
        self._forget_retired()

    def add_server(self, spec: ServerSpec) -> Server:
        """
        Add a server at run time (the operator's ``add``), until the next reload, which keeps only
        the file's servers (see :func:`runtime_resets`).  A URL already here is a ValueError,
        unless it is being removed: then it takes sessions again.
        """
        current = self.find(spec.url)
        if current is not None and not current.retired:
            raise ValueError(f"upstream {self.name} already has the server {spec.url}")
        if current is not None:
            current.retired = False
            self._respec(current, spec, spec)
            self.set_draining(current, False, "operator: added again")
            return current
        server = Server(spec, self.now)
        self.servers.append(server)
        self._event(server, "added", "operator", "added at run time")
        return server

    def remove_server(self, url: str) -> Server:
        """Remove a server at run time: drained now, forgotten once its last session ends."""
        server = self.find(url)
        if server is None or server.retired:
            raise LookupError(f"upstream {self.name} has no server {url}")
        self._retire(server, "operator: removed")
        self._forget_retired()
        return server

    def set_addresses(
        self, origin_url: str, addresses: Iterable[str]
    ) -> tuple[list[str], list[str]]:
        """
        DNS answered ``addresses`` for the ``resolve = true`` entry ``origin_url``: each address is
        a server; those no longer listed are drained.  Until the first answer the entry itself (its
        host name) is the server.  Returns the URLs (added, removed).
        """
        origin = next((s for s in self.spec.servers if s.url == origin_url), None)
        if origin is None:
            return [], []
        urls = {address_url(origin.url, a) for a in addresses}
        if not urls:
            return [], []
        current = {s.url: s for s in self.servers if s.origin.url == origin_url and not s.retired}
        added, removed = [], []
        for url, server in current.items():
            if url not in urls:
                self._retire(server, "no longer in DNS" if url != origin_url else "resolved")
                removed.append(url)
        for url in sorted(urls - current.keys()):
            revived = next((s for s in self.servers if s.url == url), None)
            if revived is not None:  # came back before its last session ended
                revived.retired = False
                self.set_draining(revived, False, "back in DNS")
            else:
                self.servers.append(Server(_address_spec(origin, url), self.now, origin))
            added.append(url)
        self._forget_retired()
        return added, removed

    def _respec(self, server: Server, spec: ServerSpec, origin: ServerSpec) -> None:
        server.spec = spec
        server.origin = origin
        server.weight = spec.weight
        server.max_conns = spec.max_conns
        server.backup = spec.backup

    def _retire(self, server: Server, reason: str) -> None:
        server.retired = True
        self.set_draining(server, True, reason)

    def _forget_retired(self) -> None:
        if any(s.retired and s.active == 0 and s.connecting == 0 for s in self.servers):
            self.servers = [
                s for s in self.servers if not (s.retired and s.active == 0 and s.connecting == 0)
            ]


def _address_spec(origin: ServerSpec, url: str) -> ServerSpec:
    return replace(origin, url=url, resolve=False)


def runtime_resets(upstream: Upstream, spec: UpstreamSpec) -> list[str]:
    """
    What a reload to ``spec`` undoes of the operator's run-time changes to ``upstream``, one
    readable line each: a weight set at run time, a server added or removed at run time.
    (Draining stays across a reload: it is not reset.)
    """
    wanted = {s.url: s for s in spec.servers}
    configured = {s.url for s in upstream.spec.servers}
    lines = []
    for server in upstream.servers:
        if server.retired or server.origin is not server.spec:  # DNS found it: not in the file
            continue
        new = wanted.get(server.url)
        where = f"{server.url} in upstream {upstream.name}"
        if new is None:
            if server.url not in configured:
                lines.append(f"server {where} added at run time, removed by the file")
        elif new.weight != server.weight and (
            server.url not in configured or server.weight != server.spec.weight
        ):
            lines.append(
                f"weight of {where} set at run time to {server.weight}, "
                f"reset to {new.weight} by the file"
            )
    live = {s.url for s in upstream.servers if not s.retired}
    for entry in upstream.spec.servers:
        new = wanted.get(entry.url)
        if new is not None and not entry.resolve and entry.url not in live:
            where = f"{entry.url} in upstream {upstream.name}"
            lines.append(f"server {where} removed at run time, back from the file")
    return lines

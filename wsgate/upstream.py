"""
Upstreams: groups of backend servers and the choice of one server for a new session.

Owns each server's runtime state (active sessions, failures) and the balancing method.  Must not
sleep or connect: the bridge reports what happened to each attempt, the upstream only decides.
"""

from __future__ import annotations

from collections.abc import Collection

from wsgate.config import ServerSpec, UpstreamSpec

__all__ = ["Server", "Upstream"]


class Server:
    """One backend server and what the gate knows about it right now."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.url = spec.url
        self.weight = spec.weight
        self.active = 0
        self.sessions_total = 0
        self.fails = 0
        # "up", "down" or "draining"; read by the console, metrics and the balancer.
        self.state = "up"
        self.backup = False
        self.last_check: float | None = None
        # Smooth weighted round robin state (see Upstream.pick).
        self._current_weight = 0

    def __repr__(self) -> str:
        return f"<Server {self.url} active={self.active}>"


class Upstream:
    """
    A named set of servers.  ``pick`` chooses the server for the next session with smooth weighted
    round robin (the NGINX algorithm): every pick adds each candidate's weight to its running score,
    takes the highest score and subtracts the total weight from it.  Weights 5/1/1 then give
    ``a a b a c a a`` rather than ``a a a a a b c``: weights are honoured without bursts.
    """

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.servers = [Server(s) for s in spec.servers]

    def pick(self, exclude: Collection[Server] = ()) -> Server | None:
        """The server for a new session, skipping ``exclude`` (servers already tried); None if none is left."""
        best = None
        total = 0
        for server in self.servers:
            if server in exclude:
                continue
            server._current_weight += server.weight
            total += server.weight
            if best is None or server._current_weight > best._current_weight:
                best = server
        if best is not None:
            best._current_weight -= total
        return best

"""
Active health checks and the automatic rebalance: periodic services that watch upstreams.

:class:`HealthChecker` probes every server of one upstream every ``interval`` (``[upstream.X.health]``)
and reports to the upstream when ``rise`` successes or ``fall`` failures in a row change a server's
verdict (the upstream logs ``server_up``/``server_down`` and counts them).  :class:`Probes` are the
real probes (TCP connect, WebSocket handshake, HTTP GET), opened through the same connector as the
sessions; tests pass their own.  :class:`AutoRebalance` calls ``gateway.rebalance`` when an upstream's
most loaded server holds more than ``rebalance_threshold`` times its share.

This module decides nothing about balancing and must not touch sessions itself; it takes the clock,
the probes and the way to find its upstream as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate.config import HealthSpec, ServerSpec
from wsgate.core.upstream import Server, Upstream

__all__ = ["AutoRebalance", "HealthChecker", "Probe", "Probes"]

Probe = Callable[[Server, HealthSpec], Deferred]
"""Checks one server: the Deferred fires when it is healthy and fails when it is not."""


class HealthChecker(Service):
    """
    Probes the servers of the upstream ``find_upstream()`` returns (looked up every round, so a
    reload's new spec applies) every ``health.interval`` seconds.  Each probe has
    ``health.timeout``; a server still being probed is not probed again.
    """

    log = Logger()

    def __init__(self, find_upstream: Callable[[], Upstream | None], probe: Probe, clock: Any):
        self.find_upstream = find_upstream
        self.probe = probe
        self.clock = clock
        self._call: Any = None
        self._pending: dict[Server, Deferred] = {}
        self._streak: dict[Server, int] = {}  # > 0: successes in a row, < 0: failures in a row

    def startService(self) -> None:
        super().startService()
        self._round()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for d in list(self._pending.values()):
            d.cancel()
        self._pending.clear()
        return succeed(None)

    def _round(self) -> None:
        self._call = None
        upstream = self.find_upstream()
        spec = upstream.spec.health if upstream is not None else None
        if upstream is None or spec is None:
            return
        for server in list(upstream.servers):
            if server.retired or server in self._pending:
                continue
            try:
                d = self.probe(server, spec)
            except Exception:
                d = Deferred()
                d.errback(Failure())
            self._pending[server] = d
            d.addTimeout(spec.timeout, self.clock)
            d.addCallbacks(
                self._result,
                self._result,
                callbackArgs=(upstream, server, spec, True),
                errbackArgs=(upstream, server, spec, False),
            )
        self._forget(upstream)
        if self.running:
            self._call = self.clock.callLater(spec.interval, self._round)

    def _result(
        self, result: Any, upstream: Upstream, server: Server, spec: HealthSpec, ok: bool
    ) -> None:
        self._pending.pop(server, None)
        if not self.running:
            return
        server.last_check = self.clock.seconds()
        upstream.counters["health.checks"] += 1
        streak = self._streak.get(server, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streak[server] = streak
        if ok and not server.healthy and streak >= spec.rise:
            upstream.set_healthy(server, True, f"{streak} {spec.type} checks passed")
        elif not ok:
            upstream.counters["health.failures"] += 1
            if server.healthy and -streak >= spec.fall:
                reason = result.getErrorMessage() if isinstance(result, Failure) else str(result)
                upstream.set_healthy(
                    server, False, f"{-streak} {spec.type} checks failed, last: {reason}"
                )

    def _forget(self, upstream: Upstream) -> None:
        for server in list(self._streak):
            if server not in upstream.servers:
                del self._streak[server]


class _TcpProbe(Protocol):
    transport: Any

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _HttpProbe(Protocol):
    """Sends ``GET path`` and fires ``result`` with the status code of the answer."""

    transport: Any

    def __init__(self, host: str, path: str) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsgate-health\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        self.result: Deferred = Deferred()
        self._data = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if b"\r\n" in self._data and not self.result.called:
            line = self._data.split(b"\r\n", 1)[0].split(b" ")
            status = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
            self.result.callback(status)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.result.called:
            self.result.errback(reason or Failure(ConnectionError("connection lost")))


class _WebSocketProbe(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.result.callback(None)
        self.sendClose(1000, "health check")

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.result.called:
            self.factory.result.errback(
                Failure(ConnectionError(f"handshake failed: {self.wasNotCleanReason or reason}"))
            )


class Probes:
    """
    The real probes, through ``connect(server_spec, factory, timeout)`` (the sessions' connector):
    ``tcp`` connects (and completes TLS for ``wss://``), ``http`` expects a 2xx answer to
    ``GET path``, ``websocket`` completes an opening handshake to ``path`` and closes with 1000.
    """

    def __init__(self, connect: Callable[[ServerSpec, Any, float], Deferred]) -> None:
        self.connect = connect

    def __call__(self, server: Server, spec: HealthSpec) -> Deferred:
        host = f"{server.spec.host}:{server.spec.port}"
        if spec.type == "tcp":
            return self.connect(server.spec, Factory.forProtocol(_TcpProbe), spec.timeout)
        if spec.type == "http":
            probe = _HttpProbe(host, spec.path)
            d = self.connect(server.spec, _Once(probe), spec.timeout)
            d.addCallback(lambda _: probe.result)
            d.addCallback(_expect_2xx)
            return d
        factory: Any = WebSocketClientFactory(server.url + spec.path)
        factory.protocol = _WebSocketProbe
        factory.result = Deferred()
        # No openHandshakeTimeout: txaio rounds it down to whole seconds, so a "500ms" probe would
        # fail healthy servers.  The round's addTimeout (the reactor's clock) bounds the probe.
        factory.setProtocolOptions(openHandshakeTimeout=0, failByDrop=False)
        opened = self.connect(server.spec, factory, spec.timeout)
        opened.addCallback(lambda _: factory.result)
        return opened


class _Once(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        self.protocol_instance.factory = self
        return self.protocol_instance


def _expect_2xx(status: int) -> int:
    if not 200 <= status < 300:
        raise ValueError(f"HTTP status {status}")
    return status


class AutoRebalance(Service):
    """
    Every ``rebalance_interval`` seconds, rebalances the upstream ``upstream_name`` when its most loaded
    server holds more than ``rebalance_threshold`` times its weighted share and no rebalance is
    settling.  ``rebalance(name, window)`` is the gateway's.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        find_upstream: Callable[[], Upstream | None],
        rebalance: Callable[[str, float], int],
        clock: Any,
    ) -> None:
        self.upstream_name = name
        self.find_upstream = find_upstream
        self.rebalance = rebalance
        self.clock = clock
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return succeed(None)

    def _schedule(self) -> None:
        upstream = self.find_upstream()
        if upstream is not None and self.running:
            self._call = self.clock.callLater(upstream.spec.rebalance_interval, self._check)

    def _check(self) -> None:
        self._call = None
        upstream = self.find_upstream()
        if upstream is not None:
            spec = upstream.spec
            imbalance = upstream.imbalance()
            if 0 < spec.rebalance_threshold < imbalance and not upstream.rebalancing:
                self.log.info(
                    "rebalance_auto {upstream} imbalance={imbalance:.2f}",
                    upstream=self.upstream_name,
                    imbalance=imbalance,
                )
                self.rebalance(self.upstream_name, spec.rebalance_window)
        self._schedule()

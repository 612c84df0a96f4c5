"""
DNS discovery: servers marked ``resolve = true`` follow their host name's A and AAAA records.

:class:`DnsDiscovery` is a Service that, for one upstream, resolves the host name of every
``resolve = true`` server every ``resolve_interval`` seconds and hands the addresses to
:meth:`Upstream.set_addresses <wsgate.core.upstream.Upstream.set_addresses>`: new addresses become
servers (they get new sessions at once), addresses gone from DNS are drained (their live sessions
continue, they get no new ones).  A failed or empty answer keeps the servers as they are (a DNS
outage must not empty an upstream).  Each change is logged as ``dns_changed``.

It owns no servers and must not read ``/etc/resolv.conf`` itself: the resolver (an
``IResolver``, e.g. ``twisted.names.client.createResolver()``) and the clock are arguments.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure

from wsgate.core.upstream import Upstream

__all__ = ["DnsDiscovery"]


class DnsDiscovery(Service):
    """Re-resolves the ``resolve = true`` servers of the upstream ``find_upstream()`` returns."""

    log = Logger()

    def __init__(self, find_upstream: Callable[[], Upstream | None], resolver: Any, clock: Any):
        self.find_upstream = find_upstream
        self.resolver = resolver
        self.clock = clock
        self._call: Any = None
        self._pending: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        self.resolve_now()

    def stopService(self) -> Deferred:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        for d in list(self._pending):
            d.cancel()
        return succeed(None)

    def resolve_now(self) -> Deferred:
        """Resolve every ``resolve = true`` server now; fires when all answers are applied."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        upstream = self.find_upstream()
        if upstream is None:
            return succeed(None)
        rounds = []
        for spec in upstream.spec.servers:
            if spec.resolve:
                rounds.append(self._resolve(upstream, spec.url, spec.host))
        done = DeferredList(rounds)
        done.addCallback(lambda _: self._schedule())
        return done

    def _schedule(self) -> None:
        upstream = self.find_upstream()
        if self.running and upstream is not None:
            self._call = self.clock.callLater(upstream.spec.resolve_interval, self.resolve_now)

    def _resolve(self, upstream: Upstream, url: str, host: str) -> Deferred:
        lookups = [self.resolver.lookupAddress(host), self.resolver.lookupIPV6Address(host)]
        self._pending.extend(lookups)
        answers = DeferredList(lookups, consumeErrors=True)
        answers.addCallback(self._answered, upstream, url, host, lookups)
        answers.addErrback(self._failed, host)
        return answers

    def _answered(
        self,
        results: list[tuple[bool, Any]],
        upstream: Upstream,
        url: str,
        host: str,
        lookups: list,
    ) -> None:
        for d in lookups:
            if d in self._pending:
                self._pending.remove(d)
        addresses: list[str] = []
        errors = []
        for ok, result in results:
            if not ok:
                errors.append(result.getErrorMessage() or result.type.__name__)
                continue
            answers = result[0]
            for record in answers:
                # Every address record of the answer counts (CNAME chains end in them).
                if record.type == dns.A:
                    addresses.append(record.payload.dottedQuad())
                elif record.type == dns.AAAA:
                    addresses.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
        if not addresses:
            self.log.warn(
                "dns_failed {host}: no A/AAAA records ({errors}); keeping the current servers",
                host=host,
                errors="; ".join(errors) or "empty answer",
            )
            return
        added, removed = upstream.set_addresses(url, sorted(set(addresses)))
        if added or removed:
            self.log.info(
                "dns_changed {upstream} {host} added={added} removed={removed}",
                upstream=upstream.name,
                host=host,
                added=",".join(added) or "-",
                removed=",".join(removed) or "-",
            )

    def _failed(self, reason: Failure, host: str) -> None:
        self.log.failure("dns_failed {host}", reason, host=host)

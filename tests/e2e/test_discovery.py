"""
DNS discovery against a real DNS server on loopback (``twisted.names``): addresses become servers,
removed ones are drained, failures keep the current servers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import fail, succeed
from twisted.names import client, dns, error, server
from twisted.names.common import ResolverBase
from twisted.trial.unittest import TestCase

from wsgate.config import ServerSpec, UpstreamSpec
from wsgate.control.discovery import DnsDiscovery
from wsgate.core.upstream import Upstream

NAME = "chat.svc.test"


class Zone(ResolverBase):
    """An authority whose A/AAAA records for NAME the test changes at will."""

    def __init__(self) -> None:
        super().__init__()
        self.a: list[str] = []
        self.aaaa: list[str] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        if name.decode() != NAME:
            return fail(error.DomainError(name))
        if type == dns.A:
            records = [dns.Record_A(a, ttl=1) for a in self.a]
        elif type == dns.AAAA:
            records = [dns.Record_AAAA(a, ttl=1) for a in self.aaaa]
        else:
            records = []
        answers = [dns.RRHeader(name, r.TYPE, dns.IN, 1, r, auth=True) for r in records]
        return succeed((answers, [], []))


class DnsDiscoveryTests(TestCase):
    def setUp(self) -> None:
        self.zone = Zone()
        factory = server.DNSServerFactory(authorities=[self.zone])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        port = udp.getHost().port
        self.resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        self.clock = task.Clock()
        spec = UpstreamSpec(
            name="u",
            servers=(
                ServerSpec(url=f"ws://{NAME}:9000", resolve=True),
                ServerSpec(url="ws://127.0.0.1:7000"),
            ),
            resolve_interval=30.0,
        )
        self.upstream = Upstream(spec, self.clock)
        self.discovery = DnsDiscovery(lambda: self.upstream, self.resolver, self.clock)

    def urls(self, state: str = "up") -> set[str]:
        return {s.url for s in self.upstream.servers if s.state == state}

    async def test_follows_changes(self) -> None:
        """
        Two A records and one AAAA record become three servers; after a change one address is
        drained (its session continues), one added; at the next resolve_interval the change is
        picked up by the service's own timer; an empty answer keeps the servers.
        """
        self.zone.a = ["127.0.0.11", "127.0.0.12"]
        self.zone.aaaa = ["::1"]
        await self.discovery.resolve_now()
        self.assertEqual(
            self.urls(),
            {
                "ws://127.0.0.11:9000",
                "ws://127.0.0.12:9000",
                "ws://[::1]:9000",
                "ws://127.0.0.1:7000",
            },
        )
        eleven = self.upstream.find("ws://127.0.0.11:9000")
        assert eleven is not None
        eleven.active = 1
        self.zone.a = ["127.0.0.12", "127.0.0.13"]
        self.zone.aaaa = []
        self.discovery.startService()
        self.addCleanup(self.discovery.stopService)
        for _ in range(100):  # the first round of the service, on the real reactor
            if "ws://127.0.0.13:9000" in self.urls():
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(
            self.urls(), {"ws://127.0.0.12:9000", "ws://127.0.0.13:9000", "ws://127.0.0.1:7000"}
        )
        self.assertEqual(self.urls("draining"), {"ws://127.0.0.11:9000"})
        self.assertEqual(eleven.active, 1)
        self.assertNotIn("ws://[::1]:9000", {s.url for s in self.upstream.servers})
        # The next round comes from the service's clock.
        self.zone.a = ["127.0.0.14"]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(30)
        for _ in range(100):
            if "ws://127.0.0.14:9000" in self.urls():
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.urls(), {"ws://127.0.0.14:9000", "ws://127.0.0.1:7000"})
        # No records: nothing changes.
        self.zone.a = []
        await self.discovery.resolve_now()
        self.assertEqual(self.urls(), {"ws://127.0.0.14:9000", "ws://127.0.0.1:7000"})

    async def test_before_first_answer(self) -> None:
        """Until DNS answers, the entry's own host name is a server (the connect resolves it)."""
        self.assertEqual(self.urls(), {f"ws://{NAME}:9000", "ws://127.0.0.1:7000"})
        self.zone.a = ["127.0.0.21"]
        await self.discovery.resolve_now()
        self.assertEqual(self.urls(), {"ws://127.0.0.21:9000", "ws://127.0.0.1:7000"})

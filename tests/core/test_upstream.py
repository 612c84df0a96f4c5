"""
Choosing a server: the balancing methods, weights, max_conns, backup, passive health, draining and
changes of the server list, and the ``[upstream]`` keys.  Figures measured here are quoted in the
issue's closing note.  Upstreams through a gate in memory: ``tests/dataplane/test_gateway.py``.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from wsgate import config as configmod
from wsgate.config import ServerSpec, UpstreamSpec
from wsgate.core.upstream import Server, Upstream, address_url, request_key


def upstream(
    *weights: int, balance: str = "round_robin", clock: Any = None, **options: Any
) -> Upstream:
    servers = tuple(ServerSpec(url=f"ws://s{i}.test:1", weight=w) for i, w in enumerate(weights))
    spec = UpstreamSpec(name="u", servers=servers, balance=balance, **options)
    return Upstream(spec, clock or task.Clock(), rng=random.Random(7))


def spec_of(servers: list[ServerSpec], **options: Any) -> UpstreamSpec:
    return UpstreamSpec(name="u", servers=tuple(servers), **options)


def picked(u: Upstream, **request: Any) -> Server:
    server = u.pick(**request)
    assert server is not None
    return server


def open_session(u: Upstream, **request: Any) -> Server:
    """Pick and count a session as opened on the server (what the bridge does)."""
    server = picked(u, **request)
    u.attempt_started(server)
    u.attempt_ended(server, True)
    server.active += 1
    return server


class RoundRobinTests(SynchronousTestCase):
    def test_smooth(self) -> None:
        """Weights 5/1/1 interleave (a a b a c a a), never a burst of five."""
        u = upstream(5, 1, 1)
        picks = "".join("abc"[u.servers.index(picked(u))] for _ in range(7))
        self.assertEqual(picks, "aabacaa")

    def test_exact_over_cycle(self) -> None:
        """Over whole cycles every server gets exactly its weight's share."""
        u = upstream(3, 2, 1)
        counts = Counter(picked(u).url for _ in range(600))
        self.assertEqual(sorted(counts.values()), [100, 200, 300])

    def test_exclude(self) -> None:
        """Servers already tried are skipped; with all tried there is no server."""
        u = upstream(1, 1)
        first = picked(u)
        self.assertIsNot(u.pick(exclude=[first]), first)
        self.assertIsNone(u.pick(exclude=u.servers))


class LeastConnTests(SynchronousTestCase):
    def test_long_sessions_weighted(self) -> None:
        """
        With long sessions (opened, never closed) on weights 3/1, least_conn keeps the counts at
        3:1 after every pick (within one session).
        """
        u = upstream(3, 1, balance="least_conn")
        for n in range(1, 401):
            open_session(u)
            a, b = (s.active for s in u.servers)
            self.assertLessEqual(abs(a - 3 * b), 3, n)
        self.assertEqual([s.active for s in u.servers], [300, 100])

    def test_fills_the_emptiest(self) -> None:
        """A server added next to loaded ones gets every new session until it has caught up."""
        u = upstream(1, 1, balance="least_conn")
        for _ in range(20):
            open_session(u)
        u.update(
            spec_of(
                [*(s.spec for s in u.servers), ServerSpec(url="ws://new.test:1")],
                balance="least_conn",
            )
        )
        got = [open_session(u).url for _ in range(10)]
        self.assertEqual(got, ["ws://new.test:1"] * 10)
        self.assertEqual([s.active for s in u.servers], [10, 10, 10])

    def test_churn_distribution(self) -> None:
        """
        5,000 sessions with random lifetimes on weights 2/1/1: every server holds its weighted share
        of the open sessions within 2 sessions at all times.
        """
        u = upstream(2, 1, 1, balance="least_conn")
        rng = random.Random(3)
        live: list[Server] = []
        worst = 0.0
        for _ in range(5000):
            if live and rng.random() < 0.45:
                live.pop(rng.randrange(len(live))).active -= 1
            live.append(open_session(u))
            total = len(live)
            for s in u.servers:
                worst = max(worst, abs(s.active - total * s.weight / 4))
        self.assertLessEqual(worst, 2.0)


class RandomTwoTests(SynchronousTestCase):
    def test_distribution(self) -> None:
        """
        10,000 long sessions on weights 2/1/1 with power-of-two choices: each server's share is
        within 2 percentage points of its weight's share.
        """
        u = upstream(2, 1, 1, balance="random_two")
        for _ in range(10000):
            open_session(u)
        shares = [s.active / 10000 for s in u.servers]
        for share, expected in zip(shares, [0.5, 0.25, 0.25], strict=True):
            self.assertLessEqual(abs(share - expected), 0.02)

    def test_one_candidate(self) -> None:
        """With one usable server, random_two picks it."""
        u = upstream(1, 1, balance="random_two")
        u.servers[0].draining = True
        self.assertIs(picked(u), u.servers[1])


class HashTests(SynchronousTestCase):
    def hashed(self, n: int, key: str = "ip") -> Upstream:
        return upstream(*([1] * n), balance="hash", key=key)

    def test_same_key_same_server(self) -> None:
        """The same client address always gets the same server, and two gates agree."""
        u1, u2 = self.hashed(4), self.hashed(4)
        for i in range(200):
            ip = f"10.0.{i // 250}.{i % 250}"
            first = picked(u1, client=ip).url
            self.assertEqual(picked(u1, client=ip).url, first)
            self.assertEqual(picked(u2, client=ip).url, first)

    def test_spread(self) -> None:
        """1,000 keys on 4 equal servers: each gets 25% +- 5 points."""
        u = self.hashed(4)
        counts = Counter(picked(u, client=f"k{i}").url for i in range(1000))
        for count in counts.values():
            self.assertLessEqual(abs(count / 1000 - 0.25), 0.05)

    def test_stability_after_removal(self) -> None:
        """Removing one of 4 servers: at least 70% of 1,000 keys keep their server (measured: 75.2%),
        and no key moves between the servers that remain."""
        u = self.hashed(4)
        before = {i: picked(u, client=f"k{i}").url for i in range(1000)}
        u.update(spec_of([s.spec for s in u.servers[:3]], balance="hash"))
        after = {i: picked(u, client=f"k{i}").url for i in range(1000)}
        kept = sum(before[i] == after[i] for i in range(1000))
        self.assertGreaterEqual(kept, 700)
        self.assertEqual(kept, sum(before[i] != "ws://s3.test:1" for i in range(1000)))

    def test_weights(self) -> None:
        """Weights 3/1: about three quarters of the keys go to the heavier server."""
        u = upstream(3, 1, balance="hash")
        counts = Counter(picked(u, client=f"k{i}").url for i in range(2000))
        self.assertLessEqual(abs(counts["ws://s0.test:1"] / 2000 - 0.75), 0.04)

    def test_down_server_keys_fail_over(self) -> None:
        """A key whose server is down goes to its second choice; other keys stay."""
        u = self.hashed(3)
        owners = {i: picked(u, client=f"k{i}") for i in range(300)}
        u.servers[0].healthy = False
        for i, owner in owners.items():
            now = picked(u, client=f"k{i}")
            if owner is not u.servers[0]:
                self.assertIs(now, owner)
            else:
                self.assertIsNot(now, owner)

    def test_keys(self) -> None:
        """Header, cookie and query keys are read from the request; a missing key falls back."""
        headers = {"x-user": "ann", "cookie": "a=1; sid=xyz; b=2"}
        params = {"room": ["r1", "r2"]}
        self.assertEqual(request_key("ip", "1.2.3.4", headers, params), "1.2.3.4")
        self.assertEqual(request_key("header:X-User", "", headers, params), "ann")
        self.assertEqual(request_key("cookie:sid", "", headers, params), "xyz")
        self.assertEqual(request_key("query:room", "", headers, params), "r1")
        self.assertIsNone(request_key("cookie:nope", "", headers, params))
        self.assertIsNone(request_key("query:nope", "", headers, None))
        u = self.hashed(3, key="cookie:sid")
        self.assertEqual(
            {picked(u, headers={"cookie": "sid=s1"}).url for _ in range(5)},
            {picked(u, headers={"cookie": "sid=s1"}).url},
        )
        keyless = Counter(picked(u, headers={}).url for _ in range(30))
        self.assertEqual(sorted(keyless.values()), [10, 10, 10])


class LimitsTests(SynchronousTestCase):
    def test_max_conns(self) -> None:
        """A server at max_conns (open plus opening sessions) is skipped; all full: no server."""
        servers = [ServerSpec(url="ws://a.test:1", max_conns=2), ServerSpec(url="ws://b.test:1")]
        u = Upstream(spec_of(servers, balance="round_robin"), task.Clock())
        a, b = u.servers
        a.active = 1
        u.attempt_started(a)
        self.assertEqual({picked(u).url for _ in range(4)}, {b.url})
        u.attempt_ended(a, None)
        self.assertIn(a, {picked(u) for _ in range(4)})
        a.active, b.max_conns, b.active = 2, 1, 1
        self.assertIsNone(u.pick())

    def test_backup(self) -> None:
        """A backup server gets sessions only while no primary is usable, and not once one is back."""
        servers = [
            ServerSpec(url="ws://a.test:1"),
            ServerSpec(url="ws://b.test:1"),
            ServerSpec(url="ws://spare.test:1", backup=True),
        ]
        u = Upstream(spec_of(servers), task.Clock())
        a, b, spare = u.servers
        self.assertNotIn(spare, {picked(u) for _ in range(10)})
        a.healthy = False
        b.draining = True
        self.assertEqual({picked(u) for _ in range(3)}, {spare})
        self.assertIs(picked(u, exclude=[a]), spare)
        b.draining = False
        self.assertEqual({picked(u) for _ in range(3)}, {b})
        # Tried every primary: the backup is the next try.
        a.healthy = True
        self.assertIs(u.pick(exclude=[a, b]), spare)


class PassiveHealthTests(SynchronousTestCase):
    def test_max_fails_within_fail_timeout(self) -> None:
        """
        max_fails = 2, fail_timeout = 10s: two failures 11 s apart do not count together; two
        within 10 s take the server down for 10 s; after that it gets sessions again, one more
        failure takes it down at once and one success clears it.
        """
        clock = task.Clock()
        u = upstream(1, 1, clock=clock, max_fails=2, fail_timeout=10.0)
        a, b = u.servers
        u.failed(a)
        clock.advance(11)
        u.failed(a)
        self.assertEqual(a.state, "up")
        clock.advance(5)
        u.failed(a)
        self.assertEqual(a.state, "down")
        self.assertEqual({picked(u) for _ in range(4)}, {b})
        self.assertEqual(u.counters["servers.down"], 1)
        clock.advance(10)
        self.assertEqual(a.state, "up")
        u.failed(a)
        self.assertEqual(a.state, "down")
        clock.advance(10)
        u.succeeded(a)
        self.assertEqual((a.state, a.fails, u.counters["servers.up"]), ("up", 0, 1))
        u.failed(a)
        self.assertEqual(a.state, "up")

    def test_all_down(self) -> None:
        """With every server down there is no server (the client gets 503)."""
        u = upstream(1, 1, max_fails=1)
        for s in u.servers:
            u.failed(s)
        self.assertIsNone(u.pick())

    def test_single_server_always_tried(self) -> None:
        """Like NGINX, a lone server is never marked down by passive health."""
        u = upstream(1)
        for _ in range(5):
            u.failed(u.servers[0])
        self.assertEqual(u.servers[0].state, "up")

    def test_off(self) -> None:
        """max_fails = 0 turns passive health off."""
        u = upstream(1, 1, max_fails=0)
        for _ in range(5):
            u.failed(u.servers[0])
        self.assertEqual(u.servers[0].state, "up")


class UpdateTests(SynchronousTestCase):
    def test_keeps_state_of_remaining(self) -> None:
        """A new spec keeps the active counts and health of servers that remain, takes new
        weights, adds new servers and drains removed ones until their last session ends."""
        u = upstream(1, 1, 1)
        a, b, c = u.servers
        a.active, b.active, b.healthy = 3, 2, False
        u.update(
            spec_of(
                [
                    ServerSpec(url=a.url, weight=5),
                    ServerSpec(url=c.url, max_conns=9, backup=True),
                    ServerSpec(url="ws://d.test:1"),
                ]
            )
        )
        self.assertEqual([s.url for s in u.servers], [a.url, b.url, c.url, "ws://d.test:1"])
        self.assertEqual((u.servers[0].active, u.servers[0].weight), (3, 5))
        self.assertEqual((b.state, b.retired), ("draining", True))
        self.assertEqual((c.max_conns, c.backup), (9, True))
        b.active = 0
        u.pick()
        self.assertNotIn(b, u.servers)

    def test_address_url(self) -> None:
        """Addresses replace the host of a resolve = true URL; IPv6 gets brackets."""
        self.assertEqual(address_url("ws://svc.test:8080", "10.0.0.1"), "ws://10.0.0.1:8080")
        self.assertEqual(address_url("ws://svc.test:8080", "::1"), "ws://[::1]:8080")
        self.assertEqual(address_url("ws://svc.test", "10.0.0.1"), "ws://10.0.0.1")

    def test_set_addresses(self) -> None:
        """DNS answers replace the host-name server with one server per address; a removed
        address is drained, an unchanged one keeps its sessions, an empty answer changes nothing."""
        origin = ServerSpec(url="ws://svc.test:9", resolve=True, weight=2)
        u = Upstream(spec_of([origin, ServerSpec(url="ws://fixed.test:1")]), task.Clock())
        self.assertEqual(u.servers[0].url, origin.url)
        added, removed = u.set_addresses(origin.url, ["10.0.0.1", "10.0.0.2"])
        self.assertEqual(added, ["ws://10.0.0.1:9", "ws://10.0.0.2:9"])
        self.assertEqual(removed, [origin.url])
        one = u.find("ws://10.0.0.1:9")
        assert one is not None
        one.active = 4
        self.assertEqual(one.weight, 2)
        u.set_addresses(origin.url, ["10.0.0.2", "10.0.0.3"])
        self.assertEqual(one.state, "draining")
        self.assertEqual(u.set_addresses(origin.url, []), ([], []))
        usable = {s.url for s in u.servers if s.state == "up"}
        self.assertEqual(usable, {"ws://10.0.0.2:9", "ws://10.0.0.3:9", "ws://fixed.test:1"})
        # A reload keeps the discovered servers of an entry that remains.
        u.update(spec_of([origin, ServerSpec(url="ws://fixed.test:1")]))
        self.assertEqual({s.url for s in u.servers if s.state == "up"}, usable)


class ConfigTests(SynchronousTestCase):
    def problems(self, upstream: dict[str, Any], route: dict[str, Any] | None = None) -> list[str]:
        data = {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u", **(route or {})}],
            "upstream": {"u": upstream},
        }
        try:
            configmod.parse(data, "t.toml")
        except configmod.ConfigError as e:
            return e.problems
        return []

    def test_valid(self) -> None:
        """Every upstream key parses into the spec, with units converted."""
        config = configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [{"path": "/", "upstream": "u", "http": True}],
                "upstream": {
                    "u": {
                        "balance": "hash",
                        "key": "cookie:sid",
                        "max_fails": 3,
                        "fail_timeout": "30s",
                        "resolve_interval": "1m",
                        "rebalance_threshold": 1.25,
                        "health": {"type": "http", "path": "/up", "interval": "500ms"},
                        "servers": [
                            {"url": "ws://a.test:1", "max_conns": 5},
                            {"url": "ws://b.test:1", "backup": True, "resolve": True},
                        ],
                    }
                },
            },
            "t.toml",
        )
        spec = config.upstreams["u"]
        self.assertEqual((spec.balance, spec.key, spec.fail_timeout), ("hash", "cookie:sid", 30.0))
        self.assertEqual(spec.resolve_interval, 60.0)
        assert spec.health is not None
        self.assertEqual(
            (spec.health.type, spec.health.path, spec.health.interval), ("http", "/up", 0.5)
        )
        self.assertEqual((spec.servers[0].max_conns, spec.servers[1].backup), (5, True))
        self.assertTrue(config.routes[0].http)

    def test_problems(self) -> None:
        """Bad values are reported with file and key path."""
        table = [
            ({"balance": "fastest"}, "t.toml: upstream.u.balance: 'fastest' is not one of"),
            ({"balance": "hash", "key": "body:x"}, "t.toml: upstream.u.key: 'body:x' is not"),
            ({"key": "ip"}, 't.toml: upstream.u.key: only with balance = "hash"'),
            ({"max_fails": -1}, "t.toml: upstream.u.max_fails: expected a whole number"),
            ({"rebalance_threshold": 0.5}, "t.toml: upstream.u.rebalance_threshold: expected more"),
            ({"health": {"type": "icmp"}}, "t.toml: upstream.u.health.type: 'icmp' is not one of"),
            (
                {"health": {"path": "/x"}},
                't.toml: upstream.u.health.path: not used by type = "tcp"',
            ),
            ({"health": {"fall": 0}}, "t.toml: upstream.u.health.fall: expected a whole number"),
            ({"health": {"nope": 1}}, "t.toml: upstream.u.health.nope: unknown key"),
        ]
        for options, expected in table:
            problems = self.problems({"servers": [{"url": "ws://a.test:1"}], **options})
            self.assertTrue(any(p.startswith(expected) for p in problems), (options, problems))
        problems = self.problems({"servers": [{"url": "wss://a.test:1", "resolve": True}]})
        self.assertTrue(
            problems[0].startswith("t.toml: upstream.u.servers[0].resolve: only for ws://")
        )
        problems = self.problems({"servers": [{"url": "ws://a.test:1", "backup": True}]})
        self.assertEqual(
            problems, ["t.toml: upstream.u.servers: every server is a backup: mark one primary"]
        )
        problems = self.problems({"servers": [{"url": "ws://a.test:1"}]}, {"http": "yes"})
        self.assertEqual(problems, ["t.toml: route[0].http: expected true or false"])

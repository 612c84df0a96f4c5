"""
The cluster without sockets: the Redis link's connect/auth/reconnect/fail-fast behaviour over
StringTransport and a fake clock, the ``[cluster]`` config, gates over a fake Redis (listing,
kicking and pushing into each other's sessions, draining, per-address counts, Redis gone or
stalled), and the cluster service in the tree only with ``[cluster]``.  The RESP parser and the
fleet vocabulary are in ``tests/core/test_fleet.py``.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from wsgate import config
from wsgate.config import Limits
from wsgate.control import redis
from wsgate.core.limits import Admission
from wsgate.core.resp import RespParser, encode

BASE = {
    "listen": [{"endpoint": "tcp:1"}],
    "route": [{"path": "/", "upstream": "u"}],
    "upstream": {"u": {"servers": [{"url": "ws://a:1"}]}},
}


def _connected(clock: Clock, made: list[Any]) -> Any:
    """A connect function: each attempt gets a protocol on a StringTransport, or fails."""

    def connect(factory: Any) -> Deferred:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        made.append((protocol, transport))
        return succeed(protocol)

    return connect


class RedisLinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.made: list[Any] = []
        self.events: list[str] = []
        self.link = redis.RedisLink(
            _connected(self.clock, self.made),
            self.clock,
            lambda protocol: self.events.append("ready"),  # type: ignore[func-returns-value]
            lambda: self.events.append("lost"),
            password="s3cret",
            db=3,
        )

    def test_auth_select_then_ready(self) -> None:
        """A new connection sends AUTH, then SELECT once AUTH is answered, then is ready."""
        self.link.start()
        protocol, transport = self.made[0]
        self.assertEqual(transport.value(), encode("AUTH", "s3cret"))
        transport.clear()
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(transport.value(), encode("SELECT", 3))
        self.assertEqual(self.events, [])
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.events, ["ready"])
        results: list[Any] = []
        self.link.execute("GET", "k").addCallback(results.append)
        protocol.dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(results, [b"v"])

    def test_fail_fast_while_down_and_reconnect(self) -> None:
        """While down every command fails at once; a lost connection fails its pending
        commands, tells the owner once, and the link reconnects after a backoff."""
        failed: list[Any] = []
        self.link.execute("GET", "k").addErrback(failed.append)
        self.assertTrue(failed[0].check(redis.RedisDown))
        self.link.start()
        protocol, _ = self.made[0]
        protocol.dataReceived(b"+OK\r\n+OK\r\n")
        pending: list[Any] = []
        self.link.execute("GET", "k").addErrback(pending.append)
        protocol.connectionLost(None)
        self.assertTrue(pending[0].check(redis.RedisDown))
        self.assertEqual(self.events, ["ready", "lost"])
        self.assertEqual(len(self.made), 1)
        self.clock.advance(0.25)
        self.assertEqual(len(self.made), 2)

    def test_bad_password_retries_with_backoff(self) -> None:
        """An AUTH error drops the connection (never ready) and retries later, backing off."""
        self.link.start()
        protocol, transport = self.made[0]
        protocol.dataReceived(b"-WRONGPASS invalid password\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIn("WRONGPASS", self.link.last_error)
        protocol.connectionLost(None)
        self.assertEqual(self.events, [])
        self.clock.advance(0.25)
        self.assertEqual(len(self.made), 2)

    def test_protocol_error_aborts(self) -> None:
        """Bytes that are not RESP fail what is pending and abort the connection."""
        self.link.start()
        protocol, transport = self.made[0]
        protocol.dataReceived(b"+OK\r\n+OK\r\n")
        failed: list[Any] = []
        self.link.execute("GET", "k").addErrback(failed.append)
        protocol.dataReceived(b"?garbage\r\n")
        self.assertTrue(failed[0].check(redis.RedisDown))
        self.assertTrue(transport.disconnecting)

    def test_pending_bound(self) -> None:
        """At most MAX_PENDING commands await replies; more fail at once."""
        self.patch(redis, "MAX_PENDING", 2)
        self.link.start()
        protocol, _ = self.made[0]
        protocol.dataReceived(b"+OK\r\n+OK\r\n")
        failed: list[Any] = []
        for _ in range(3):
            self.link.execute("PING").addErrback(failed.append)
        self.assertEqual(len(failed), 1)
        protocol.connectionLost(None)
        self.link.stop()

    def test_subscribe_mode(self) -> None:
        """After subscribe, every reply goes to the push callback."""
        self.link.start()
        protocol, transport = self.made[0]
        protocol.dataReceived(b"+OK\r\n+OK\r\n")
        pushed: list[Any] = []
        transport.clear()
        protocol.subscribe(["a", "b"], pushed.append)
        self.assertEqual(transport.value(), encode("SUBSCRIBE", "a", "b"))
        protocol.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
        self.assertEqual(pushed, [[b"subscribe", b"a", 1]])


class ClusterConfigTests(SynchronousTestCase):
    def test_cluster_parsed(self) -> None:
        """[cluster] reads the URL, name, prefix, durations and fleet_limits; absent, it is None."""
        self.assertIsNone(config.parse(BASE, "x").cluster)
        spec = config.parse(
            {
                **BASE,
                "cluster": {
                    "redis": "redis://10.0.0.5/2",
                    "heartbeat": "1s",
                    "ttl": "3s",
                    "fleet_limits": True,
                },
            },
            "x",
        ).cluster
        assert spec is not None
        self.assertEqual((spec.host, spec.port, spec.db), ("10.0.0.5", 6379, 2))
        self.assertEqual(
            (spec.heartbeat, spec.ttl, spec.fleet_limits, spec.prefix), (1.0, 3.0, True, "wsgate:")
        )

    def test_cluster_refused(self) -> None:
        """Bad [cluster] values are refused with file, key and reason."""
        for table, problem in (
            ({}, "x: cluster.redis: required"),
            ({"redis": "http://h"}, "x: cluster.redis: 'http://h': not a redis://host:port/db URL"),
            ({"redis": "redis://:pw@h"}, "x: cluster.redis: no credentials in the URL"),
            (
                {"redis": "redis://h/16"},
                "x: cluster.redis: 'redis://h/16': the database is a number from 0 to 15",
            ),
            (
                {"redis": "redis://h", "name": "a b"},
                "x: cluster.name: expected 1 to 100 characters",
            ),
            (
                {"redis": "redis://h", "prefix": "w*"},
                "x: cluster.prefix: no spaces or glob characters",
            ),
            ({"redis": "redis://h", "ttl": "1s"}, "x: cluster.ttl: at least twice the heartbeat"),
            (
                {"redis": "redis://h", "password_file": "/nonexistent/pw"},
                "x: cluster.password_file:",
            ),
            ({"redis": "redis://h", "bogus": 1}, "x: cluster.bogus: unknown key"),
        ):
            with self.assertRaises(config.ConfigError) as caught:
                config.parse({**BASE, "cluster": table}, "x")
            self.assertTrue(
                any(p.startswith(problem) for p in caught.exception.problems),
                caught.exception.problems,
            )
        with self.assertRaises(config.ConfigError) as caught:
            config.parse({**BASE, "workers": 2, "cluster": {"redis": "redis://h"}}, "x")
        self.assertIn("x: cluster: not available with workers > 1", caught.exception.problems[0])


# -- the cluster in memory, over a fake Redis -------------------------------------------------------


class _Pipe:
    """One direction of an in-memory connection: writes are delivered by FakeRedis.pump()."""

    def __init__(self, redis: FakeRedis, peer: Any) -> None:
        self.redis, self.peer = redis, peer
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            self.redis.queue.append((self.peer, data))

    def loseConnection(self) -> None:
        self.redis.drop(self)

    abortConnection = loseConnection


class _RedisServer:
    """The server side of one fake connection: commands parsed with the client's own parser."""

    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.parser = RespParser()
        self.transport: _Pipe | None = None

    def dataReceived(self, data: bytes) -> None:
        for command in self.parser.feed(data):
            reply = self.redis.run(self, [a.decode() for a in command])
            if reply is not None and self.transport is not None:
                self.transport.write(reply)


class FakeRedis:
    """The few commands the cluster uses, with pub/sub; ``up = False`` refuses connections."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.subscribers: dict[str, list[_RedisServer]] = {}
        self.queue: list[tuple[Any, bytes]] = []
        self.links: list[tuple[_Pipe, _Pipe, Any, _RedisServer]] = []
        self.up = True
        self.stalled = False

    def connect(self, factory: Any) -> Deferred:
        if not self.up:
            return fail(ConnectionRefusedError("connection refused"))
        client = factory.buildProtocol(None)
        server = _RedisServer(self)
        to_server, to_client = _Pipe(self, server), _Pipe(self, client)
        server.transport = to_client
        self.links.append((to_server, to_client, client, server))
        client.makeConnection(to_server)
        return succeed(client)

    def drop(self, pipe: _Pipe) -> None:
        for link in list(self.links):
            if pipe in link[:2]:
                self.links.remove(link)
                link[0].disconnecting = link[1].disconnecting = True
                for subscribers in self.subscribers.values():
                    if link[3] in subscribers:
                        subscribers.remove(link[3])
                link[2].connectionLost(None)

    def stop(self) -> None:
        """Redis goes away: every connection drops and the data with it."""
        self.up = False
        for link in list(self.links):
            self.drop(link[0])
        self.data.clear()

    def pump(self) -> None:
        for _ in range(1000):
            if not self.queue or self.stalled:
                return
            peer, data = self.queue.pop(0)
            peer.dataReceived(data)

    def run(self, server: _RedisServer, args: list[str]) -> bytes | None:
        name, rest = args[0].upper(), args[1:]
        data = self.data
        if name in ("AUTH", "SELECT"):
            return b"+OK\r\n"
        if name == "SET":
            data[rest[0]] = rest[1].encode()
            return b"+OK\r\n"
        if name == "DEL":
            return _int(sum(data.pop(k, None) is not None for k in rest))
        if name == "PEXPIRE":
            return _int(rest[0] in data)
        if name == "HSET":
            fields = data.setdefault(rest[0], {})
            fields.update({k: v.encode() for k, v in zip(rest[1::2], rest[2::2], strict=True)})
            return _int(len(rest) // 2)
        if name == "HDEL":
            fields = data.get(rest[0], {})
            removed = sum(fields.pop(k, None) is not None for k in rest[1:])
            if not fields:
                data.pop(rest[0], None)
            return _int(removed)
        if name == "HGETALL":
            flat = [x for k, v in data.get(rest[0], {}).items() for x in (k.encode(), v)]
            return encode(*flat)
        if name == "MGET":
            return _array([data.get(k) for k in rest])
        if name == "SCAN":
            prefix = rest[2].rstrip("*")
            keys = [k.encode() for k in data if k.startswith(prefix)]
            return b"*2\r\n$1\r\n0\r\n" + _array(keys)
        if name == "PUBLISH":
            subscribers = self.subscribers.get(rest[0], [])
            message = encode("message", rest[0], rest[1])
            for subscriber in subscribers:
                assert subscriber.transport is not None
                subscriber.transport.write(message)
            return _int(len(subscribers))
        if name == "SUBSCRIBE":
            for i, channel in enumerate(rest, 1):
                self.subscribers.setdefault(channel, []).append(server)
                assert server.transport is not None
                server.transport.write(b"*3\r\n$9\r\nsubscribe\r\n" + encode(channel)[4:] + _int(i))
            return None
        raise AssertionError(f"the fake Redis does not know {name}")


def _int(n: int) -> bytes:
    return b":%d\r\n" % n


def _array(items: list[bytes | None]) -> bytes:
    out = [b"*%d\r\n" % len(items)]
    out += [b"$-1\r\n" if i is None else b"$%d\r\n%s\r\n" % (len(i), i) for i in items]
    return b"".join(out)


class _Session:
    def __init__(self, id: int, client: str = "10.0.0.1") -> None:
        self.id, self.client = id, client
        self.closed: tuple[int, str, str] | None = None
        self.pushed: list[tuple[bytes, bool]] = []
        self.busy = False
        self.closing = False

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "client": self.client,
            "route": "/",
            "server": "ws://b:1",
            "started": 5.0,
        }

    def close(self, code: int, reason: str, by: str) -> None:
        self.closed = (code, reason, by)

    def push(self, payload: bytes, binary: bool) -> bool:
        """As Session.push: False when queued behind a message in flight; closing: ValueError."""
        if self.closing:
            raise ValueError("the session is closing")
        self.pushed.append((payload, binary))
        return not self.busy


class _Gateway:
    def __init__(self, limits: Limits, clock: Clock) -> None:
        self.sessions: dict[int, _Session] = {}
        self.watchers: list[Any] = []
        self.fleet: Any = None
        self.upstreams: dict[str, Any] = {}
        self.admission = Admission(limits, clock.seconds)
        self.drained: list[tuple[str, Any, float]] = []

    def open(self, session: _Session) -> None:
        self.admission.admit(session.client)
        self.sessions[session.id] = session
        for watcher in self.watchers:
            watcher.session_opened(session)

    def drain(self, url: str, deadline: Any, window: float) -> int:
        if url != "ws://b:1":
            raise KeyError(url)
        self.drained.append((url, deadline, window))
        return 1


class ClusterTests(SynchronousTestCase):
    """Two gates A and B over one fake Redis, on one fake clock."""

    def setUp(self) -> None:
        from wsgate.control.cluster import Cluster

        self.clock = Clock()
        self.redis = FakeRedis()
        spec = config.ClusterSpec(
            host="h",
            db=1,
            heartbeat=1.0,
            ttl=3.0,
            sync_interval=0.5,
            request_timeout=2.0,
            fleet_limits=True,
        )
        limits = Limits(max_sessions_per_ip=2)
        self.gateways = {name: _Gateway(limits, self.clock) for name in "AB"}
        self.clusters = {
            name: Cluster(spec, self.gateways[name], self.clock, self.redis.connect, name, "pw")  # type: ignore[arg-type]
            for name in "AB"
        }
        self.gateways["B"].open(_Session(1))
        for cluster in self.clusters.values():
            cluster.startService()
        self.redis.pump()
        self.assertTrue(all(c.up for c in self.clusters.values()))

    def tearDown(self) -> None:
        for cluster in self.clusters.values():
            cluster.stopService()
            self.redis.pump()

    def result(self, d: Deferred) -> Any:
        for _ in range(10):
            self.clock.advance(0)
            self.redis.pump()
        return self.successResultOf(d)

    def failure(self, d: Deferred) -> str:
        for _ in range(10):
            self.clock.advance(0)
            self.redis.pump()
        return self.failureResultOf(d).getErrorMessage()

    def test_list_kick_push_drain(self) -> None:
        """A lists B's sessions, kicks and pushes into them, drains a server on B; errors are
        sentences."""
        a = self.clusters["A"]
        self.gateways["A"].open(_Session(7, "10.0.0.2"))
        rows = self.result(a.sessions())
        self.assertEqual(sorted((r["gate"], r["id"]) for r in rows), [("A", 7), ("B", 1)])
        self.assertEqual([g["name"] for g in self.result(a.gates())], ["A", "B"])
        b1 = self.gateways["B"].sessions[1]
        self.assertEqual(
            self.result(a.push("B:1", "hi")), {"pushed": "B:1", "bytes": 2, "queued": False}
        )
        self.assertEqual(b1.pushed, [(b"hi", False)])
        b1.busy = True
        self.assertEqual(
            self.result(a.push("B:1", b"x")), {"pushed": "B:1", "bytes": 1, "queued": True}
        )
        b1.closing = True
        self.assertEqual(self.failure(a.push("B:1", b"y")), "session B:1: the session is closing")
        self.assertEqual(self.result(a.kick("B:1", 4000, "bye")), {"closed": "B:1"})
        self.assertEqual(b1.closed, (4000, "bye", "fleet (A)"))
        self.assertEqual(self.failure(a.kick("B:9")), "no session 9 on gate B")
        self.assertEqual(self.failure(a.kick("C:1")), "no gate C in the fleet (gone?)")
        self.assertIn("cannot be sent", self.failure(a.kick("B:1", 1005)))
        self.assertIn("expected GATE:ID", self.failure(a.kick("B")))
        self.assertEqual(self.result(a.drain("ws://b:1", gate="B")), {"B": 1})
        self.assertEqual(self.gateways["B"].drained, [("ws://b:1", None, 10.0)])
        self.assertEqual(self.result(a.kick("A:7")), {"closed": "A:7"})  # its own: no Redis

    def test_request_timeout(self) -> None:
        """A gate that does not answer fails the request after request_timeout."""
        a = self.clusters["A"]
        b = self.clusters["B"]
        b._inbox = lambda data: None  # type: ignore[method-assign]
        d = a.kick("B:1")
        self.redis.pump()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertEqual(self.failure(d), "gate B did not answer in 2s")

    def test_fleet_wide_limit(self) -> None:
        """B's session from an address counts on A after a sync; a gate gone is forgotten."""
        admission = self.gateways["A"].admission
        self.assertEqual(dict(admission.remote), {"10.0.0.1": 1})  # read from B's hash on join
        self.gateways["B"].open(_Session(2))
        self.clock.advance(0.5)
        self.redis.pump()
        self.assertEqual(dict(admission.remote), {"10.0.0.1": 2})
        self.assertEqual(admission.admit("10.0.0.1"), (429, "Too many sessions from this address"))
        self.clusters["B"].stopService()
        self.redis.pump()
        self.clock.advance(1.0)
        self.redis.pump()
        self.assertEqual(dict(admission.remote), {})

    def test_redis_down_and_back(self) -> None:
        """Redis gone: A works alone (local list, requests fail at once, remote counts dropped);
        back, both rejoin and rewrite their sessions into the empty Redis."""
        a = self.clusters["A"]
        self.gateways["A"].open(_Session(3))
        self.redis.pump()
        self.redis.stop()
        self.assertFalse(a.up)
        self.assertEqual(a.figures()["up"], 0)
        self.assertEqual([r["id"] for r in self.successResultOf(a.sessions())], [3])
        self.assertIn("Redis is unreachable", self.failureResultOf(a.kick("B:1")).getErrorMessage())
        self.assertEqual(dict(self.gateways["A"].admission.remote), {})
        self.redis.up = True
        self.clock.advance(0.25)
        self.redis.pump()
        self.assertTrue(a.up and self.clusters["B"].up)
        rows = self.result(a.sessions())
        self.assertEqual(sorted((r["gate"], r["id"]) for r in rows), [("A", 3), ("B", 1)])
        self.assertEqual(a.figures()["joins"], 2)
        self.assertEqual(dict(self.gateways["A"].admission.remote), {"10.0.0.1": 1})

    def test_stalled_redis_is_dropped(self) -> None:
        """A Redis that stops answering is dropped after request_timeout, and reconnected."""
        a = self.clusters["A"]
        self.redis.stalled = True
        for _ in range(3):  # a heartbeat goes unanswered for request_timeout
            self.clock.advance(1.0)
        self.assertTrue(a.up)
        self.clock.advance(1.0)
        self.assertFalse(a.up)
        self.redis.stalled = False
        self.redis.queue.clear()
        self.clock.advance(0.25)
        self.redis.pump()
        self.assertTrue(a.up)


class ServiceTreeTests(SynchronousTestCase):
    def test_cluster_service_only_with_cluster(self) -> None:
        """With [cluster] the tree has the cluster service (not started); without, the fleet's
        modules are not even imported."""
        from twisted.internet.testing import MemoryReactorClock

        from wsgate.control.cluster import Cluster
        from wsgate.service import makeService

        spec = config.parse(
            {**BASE, "cluster": {"redis": "redis://127.0.0.1:1/2", "name": "g"}}, "x"
        )
        top = makeService({"gate_config": spec}, MemoryReactorClock())
        self.assertIsInstance(top.cluster, Cluster)  # type: ignore[attr-defined]
        self.assertEqual((top.cluster.gate, top.cluster.running), ("g", 0))  # type: ignore[attr-defined]
        code = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from wsgate import config\n"
            "from wsgate.service import makeService\n"
            f"makeService({{'gate_config': config.parse({BASE!r}, 'x')}}, MemoryReactorClock())\n"
            "print(sorted(m for m in sys.modules if m.startswith('wsgate.control.') or 'redis' in m))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertNotIn("cluster", out.stdout)
        self.assertNotIn("redis", out.stdout)

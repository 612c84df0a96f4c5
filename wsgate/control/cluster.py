"""
A fleet of gates as one, through Redis (``[cluster]``).

Owns this gate's membership in the fleet: publishing itself and its live sessions under keys
that expire unless refreshed (a dead gate's sessions vanish within ``ttl``), carrying ``kick``,
``push`` and ``drain`` to the gate that holds the session or server over pub/sub and their
answers back (by request id, with a timeout), and fleet-wide per-address limits.  The interface
the console and the control API use is :class:`Cluster`'s ``gates``, ``sessions``, ``kick``,
``push`` and ``drain``, each returning a Deferred; a request to this gate itself is carried out
without Redis.

Redis unreachable: the gate keeps working alone.  Sessions open and close, limits hold per gate
(``Admission.remote`` is emptied: local limits only, fail open), requests to other gates fail at
once with :class:`ClusterError`, the log says so (a line when the link goes, then at most one every
30 s), and ``up`` (the ``wsgate_cluster_up`` gauge) is 0.  When Redis is back the gate rejoins: it
rewrites its keys whole from its live sessions, so no session is lost from the fleet's view.

Fleet-wide limits without a round trip per handshake.  Admission stays local and in memory: it
adds to its own per-address session counts what the other gates reported (``RemoteTally``), and
takes tokens from its own per-address buckets for the handshakes they reported.  Every
``sync_interval`` each gate publishes what changed since the last one (an ``ips:`` hash for gates
that join later, and a message on the ips channel for those already there).  The price is lag: a
client that spreads handshakes over N gates within one interval can get up to N times the
per-gate allowance before the reports land; session counts can overshoot by the sessions one
address opens on other gates within one interval.  A Redis counter checked on every handshake
would be exact but would put a round trip (and Redis's health) on every handshake's critical
path.

Must not touch the data path: sessions are read through the Gateway and acted on through
``Session.close``, ``Session.push`` and ``Gateway.drain``.  The protocol's vocabulary (keys,
records, envelopes) lives in :mod:`wsgate.core.fleet`; the connection in :mod:`wsgate.control.redis`.

Over 500 lines because joining, the heartbeat, the session mirror, fleet-wide counts and the
request/answer exchange all run on the same two Redis connections and the same up/down state.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

import wsgate
from wsgate.config import ClusterSpec
from wsgate.control.redis import RedisDown, RedisLink, RedisProtocol
from wsgate.core import fleet
from wsgate.core.frames import valid_close_code
from wsgate.core.limits import WarningLimiter
from wsgate.dataplane.gateway import Gateway

__all__ = ["Cluster", "ClusterError", "cluster_service", "gate_name"]

# Requests to other gates awaiting answers at once; more fail at once.
MAX_REQUESTS = 1000
# Fields per HSET command when a gate rewrites its keys.
_HSET_CHUNK = 500
# SCAN rounds at most when listing the fleet's gates.
_SCAN_ROUNDS = 1000


class ClusterError(Exception):
    """A fleet request that could not be carried out; the message says why, for an operator."""


def gate_name(spec: ClusterSpec) -> str:
    """This gate's name in the fleet: the configured one, else ``hostname:pid``."""
    return spec.name or f"{socket.gethostname()}:{os.getpid()}"


def cluster_service(spec: ClusterSpec, gateway: Gateway, reactor: Any) -> Cluster:
    """The fleet membership of ``gateway``, connecting to ``spec``'s Redis through ``reactor``."""
    password = None
    if spec.password_file is not None:
        with open(spec.password_file, encoding="utf-8") as f:
            password = f.read().strip()
    endpoint = HostnameEndpoint(reactor, spec.host, spec.port)
    return Cluster(spec, gateway, reactor, endpoint.connect, gate_name(spec), password)


class Cluster(service.Service):
    """
    This gate in the fleet.  ``up`` is True while both Redis connections (commands, and pub/sub)
    work and the gate's keys have been rewritten since the last loss.
    """

    log = Logger()

    def __init__(
        self,
        spec: ClusterSpec,
        gateway: Gateway,
        clock: Any,
        connect: Callable[[Any], Deferred],
        gate: str,
        password: str | None = None,
    ) -> None:
        self.spec = spec
        self.gateway = gateway
        self.clock = clock
        self.gate = gate
        self.keys = fleet.Keys(spec.prefix)
        self.remote = fleet.RemoteTally()
        self.counters: Counter[str] = Counter()
        self.up = False
        self._joined = False  # the command connection rewrote our keys
        self._subscribed = False  # the pub/sub connection listens to our channels
        self._channels = [self.keys.inbox(gate)]
        if spec.fleet_limits:
            self._channels.append(self.keys.ips_channel())
        self._commands = RedisLink(
            connect, clock, self._commands_ready, self._commands_lost, password, spec.db, "redis"
        )
        self._pubsub = RedisLink(
            connect, clock, self._pubsub_ready, self._pubsub_lost, password, 0, "redis pub/sub"
        )
        self._dirty: dict[int, bytes | None] = {}  # session id -> record (None: closed)
        self._flush_call: Any = None
        self._published_ips: dict[str, int] = {}
        self._requests: dict[str, tuple[Deferred, Any]] = {}
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._sync = LoopingCall(self._sync_ips)
        self._sync.clock = clock
        self._warnings = WarningLimiter(clock.seconds, burst=1, interval=30.0)
        self._started = clock.seconds()

    # -- service ---------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.gateway.watchers.append(self)
        self.gateway.fleet = self
        if self.spec.fleet_limits:
            self.gateway.admission.remote = self.remote.total
            self.gateway.admission.taken = Counter()
            self._sync.start(self.spec.sync_interval, now=False)
        self._commands.start()
        self._pubsub.start()
        self._heartbeat.start(self.spec.heartbeat, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        for loop in (self._heartbeat, self._sync):
            if loop.running:
                loop.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self in self.gateway.watchers:
            self.gateway.watchers.remove(self)
        admission = self.gateway.admission
        admission.remote, admission.taken = {}, None
        for rid in list(self._requests):
            self._answer(rid, Failure(ClusterError("the gate is stopping")))
        # Leave the fleet at once rather than when the keys expire (best effort, bounded).
        name = self.gate
        leaving = self._commands.execute(
            "DEL", self.keys.gate(name), self.keys.sessions(name), self.keys.ips(name)
        )
        leaving.addTimeout(1.0, self.clock)
        leaving.addErrback(lambda _: None)
        leaving.addBoth(self._stopped)
        return leaving

    def _stopped(self, _: object) -> None:
        self._commands.stop()
        self._pubsub.stop()
        self._set_up(False, "stopped")

    # -- what the gateway tells us ----------------------------------------------------------------

    def session_opened(self, session: Any) -> None:
        if self._joined:
            self._dirty[session.id] = fleet.session_record(session.describe())
            self._schedule_flush()

    def session_closed(self, session: Any) -> None:
        if self._joined:
            self._dirty[session.id] = None
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """Write the sessions opened and closed since the last flush (one reactor turn)."""
        self._flush_call = None
        dirty, self._dirty = self._dirty, {}
        key = self.keys.sessions(self.gate)
        opened = [(str(i), record) for i, record in dirty.items() if record is not None]
        closed = [str(i) for i, record in dirty.items() if record is None]
        commands: list[tuple[Any, ...]] = []
        if closed:
            commands.append(("HDEL", key, *closed))
        commands += _hset(key, opened)
        if opened:
            commands.append(("PEXPIRE", key, self._ttl_ms()))
        self._send(commands)

    # -- Redis connections ---------------------------------------------------------------------

    def _commands_ready(self, connection: RedisProtocol) -> Deferred:
        """A new command connection: rewrite our keys whole from the live sessions (rejoin)."""
        name, ttl = self.gate, self._ttl_ms()
        sessions = self.keys.sessions(name)
        ips = self.keys.ips(name)
        commands: list[tuple[Any, ...]] = [("DEL", sessions, ips)]
        records = [
            (str(s.id), fleet.session_record(s.describe())) for s in self.gateway.sessions.values()
        ]
        commands += _hset(sessions, records)
        commands.append(("PEXPIRE", sessions, ttl))
        if self.spec.fleet_limits:
            self._published_ips = dict(self.gateway.admission.per_ip)
            commands += _hset(ips, [(ip, str(n)) for ip, n in self._published_ips.items()])
            commands.append(("PEXPIRE", ips, ttl))
            # Gates already listening learn this gate's counts anew (a restarted Redis told them
            # nothing); gates that join later read the hash.
            for message in fleet.ip_messages(self.gate, self._published_ips, {}, reset=True):
                commands.append(("PUBLISH", self.keys.ips_channel(), message))
        commands.append(("SET", self.keys.gate(name), self._gate_record(), "PX", ttl))
        self._dirty.clear()
        d = gatherResults([connection.execute(*c) for c in commands], consumeErrors=True)
        d.addCallback(self._rejoined)
        return d

    def _rejoined(self, _: object) -> None:
        self._joined = True
        self.counters["joins"] += 1
        self._check_up()

    def _commands_lost(self) -> None:
        self._joined = False
        self._dirty.clear()
        self._set_up(False, self._commands.last_error or "connection lost")

    def _pubsub_ready(self, connection: RedisProtocol) -> None:
        connection.subscribe(self._channels, self._pushed)

    def _pubsub_lost(self) -> None:
        self._subscribed = False
        self.remote.clear()  # fail open: local limits only until the fleet is back
        for rid in list(self._requests):
            self._answer(rid, Failure(ClusterError("the connection to Redis was lost")))
        self._set_up(False, self._pubsub.last_error or "pub/sub connection lost")

    def _check_up(self) -> None:
        if self._joined and self._subscribed:
            self._set_up(True, "")
            if self.spec.fleet_limits:
                self._load_remote_ips()

    def _set_up(self, up: bool, why: str) -> None:
        if up == self.up:
            return
        self.up = up
        redis = f"{self.spec.host}:{self.spec.port}/{self.spec.db}"
        if up:
            self.log.info(
                "cluster_joined gate={gate} redis={redis} sessions={count}",
                gate=self.gate,
                redis=redis,
                count=len(self.gateway.sessions),
            )
        elif self.running:
            self.log.warn(
                "cluster_down gate={gate} redis={redis}: {why}; working alone until it is back",
                gate=self.gate,
                redis=redis,
                why=why,
            )

    def _pushed(self, reply: Any) -> None:
        """A pub/sub reply: a subscription confirmed, or a message on one of our channels."""
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind = reply[0]
        if kind == b"subscribe":
            if reply[2] == len(self._channels):
                self._subscribed = True
                self._check_up()
        elif kind == b"message" and isinstance(reply[2], bytes):
            channel = reply[1].decode("utf-8", "replace")
            if channel == self.keys.inbox(self.gate):
                self._inbox(reply[2])
            else:
                self._ips_message(reply[2])

    # -- heartbeat ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        now = self.clock.seconds()
        timeout = self.spec.request_timeout
        protocol = self._commands.protocol
        oldest = protocol.oldest() if protocol is not None else None
        if oldest is not None and now - oldest > timeout:
            why = f"no reply from Redis in {timeout:g}s"
            self._commands.abort(why)
            self._pubsub.abort(why)
            return
        if not self.up:
            self._warnings.warn(
                "cluster_unreachable",
                "gate={gate}: {why}; still working alone",
                gate=self.gate,
                why=self._commands.last_error or self._pubsub.last_error or "connecting",
            )
        if not self._joined:
            return
        name, ttl = self.gate, self._ttl_ms()
        commands: list[tuple[Any, ...]] = [
            ("SET", self.keys.gate(name), self._gate_record(), "PX", ttl),
            ("PEXPIRE", self.keys.sessions(name), ttl),
        ]
        if self.spec.fleet_limits:
            commands.append(("PEXPIRE", self.keys.ips(name), ttl))
            if self.up:
                self._live_gates().addCallback(self._forget_gone).addErrback(self._failed)
        self._send(commands)

    def _gate_record(self) -> bytes:
        return fleet.gate_record(
            {
                "name": self.gate,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": wsgate.__version__,
                "started": self._started,
                "sessions": len(self.gateway.sessions),
                "servers": sorted(
                    {s.url for u in self.gateway.upstreams.values() for s in u.servers}
                ),
            }
        )

    def _ttl_ms(self) -> int:
        return int(self.spec.ttl * 1000)

    def _send(self, commands: Iterable[tuple[Any, ...]]) -> None:
        for command in commands:
            self._commands.execute(*command).addErrback(self._failed)

    def _failed(self, reason: Failure) -> None:
        self.counters["redis_errors"] += 1
        if reason.check(RedisDown):
            return  # the link's loss is logged once, as cluster_down
        self._warnings.warn(
            "cluster_error", "gate={gate}: {error}", gate=self.gate, error=reason.getErrorMessage()
        )

    # -- fleet-wide limits ---------------------------------------------------------------------

    def _sync_ips(self) -> None:
        """Publish this gate's changes of sessions and handshakes per address (sync_interval)."""
        admission = self.gateway.admission
        taken, admission.taken = admission.taken or Counter(), Counter()
        if not self._joined:
            return
        changes = fleet.ip_changes(admission.per_ip, self._published_ips)
        if not changes and not taken:
            return
        for ip, n in changes.items():
            if n:
                self._published_ips[ip] = n
            else:
                self._published_ips.pop(ip, None)
        key = self.keys.ips(self.gate)
        gone = [ip for ip, n in changes.items() if not n]
        commands: list[tuple[Any, ...]] = [("HDEL", key, *gone)] if gone else []
        commands += _hset(key, [(ip, str(n)) for ip, n in changes.items() if n])
        commands.append(("PEXPIRE", key, self._ttl_ms()))
        for message in fleet.ip_messages(self.gate, changes, taken):
            commands.append(("PUBLISH", self.keys.ips_channel(), message))
        self._send(commands)

    def _ips_message(self, data: bytes) -> None:
        try:
            gate, sessions, handshakes, reset = fleet.decode_ips(data)
        except ValueError as e:
            self._warnings.warn("cluster_bad_message", "ips channel: {error}", error=str(e))
            return
        if gate == self.gate:
            return
        if reset:
            self.remote.forget(gate)
        self.remote.update(gate, sessions)
        for ip, n in handshakes.items():
            self.gateway.admission.charge(ip, n)

    def _load_remote_ips(self) -> None:
        """On (re)joining: every other gate's sessions per address, from their hashes."""

        def load(names: list[str]) -> Deferred:
            others = [n for n in names if n != self.gate]
            reads = [self._commands.execute("HGETALL", self.keys.ips(n)) for n in others]
            return gatherResults(reads, consumeErrors=True).addCallback(replace, others)

        def replace(hashes: list[list[bytes]], others: list[str]) -> None:
            for gate, flat in zip(others, hashes, strict=True):
                self.remote.replace(gate, fleet.hash_counts(flat))

        self._live_gates().addCallback(load).addErrback(self._failed)

    def _forget_gone(self, names: list[str]) -> None:
        for gate in self.remote.gates() - set(names):
            self.remote.forget(gate)

    def _live_gates(self) -> Deferred:
        """The names of the gates whose keys have not expired (SCAN, not KEYS: never blocks Redis)."""
        names: list[str] = []
        pattern = self.keys.gate_pattern()

        def step(reply: Any, rounds: int) -> Any:
            cursor, keys = reply
            names.extend(self.keys.gate_name(k) for k in keys)
            if cursor == b"0" or rounds >= _SCAN_ROUNDS:
                return sorted(set(names))
            d = self._commands.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 500)
            return d.addCallback(step, rounds + 1)

        return self._commands.execute("SCAN", 0, "MATCH", pattern, "COUNT", 500).addCallback(
            step, 1
        )

    # -- the interface: list the fleet, act on any gate ------------------------------------------

    def gates(self) -> Deferred:
        """Deferred list of the fleet's gates (records: name, host, pid, sessions, servers, ...)."""
        if not self.up:
            return succeed([fleet.decode_json_record(self._gate_record())])

        def read(names: list[str]) -> Deferred:
            if not names:
                return succeed([])
            return self._commands.execute("MGET", *[self.keys.gate(n) for n in names])

        d = self._live_gates().addCallback(read)
        d.addCallback(lambda records: [_record(r) for r in records if r is not None])
        return d.addCallback(lambda rows: [r for r in rows if r is not None])

    def sessions(self) -> Deferred:
        """
        Deferred list of every live session in the fleet, each a dict with ``gate``, ``id``,
        ``client``, ``route``, ``server`` and ``started``.  While Redis is down: this gate's only.
        """
        if not self.up:
            return succeed(self._local_sessions())

        def read(names: list[str]) -> Deferred:
            reads = [self._commands.execute("HGETALL", self.keys.sessions(n)) for n in names]
            d = gatherResults(reads, consumeErrors=True)
            return d.addCallback(lambda hashes: _session_rows(zip(names, hashes, strict=True)))

        return self._live_gates().addCallback(read)

    def _local_sessions(self) -> list[dict[str, Any]]:
        rows = []
        for session in self.gateway.sessions.values():
            row = fleet.decode_json_record(fleet.session_record(session.describe()))
            rows.append({"gate": self.gate, **row})
        return rows

    def kick(self, target: str, code: int = 1001, reason: str = "") -> Deferred:
        """Close session ``"GATE:ID"`` with ``code`` and ``reason``, on whichever gate holds it."""
        try:
            gate, session = fleet.parse_target(target)
        except ValueError as e:
            return fail(ClusterError(str(e)))
        return self._request(gate, "kick", {"session": session, "code": code, "reason": reason})

    def push(self, target: str, data: str | bytes) -> Deferred:
        """Send session ``"GATE:ID"``'s client a message: text (str) or binary (bytes)."""
        try:
            gate, session = fleet.parse_target(target)
            args = fleet.push_args(session, data)
        except (TypeError, ValueError) as e:
            return fail(ClusterError(str(e)))
        return self._request(gate, "push", args)

    def drain(
        self,
        server: str,
        deadline: float | None = None,
        window: float = 10.0,
        gate: str | None = None,
    ) -> Deferred:
        """
        Drain ``server`` on ``gate``, or on every gate of the fleet that has it: a Deferred dict
        of gate name -> sessions on it there (or the error, as text).
        """
        args = {"server": server, "deadline": deadline, "window": window}
        if gate is not None:
            return self._request(gate, "drain", args).addCallback(lambda r: {gate: r})

        def each(records: list[dict[str, Any]]) -> Deferred:
            names = [r["name"] for r in records if server.rstrip("/") in r.get("servers", ())]
            asked = [self._request(n, "drain", args) for n in names]
            d = DeferredList(asked, consumeErrors=True)
            return d.addCallback(
                lambda results: {
                    n: value if ok else value.getErrorMessage()
                    for n, (ok, value) in zip(names, results, strict=True)
                }
            )

        return self.gates().addCallback(each)

    # -- requests between gates ------------------------------------------------------------------

    def _request(self, gate: str, op: str, args: dict[str, Any]) -> Deferred:
        if gate == self.gate:
            try:
                return succeed(self._act(op, args, "console"))
            except ClusterError as e:
                return fail(e)
        if not self.up:
            return fail(
                ClusterError(
                    f"Redis is unreachable: cannot reach gate {gate} (this gate works alone)"
                )
            )
        if len(self._requests) >= MAX_REQUESTS:
            return fail(ClusterError(f"{MAX_REQUESTS} requests await answers already"))
        rid = uuid.uuid4().hex
        d: Deferred = Deferred()
        timer = self.clock.callLater(self.spec.request_timeout, self._timed_out, rid, gate)
        self._requests[rid] = (d, timer)
        self.counters["requests_sent"] += 1
        request = fleet.Request(rid, self.gate, op, args)
        sent = self._commands.execute(
            "PUBLISH", self.keys.inbox(gate), fleet.encode_request(request)
        )
        sent.addCallbacks(
            self._published, self._publish_failed, callbackArgs=(rid, gate), errbackArgs=(rid,)
        )
        return d

    def _published(self, receivers: int, rid: str, gate: str) -> None:
        if receivers == 0:
            self._answer(rid, Failure(ClusterError(f"no gate {gate} in the fleet (gone?)")))

    def _publish_failed(self, reason: Failure, rid: str) -> None:
        self._answer(rid, Failure(ClusterError(f"Redis: {reason.getErrorMessage()}")))

    def _timed_out(self, rid: str, gate: str) -> None:
        seconds = self.spec.request_timeout
        self._answer(rid, Failure(ClusterError(f"gate {gate} did not answer in {seconds:g}s")))

    def _answer(self, rid: str, result: Any) -> None:
        entry = self._requests.pop(rid, None)
        if entry is None:
            return  # answered already (or timed out)
        d, timer = entry
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure):
            self.counters["requests_failed"] += 1
            d.errback(result)
        else:
            d.callback(result)

    def _inbox(self, data: bytes) -> None:
        try:
            message = fleet.decode_envelope(data)
        except ValueError as e:
            self._warnings.warn("cluster_bad_message", "inbox: {error}", error=str(e))
            return
        if isinstance(message, fleet.Reply):
            if message.ok:
                self._answer(message.rid, message.result)
            else:
                self._answer(message.rid, Failure(ClusterError(message.error)))
            return
        self.counters["requests_received"] += 1
        try:
            reply = fleet.Reply(
                message.rid, True, self._act(message.op, message.args, message.sender)
            )
        except ClusterError as e:
            reply = fleet.Reply(message.rid, False, error=str(e))
        channel = self.keys.inbox(message.sender)
        self._send([("PUBLISH", channel, fleet.encode_reply(reply))])

    def _act(self, op: str, args: Mapping[str, Any], sender: str) -> Any:
        """Carry out a request on this gate; the result (JSON) or ClusterError."""
        if op == "drain":
            try:
                count = self.gateway.drain(args["server"], args["deadline"], args["window"])
            except KeyError:
                raise ClusterError(f"no server {args['server']} on gate {self.gate}") from None
            self.log.info(
                "fleet_drain server={server} by={sender} sessions={count}",
                server=args["server"],
                sender=sender,
                count=count,
            )
            return count
        session = self.gateway.sessions.get(args["session"])
        if session is None:
            raise ClusterError(f"no session {args['session']} on gate {self.gate}")
        if op == "kick":
            code = args["code"]
            if not valid_close_code(code):
                raise ClusterError(f"{code} cannot be sent: use 1000-1003, 1007-1014 or 3000-4999")
            self.log.info(
                "fleet_kick session_id={session_id} by={sender} code={code}",
                session_id=session.id,
                sender=sender,
                code=code,
            )
            session.close(code, args.get("reason", ""), by=f"fleet ({sender})")
            return {"closed": f"{self.gate}:{session.id}"}
        payload, binary = fleet.push_payload(args)
        try:
            sent = session.push(payload, binary)
        except (ValueError, OverflowError) as e:
            raise ClusterError(f"session {self.gate}:{session.id}: {e}") from None
        return {"pushed": f"{self.gate}:{session.id}", "bytes": len(payload), "queued": not sent}

    def figures(self) -> dict[str, int]:
        """For ``/metrics``: up (0 or 1), joins, requests sent, received, failed, Redis errors."""
        return {
            "up": int(self.up),
            "joins": self.counters["joins"],
            "requests_sent": self.counters["requests_sent"],
            "requests_received": self.counters["requests_received"],
            "requests_failed": self.counters["requests_failed"],
            "redis_errors": self.counters["redis_errors"],
        }


def _hset(key: str, pairs: list[tuple[str, Any]]) -> list[tuple[Any, ...]]:
    """HSET commands writing ``pairs`` to hash ``key``, at most 500 fields each."""
    commands = []
    for start in range(0, len(pairs), _HSET_CHUNK):
        flat = [item for pair in pairs[start : start + _HSET_CHUNK] for item in pair]
        commands.append(("HSET", key, *flat))
    return commands


def _record(data: bytes) -> dict[str, Any] | None:
    try:
        return fleet.decode_json_record(data)
    except ValueError:
        return None


def _session_rows(hashes: Iterable[tuple[str, list[bytes]]]) -> list[dict[str, Any]]:
    rows = []
    for gate, flat in hashes:
        for value in flat[1::2]:
            record = _record(value)
            if record is not None:
                rows.append({"gate": gate, **record})
    rows.sort(key=lambda r: (r.get("started") or 0, r["gate"]))
    return rows

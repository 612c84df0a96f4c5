"""
The fleet's vocabulary: what gates write to Redis and say to each other, without the I/O.

Owns the Redis key and channel names under a prefix, the records a gate publishes (itself, its
sessions, its sessions and handshakes per client address), the request and reply envelopes that
carry ``kick``, ``push`` and ``drain`` between gates, and :class:`RemoteTally`, the other gates'
sessions per address that fleet-wide limits add to the local ones.  Everything that comes from
Redis is checked here and refused with ``ValueError`` when malformed or too large: a peer gate
(or anyone who can write to Redis) cannot make this gate grow without bound or raise elsewhere.
Must not do I/O: ``wsgate/control/cluster.py`` drives it.

Layout under the prefix ``P`` (default ``wsgate:``), for a gate named ``G``:

==========================  =====================================================================
``P gate:G``                string, JSON of the gate (name, host, pid, started, sessions); expires
``P sessions:G``            hash, session id -> JSON (id, client, route, server, started); expires
``P ips:G``                 hash, client address -> sessions from it on G (fleet limits); expires
channel ``P to:G``          requests to G and replies to requests G sent
channel ``P ips``           every gate's changes of sessions and handshakes per address
==========================  =====================================================================

Every key expires ``ttl`` seconds after the gate's last heartbeat, so a gate that dies takes its
sessions out of the fleet's view within ``ttl``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_ENVELOPE",
    "MAX_PUSH",
    "OPS",
    "Keys",
    "Reply",
    "RemoteTally",
    "Request",
    "decode_envelope",
    "decode_ips",
    "decode_json_record",
    "encode_reply",
    "encode_request",
    "gate_record",
    "hash_counts",
    "ip_changes",
    "ip_messages",
    "parse_target",
    "push_args",
    "push_payload",
    "session_record",
]

# The largest message a gate accepts on its channel, and the largest push payload.
MAX_ENVELOPE = 256 * 1024
MAX_PUSH = 128 * 1024
OPS = ("kick", "push", "drain")
# Addresses per message on the ips channel.
_IPS_PER_MESSAGE = 1000
_MAX_COUNT = 1 << 31
# Addresses a RemoteTally keeps at most (what other gates report beyond is not counted).
_MAX_ADDRESSES = 1_000_000


@dataclass(frozen=True)
class Keys:
    """The names of one fleet's keys and channels (see the module docstring)."""

    prefix: str

    def gate(self, name: str) -> str:
        return f"{self.prefix}gate:{name}"

    def gate_pattern(self) -> str:
        return f"{self.prefix}gate:*"

    def gate_name(self, key: bytes) -> str:
        """The gate's name from its ``gate:`` key."""
        return key.decode("utf-8", "replace")[len(self.gate("")) :]

    def sessions(self, name: str) -> str:
        return f"{self.prefix}sessions:{name}"

    def ips(self, name: str) -> str:
        return f"{self.prefix}ips:{name}"

    def inbox(self, name: str) -> str:
        return f"{self.prefix}to:{name}"

    def ips_channel(self) -> str:
        return f"{self.prefix}ips"


def session_record(row: Mapping[str, Any]) -> bytes:
    """A session as the fleet lists it, from ``Session.describe()``."""
    return json.dumps(
        {
            "id": row["session_id"],
            "client": row["client"],
            "route": row["route"],
            "server": row["server"],
            "started": row["started"],
        },
        separators=(",", ":"),
    ).encode()


def gate_record(fields: Mapping[str, Any]) -> bytes:
    """A gate's own record (name, host, pid, version, started, sessions, servers)."""
    return _dump(dict(fields))


def decode_json_record(data: bytes) -> dict[str, Any]:
    """A gate or session record read from Redis; ValueError when it is not a JSON object."""
    if len(data) > MAX_ENVELOPE:
        raise ValueError("record too large")
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("record is not an object")
    return value


def parse_target(target: str) -> tuple[str, int]:
    """``"GATE:ID"`` -> (gate, session id); the gate name may itself hold colons (host:pid)."""
    gate, sep, number = str(target).rpartition(":")
    if not sep or not gate or not number.isdigit():
        raise ValueError(f"{target!r}: expected GATE:ID, e.g. {'web-1:42'!r}")
    return gate, int(number)


# -- requests and replies between gates -----------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """``op`` for another gate, from gate ``sender``, answered with the same ``rid``."""

    rid: str
    sender: str
    op: str
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Reply:
    """The answer to request ``rid``: ``result`` when ``ok``, else ``error`` (a sentence)."""

    rid: str
    ok: bool
    result: Any = None
    error: str = ""


def encode_request(request: Request) -> bytes:
    return _dump({"rid": request.rid, "from": request.sender, "op": request.op, **request.args})


def encode_reply(reply: Reply) -> bytes:
    if reply.ok:
        return _dump({"rid": reply.rid, "op": "reply", "ok": True, "result": reply.result})
    return _dump({"rid": reply.rid, "op": "reply", "ok": False, "error": reply.error})


def _dump(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_envelope(data: bytes) -> Request | Reply:
    """A message from a gate's channel; ValueError names what is wrong with it."""
    if len(data) > MAX_ENVELOPE:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_ENVELOPE}")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    rid, op = value.get("rid"), value.get("op")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        raise ValueError("no request id")
    if op == "reply":
        if value.get("ok") is True:
            return Reply(rid, True, value.get("result"))
        return Reply(rid, False, error=str(value.get("error", "failed"))[:500])
    sender = value.get("from")
    if not isinstance(sender, str) or not sender:
        raise ValueError("no sender")
    if op == "kick":
        args = _kick_args(value)
    elif op == "push":
        args = _push_args(value)
    elif op == "drain":
        args = _drain_args(value)
    else:
        raise ValueError(f"unknown op {str(op)[:20]!r}")
    return Request(rid, sender, op, args)


def _session_id(value: dict[str, Any]) -> int:
    session = value.get("session")
    if not isinstance(session, int) or isinstance(session, bool) or session < 1:
        raise ValueError("session is not a session id")
    return session


def _kick_args(value: dict[str, Any]) -> dict[str, Any]:
    code, reason = value.get("code", 1001), value.get("reason", "")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(reason, str):
        raise ValueError("kick needs a numeric code and a text reason")
    return {"session": _session_id(value), "code": code, "reason": reason[:123]}


def push_args(session: int, data: str | bytes) -> dict[str, Any]:
    """The arguments of a push of ``data`` (text when str, binary when bytes)."""
    if isinstance(data, str):
        size, field = len(data.encode()), {"text": data}
    elif isinstance(data, bytes):
        size, field = len(data), {"binary": base64.b64encode(data).decode()}
    else:
        raise TypeError("push text (str) or binary (bytes)")
    if size > MAX_PUSH:
        raise ValueError(f"a pushed message is at most {MAX_PUSH} bytes")
    return {"session": session, **field}


def push_payload(args: Mapping[str, Any]) -> tuple[bytes, bool]:
    """(payload, is binary) of a decoded push."""
    if "text" in args:
        return args["text"].encode(), False
    return args["binary"], True


def _push_args(value: dict[str, Any]) -> dict[str, Any]:
    session = _session_id(value)
    if isinstance(value.get("text"), str):
        if len(value["text"].encode()) > MAX_PUSH:
            raise ValueError("push too large")
        return {"session": session, "text": value["text"]}
    binary = value.get("binary")
    if not isinstance(binary, str):
        raise ValueError("push needs text or binary")
    try:
        data = base64.b64decode(binary, validate=True)
    except ValueError:
        raise ValueError("push binary is not base64") from None
    if len(data) > MAX_PUSH:
        raise ValueError("push too large")
    return {"session": session, "binary": data}


def _drain_args(value: dict[str, Any]) -> dict[str, Any]:
    server, deadline, window = value.get("server"), value.get("deadline"), value.get("window", 10)
    if not isinstance(server, str) or not server:
        raise ValueError("drain needs a server URL")
    for number in (deadline, window):
        if number is not None and (
            not isinstance(number, int | float) or isinstance(number, bool) or number < 0
        ):
            raise ValueError("drain deadline and window are seconds")
    return {"server": server, "deadline": deadline, "window": float(window)}


# -- sessions and handshakes per address, for fleet-wide limits -----------------------------------


def ip_changes(current: Mapping[str, int], published: Mapping[str, int]) -> dict[str, int]:
    """The addresses whose session count differs from what was last published (0: none now)."""
    changes = {ip: n for ip, n in current.items() if published.get(ip) != n}
    changes.update({ip: 0 for ip in published if ip not in current})
    return changes


def ip_messages(
    gate: str, sessions: Mapping[str, int], handshakes: Mapping[str, int], reset: bool = False
) -> list[bytes]:
    """
    What a gate says on the ips channel: its changed counts, at most 1000 addresses a message.
    With ``reset`` the counts are all it has (a rejoin): the first message says so, and the
    other gates forget what they knew of it before applying them.
    """
    items = [(ip, "s", n) for ip, n in sessions.items()]
    items += [(ip, "h", n) for ip, n in handshakes.items()]
    messages = []
    for start in range(0, max(len(items), 1 if reset else 0), _IPS_PER_MESSAGE):
        chunk = items[start : start + _IPS_PER_MESSAGE]
        message: dict[str, Any] = {
            "gate": gate,
            "s": {ip: n for ip, kind, n in chunk if kind == "s"},
            "h": {ip: n for ip, kind, n in chunk if kind == "h"},
        }
        if reset and start == 0:
            message["reset"] = True
        messages.append(_dump(message))
    return messages


def decode_ips(data: bytes) -> tuple[str, dict[str, int], dict[str, int], bool]:
    """(gate, sessions per address, handshakes per address, reset) of an ips message."""
    value = decode_json_record(data)
    gate = value.get("gate")
    if not isinstance(gate, str) or not gate:
        raise ValueError("no gate")
    reset = value.get("reset", False) is True
    return gate, _counts(value.get("s", {})), _counts(value.get("h", {})), reset


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > _IPS_PER_MESSAGE:
        raise ValueError("counts are an object of at most 1000 addresses")
    for ip, n in value.items():
        if len(ip) > 64 or not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < _MAX_COUNT:
            raise ValueError("a count is a whole number per address")
    return value


class RemoteTally:
    """
    The sessions per client address on the *other* gates of the fleet, as their ips messages and
    hashes tell: ``total`` is what :class:`~wsgate.core.limits.Admission` adds to its own counts.
    Bounded by what the other gates hold; a gate that leaves the fleet is forgotten whole.
    """

    def __init__(self) -> None:
        self.total: dict[str, int] = {}
        self._by_gate: dict[str, dict[str, int]] = {}

    def gates(self) -> set[str]:
        return set(self._by_gate)

    def update(self, gate: str, counts: Mapping[str, int]) -> None:
        """Gate ``gate`` now has ``counts[ip]`` sessions from each address given (0: none)."""
        mine = self._by_gate.setdefault(gate, {})
        for ip, n in counts.items():
            if ip not in self.total and len(self.total) >= _MAX_ADDRESSES:
                continue
            self._add(ip, n - mine.get(ip, 0))
            if n:
                mine[ip] = n
            else:
                mine.pop(ip, None)

    def replace(self, gate: str, counts: Mapping[str, int]) -> None:
        """Gate ``gate`` has exactly ``counts`` (a snapshot of its hash)."""
        self.forget(gate)
        self.update(gate, counts)

    def forget(self, gate: str) -> None:
        for ip, n in self._by_gate.pop(gate, {}).items():
            self._add(ip, -n)

    def clear(self) -> None:
        self.total.clear()
        self._by_gate.clear()

    def _add(self, ip: str, delta: int) -> None:
        n = self.total.get(ip, 0) + delta
        if n > 0:
            self.total[ip] = n
        else:
            self.total.pop(ip, None)


def hash_counts(pairs: Iterable[bytes]) -> dict[str, int]:
    """An ``HGETALL`` reply of an ips hash -> counts (fields that are not counts are skipped)."""
    flat = list(pairs)
    counts = {}
    for field, value in zip(flat[::2], flat[1::2], strict=False):
        try:
            n = int(value)
        except ValueError:
            continue
        if 0 < n < _MAX_COUNT:
            counts[field.decode("utf-8", "replace")] = n
    return counts

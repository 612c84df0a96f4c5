"""
Limits: who may open a session, how fast a session may send, and how often a warning is logged.

Owns the admission counts (sessions in all and per client address, handshakes per second per
address as token buckets), the per-session message rate, the client-address rules for trusted
proxies, and the rate limiting of repeated warnings.  Must not do I/O: the bridge asks and acts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from ipaddress import ip_address
from typing import Any

from twisted.logger import Logger

from wsgate.config import Limits

__all__ = ["Admission", "MessageRate", "WarningLimiter", "client_address"]

# Token buckets kept before full (idle) ones are forgotten.
_MAX_BUCKETS = 10_000


class Admission:
    """
    Counts admitted sessions (from ``admit`` until ``release``) and refuses new ones over the
    configured limits: ``(429, reason)`` for one address over its handshake rate or session
    count, ``(503, reason)`` when the gate as a whole is full.
    """

    def __init__(self, limits: Limits, now: Callable[[], float]) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self._now = now
        self._buckets: dict[str, list[float]] = {}  # address -> [tokens, time of last refill]
        # Fleet-wide limits (wsgate/control/cluster.py): the sessions per address on the other
        # gates, and the handshakes this gate admitted per address since the fleet last read them
        # (None: not counted, no fleet).
        self.remote: Mapping[str, int] = {}
        self.taken: Counter[str] | None = None

    def admit(self, ip: str) -> tuple[int, str] | None:
        limits = self.limits
        if limits.handshake_rate > 0 and not self._take_token(ip):
            return 429, "Too many handshakes from this address"
        if limits.max_sessions and self.total >= limits.max_sessions:
            return 503, "The gateway is at its session limit"
        per_ip = self.per_ip[ip] + self.remote.get(ip, 0)
        if limits.max_sessions_per_ip and per_ip >= limits.max_sessions_per_ip:
            return 429, "Too many sessions from this address"
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def _take_token(self, ip: str) -> bool:
        bucket = self._bucket(ip)
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        if self.taken is not None:
            self.taken[ip] += 1
        return True

    def _bucket(self, ip: str) -> list[float]:
        """The token bucket of ``ip``, refilled up to now (a full new one if it had none)."""
        rate, burst = self.limits.handshake_rate, self.limits.handshake_burst
        now = self._now()
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full_buckets(now)
            bucket = self._buckets[ip] = [float(burst), now]
        else:
            bucket[0] = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        return bucket

    def charge(self, ip: str, count: int) -> None:
        """
        Take ``count`` tokens from the bucket of ``ip`` for handshakes another gate of the fleet
        admitted, down to ``-burst`` (so a fleet's total rate holds, give or take one sync).
        """
        if self.limits.handshake_rate > 0:
            bucket = self._bucket(ip)
            bucket[0] = max(bucket[0] - count, -float(self.limits.handshake_burst))

    def _forget_full_buckets(self, now: float) -> None:
        rate, burst = self.limits.handshake_rate, self.limits.handshake_burst
        full = [
            ip for ip, (tokens, t) in self._buckets.items() if tokens + (now - t) * rate >= burst
        ]
        for ip in full:
            del self._buckets[ip]


class MessageRate:
    """
    A session direction's budget of messages and bytes per second (fixed one-second windows).
    ``spend`` returns the seconds until the window ends when a budget is exceeded, else 0.
    """

    __slots__ = ("_bytes", "_max_bytes", "_max_messages", "_messages", "_now", "_window")

    def __init__(self, max_messages: float, max_bytes: int, now: Callable[[], float]) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._now = now
        self._window = now()
        self._messages = 0
        self._bytes = 0

    def remaining(self) -> int:
        """Messages still allowed in the current one-second window (a large number: no limit)."""
        if self._max_messages <= 0:
            return 1 << 62
        if self._now() - self._window >= 1.0:
            return int(self._max_messages)
        return max(int(self._max_messages) - self._messages, 0)

    def wait(self) -> float:
        """Seconds until the current window ends."""
        return max(self._window + 1.0 - self._now(), 0.0)

    def spend(self, size: int, count: int = 1) -> float:
        """Spend ``count`` messages (control frames included) of ``size`` bytes in all."""
        now = self._now()
        if now - self._window >= 1.0:
            self._window = now
            self._messages = 0
            self._bytes = 0
        self._messages += count
        self._bytes += size
        over = (0 < self._max_messages < self._messages) or (0 < self._max_bytes < self._bytes)
        return self._window + 1.0 - now if over else 0.0


def client_address(peer: str, forwarded_for: str | None, limits: Limits) -> str:
    """
    The address limits and logs use for a client: the connecting peer, unless the peer is a
    trusted proxy, in which case the right-most ``X-Forwarded-For`` address that is not itself a
    trusted proxy (addresses appended by proxies we do not trust are not believed).
    """
    trusted = limits.trusted_proxies
    if not trusted or not forwarded_for or not _in(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if not _in(hop, trusted):
            return hop if _is_address(hop) else peer
    return peer


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _in(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class WarningLimiter:
    """
    Logs a kind of warning at most ``burst`` times per ``interval`` seconds; the rest are counted
    and reported with the next one that passes, so a flood of bad clients cannot flood the log.
    """

    log = Logger(namespace="wsgate")

    def __init__(self, now: Callable[[], float], burst: int = 10, interval: float = 60.0) -> None:
        self._now = now
        self._burst = burst
        self._interval = interval
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, logged, suppressed]

    def warn(self, kind: str, text: str, **fields: Any) -> None:
        now = self._now()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self._interval:
            suppressed = int(window[2]) if window else 0
            window = self._windows[kind] = [now, 0, 0]
            if suppressed:
                fields["suppressed"] = suppressed
                text += " ({suppressed} more like this were not logged)"
        if window[1] >= self._burst:
            window[2] += 1
            return
        window[1] += 1
        self.log.warn(f"{kind} {text}", **fields)

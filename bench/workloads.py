"""Workloads W1-W6 of issue 8 and the text variants W1t-W3t, at full size and at --quick size, as
wsload command lines."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.targets import Target

__all__ = ["FULL_W5_SESSIONS", "TEXT_TARGETS", "Workload", "runs_on", "workloads"]

# The container's hard RLIMIT_NOFILE is 20,000 and cannot be raised (no CAP_SYS_RESOURCE); a proxy
# holds two descriptors per session (client and backend), so 10,000 sessions cannot fit through one
# proxy process.  W5 therefore holds as many as fit, rounded down; see sessions_for().
FULL_W5_SESSIONS = 10_000

# The text variants W1t-W3t run against these targets only (and the workload's own NGINX
# reference), which keeps a full run near 15 minutes instead of about 18.  NGINX and HAProxy relay
# the frames of an upgraded connection as bytes and never look at an opcode, nor does wsgate's
# tunnel mode; only wsgate's message mode decodes frames and checks text for valid UTF-8.  The
# two-worker rows would show the same per-message cost as their one-process rows.
TEXT_TARGETS = ("direct", "wsgate", "wsgate-tunnel")


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    mode: str  # closed | open | handshake
    reference: str  # the NGINX target wsgate is compared with (issue 8)
    conns: int = 0
    size: int = 64
    inflight: int = 1
    rate: float = 0.0
    tls: bool = False
    sessions: int = 0
    hs_inflight: int = 0
    hold: float = 0.0
    warmup: float = 1.0
    duration: float = 8.0
    text: bool = False  # text messages (opcode 0x1, valid UTF-8 payload) instead of binary
    base: str = ""  # the binary workload a text variant repeats (its metric and columns)
    targets: tuple[str, ...] = ()  # run only against these targets (empty: every target)

    @property
    def family(self) -> str:
        """The workload whose metric this one reports: ``W1`` for W1 and W1t."""
        return self.base or self.key

    def argv(self, port: int, watch: list[int], backend_pid: int, cpus: str) -> list[str]:
        args = ["--port", str(port), "--mode", self.mode, "--cpus", cpus]
        if self.mode == "handshake":
            args += ["--sessions", str(self.sessions), "--hs-inflight", str(self.hs_inflight)]
            args += ["--hold", str(self.hold)]
        else:
            args += ["--conns", str(self.conns), "--size", str(self.size)]
            args += ["--inflight", str(self.inflight), "--warmup", str(self.warmup)]
            args += ["--duration", str(self.duration)]
            if self.rate:
                args += ["--rate", str(self.rate)]
        if self.tls:
            args.append("--tls")
        if self.text:
            args.append("--text")
        if watch:
            args += ["--watch", ",".join(map(str, watch))]
        args += ["--backend-pid", str(backend_pid)]
        return args

    def time_limit(self) -> float:
        """Wall-clock bound for one wsload run (its own phases are bounded more tightly)."""
        if self.mode == "handshake":
            return 15 + 120 + self.hold + 20 + 30
        return 15 + self.warmup + self.duration + 2 + 3 + 30


def runs_on(w: Workload, t: Target) -> bool:
    """Whether workload ``w`` is measured against target ``t``."""
    return w.key not in t.skip and (not w.targets or t.name in w.targets)


def text_variant(w: Workload) -> Workload:
    """``w`` with text messages: key ``W1t`` for W1, against TEXT_TARGETS and w's reference."""
    return replace(
        w,
        key=w.key + "t",
        title=w.title.replace(" echo,", " text echo,", 1),
        text=True,
        base=w.key,
        targets=(*TEXT_TARGETS, w.reference),
    )


def sessions_for(nofile: int, wanted: int) -> int:
    """Sessions that fit through one proxy process with ``nofile`` descriptors, rounded to 100."""
    return min(wanted, (nofile - 150) // 2 // 100 * 100)


def workloads(quick: bool, nofile: int) -> list[Workload]:
    if quick:
        warmup, duration = 0.2, 0.6
        sessions, hs_inflight, hold = 200, 50, 0.5
    else:
        warmup, duration = 1.0, 8.0
        sessions, hs_inflight, hold = sessions_for(nofile, FULL_W5_SESSIONS), 200, 30.0
    w1, w2, w3 = (
        Workload("W1", "64 B echo, 64 connections, 1 in flight each", "closed", "nginx",
                 conns=64, size=64, inflight=1, warmup=warmup, duration=duration),
        Workload("W2", "1 KiB echo, 64 connections, 8 in flight each", "closed", "nginx-64k",
                 conns=64, size=1024, inflight=8, warmup=warmup, duration=duration),
        Workload("W3", "64 KiB echo, 8 connections, 1 in flight each", "closed", "nginx-64k",
                 conns=8, size=65536, inflight=1, warmup=warmup, duration=duration),
    )  # fmt: skip
    return [
        w1,
        w2,
        w3,
        text_variant(w1),
        text_variant(w2),
        text_variant(w3),
        Workload("W4", "open loop 2,000 msg/s over 100 connections, 64 B", "open", "nginx",
                 conns=100, size=64, rate=2000, warmup=warmup, duration=duration),
        Workload("W5", f"{sessions:,} sessions, {hs_inflight} handshakes in flight, held "
                 f"{hold:g} s, closed", "handshake", "nginx",
                 sessions=sessions, hs_inflight=hs_inflight, hold=hold),
        Workload("W6", "W1 over TLS (wss:// to the proxy, plain to the backend)", "closed",
                 "nginx", conns=64, size=64, inflight=1, tls=True, warmup=warmup, duration=duration),
    ]  # fmt: skip

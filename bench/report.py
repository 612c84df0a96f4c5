"""Turning wsload's JSON into the results tables (Markdown), ratios and checks included."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.targets import Target
from bench.workloads import Workload, runs_on

__all__ = ["Outcome", "Run", "render"]

NOISY_PCT = 15
SATURATED_PCT = 95
NOISY_PCT_LATENCY = 5  # W4's tail latencies are disturbed by much less


def noise_limit(key: str) -> float:
    """Outside CPU (% of a core) above which a measurement of workload ``key`` is disturbed."""
    return NOISY_PCT_LATENCY if key == "W4" else NOISY_PCT


# The speed issue's targets for wsgate rows (issue 13, which raised issue 8's): (message mode,
# tunnel mode).
GOALS: dict[str, tuple[float, float]] = {
    "W1": (0.5, 0.8),
    "W2": (0.5, 0.9),
    "W3": (0.9, 1.1),
    "W4": (0.5, 0.3),  # p99 within this many ms of NGINX
    "W5": (0.35, 0.35),
    "W5rss": (10.0, 8.0),  # KiB per held session, at most
}


@dataclass
class Outcome:
    """One workload against one target: wsload's JSON, or why there is none."""

    data: dict[str, Any] | None = None
    error: str = ""
    attempts: int = 1  # how many times the workload ran (the least disturbed run is kept)

    @property
    def ok(self) -> bool:
        return self.data is not None and not self.error


@dataclass
class Run:
    quick: bool
    date: str
    cpu: str
    cores: int
    mem_gib: float
    versions: dict[str, str]
    targets: list[Target]
    workloads: list[Workload]
    command: str = "python -m bench"
    results: dict[str, dict[str, Outcome]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, target: str, wl: str) -> Outcome | None:
        return self.results.get(target, {}).get(wl)


# ---------- metrics ----------
def primary(w: Workload, d: dict[str, Any]) -> float:
    """The number that ranks targets on a workload (W4: p99 in ms, lower is better)."""
    if w.family == "W3":
        return float(d["mb_per_s"])
    if w.family == "W4":
        return float(d["rtt_us"]["p99"]) / 1000
    if w.mode == "handshake":
        return float(d["handshakes_per_s"])
    return float(d["msgs_per_s"])


def lower_is_better(w: Workload) -> bool:
    return w.family == "W4"


def rss_per_session_kib(d: dict[str, Any]) -> float | None:
    if d.get("rss_before_kb", 0) <= 0 or not d.get("opened"):
        return None
    return (d["rss_held_kb"] - d["rss_before_kb"]) / d["opened"]


def cpu_per_million(d: dict[str, Any]) -> float | None:
    """Proxy CPU seconds per million echoed messages (each message crosses the proxy twice)."""
    if not d.get("messages") or d.get("proxy_cpu_s", 0) <= 0:
        return None
    return d["proxy_cpu_s"] / d["messages"] * 1e6


def cpu_ms_per_handshake(d: dict[str, Any]) -> float | None:
    """Proxy CPU milliseconds per opened session, over the opening phase (W5: the handshakes)."""
    return d["proxy_cpu_s"] * 1e3 / d["opened"] if d.get("opened") else None


def pct(cpu_s: float, window: float) -> float | None:
    return cpu_s / window * 100 if window > 0 else None


def outside_pct(d: dict[str, Any]) -> float | None:
    """CPU used during the window by anything but the proxy, the backend and the load generator
    (other programs, interrupt handling), in % of one core: the run's noise indicator."""
    win = d["open_s"] if d.get("mode") == "handshake" else d.get("window_s", 0)
    if "machine_busy_s" not in d or win < 0.2:  # CPU times tick at 10 ms: too coarse below
        return None
    ours = d["proxy_cpu_s"] + d["backend_cpu_s"] + d["client_cpu_s"]
    return max(0.0, (d["machine_busy_s"] - ours) / win * 100)


def core0_pct(d: dict[str, Any]) -> float | None:
    """Load generator + backend CPU over the window (W5: over the opening phase)."""
    win = d["open_s"] if d.get("mode") == "handshake" else d.get("window_s", 0)
    return pct(d["client_cpu_s"] + d["backend_cpu_s"], win) if win >= 0.2 else None


def errors(d: dict[str, Any]) -> int:
    return sum(d.get("errors", {}).values())


# ---------- formatting ----------
def fnum(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def fratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _cell(run: Run, t: Target, w: Workload, fmt: Callable[[dict[str, Any]], str]) -> str:
    if not runs_on(w, t):
        return "not run"
    o = run.get(t.name, w.key)
    if o is None:
        return "—"
    if not o.ok:
        return "failed"
    assert o.data is not None
    return fmt(o.data)


def _ratio(run: Run, t: Target, w: Workload, other: str) -> float | None:
    a, b = run.get(t.name, w.key), run.get(other, w.key)
    if not (a and b and a.ok and b.ok) or t.name == other:
        return None
    assert a.data is not None and b.data is not None
    pa, pb = primary(w, a.data), primary(w, b.data)
    if lower_is_better(w):
        return pb / pa if pa > 0 else None
    return pa / pb if pb > 0 else None


def _primary_fmt(w: Workload) -> Callable[[dict[str, Any]], str]:
    digits = 2 if w.family == "W4" else 0
    return lambda d: fnum(primary(w, d), digits)


# ---------- sections ----------
def _header(run: Run) -> list[str]:
    kind = (
        "quick (checks that the benchmark works; numbers are not meaningful)"
        if run.quick
        else "full"
    )
    out = [
        "# wsgate benchmark results",
        "",
        f"- Date: {run.date}; run: {kind}; command: `{run.command}`",
        f"- Machine: {run.cpu}, {run.cores} cores, {run.mem_gib:.0f} GiB",
        "- Versions: " + "; ".join(f"{k}: {v}" for k, v in run.versions.items()),
        "- Cores: the load generator (bench/c/wsload.c) and the echo backend (bench/c/wsecho.c) "
        "are pinned together to core 0; every single-process proxy is pinned to core 1; the "
        "two-worker rows (`*-2w`) run on cores 0 and 1 and so share core 0 with the load side. "
        "Pinning with `taskset -c`.",
        "- Messages are binary frames, except in the text variants (W1t-W3t: W1-W3 with text frames "
        "whose payload is valid UTF-8 of the same size, a JSON-like record repeated, mostly ASCII "
        "with some 2- and 3-byte characters such as `é` and `€`: 11 % of the bytes at 64 B, 15 % "
        "from 1 KiB); wsgate's message mode checks text for valid UTF-8 on both legs, its tunnel "
        "mode, NGINX and HAProxy relay frames as bytes. The client masks every frame with a fresh "
        "key; the backend echoes each frame with its opcode (it does not check UTF-8), and an echo "
        "with another opcode counts as an error. Round trip = client send to echo received. Throughput counts echoes "
        "received in the measurement window (after a warm-up); MB/s counts echoed payload bytes.",
        "- `proxy CPU %`: the proxy's utime+stime (all its processes) over the window; `CPU s/M`: "
        "proxy CPU seconds per million echoed messages (each crosses the proxy twice); `core 0 %`: "
        "load generator + backend CPU over the window (100 % means the load side is saturated); "
        "`outside %`: CPU busy time of the whole machine not spent in those processes (other "
        "programs, interrupts; W5: over the opening phase), the noise indicator: rows with a high "
        "value were disturbed.",
        "",
        "Workloads:",
        "",
    ]
    for w in run.workloads:
        only = (
            f"; run against {', '.join(f'`{n}`' for n in w.targets)} only"
            if w.targets and any(not runs_on(w, t) for t in run.targets)
            else ""
        )
        out.append(f"- **{w.key}**: {w.title} (wsgate compared with `{w.reference}`{only})")
    out.append("")
    out.append("Targets:")
    out.append("")
    for t in run.targets:
        skip = f" (not run: {', '.join(t.skip)})" if t.skip else ""
        cores = ("core " if "," not in t.cpus else "cores ") + t.cpus
        out.append(f"- `{t.name}`: {t.description}; {cores}{skip}")
    return out


UNITS: dict[str, str] = {
    "W1": "msg/s",
    "W2": "msg/s",
    "W3": "MB/s",
    "W4": "p99 ms",
    "W5": "handshakes/s",
    "W6": "msg/s",
}


def column(w: Workload) -> str:
    """A workload's column in the summary: ``W3t MB/s``."""
    return f"{w.key} {UNITS[w.family]}"


def _summary(run: Run) -> list[str]:
    head = ["target"] + [column(w) for w in run.workloads]
    w5 = next((w for w in run.workloads if w.key == "W5"), None)
    if w5:
        head.append("W5 KiB/session")
    rows = []
    for t in run.targets:
        row = [f"`{t.name}`"] + [_cell(run, t, w, _primary_fmt(w)) for w in run.workloads]
        if w5:
            row.append(
                "—"
                if t.kind == "direct"
                else _cell(run, t, w5, lambda d: fnum(rss_per_session_kib(d), 1))
            )
        rows.append(row)
    return ["## Summary", "", *table(head, rows)]


def _versus(run: Run) -> list[str]:
    rows = []
    for t in run.targets:
        if t.kind != "wsgate":
            continue
        col = 1 if t.goal == "tunnel" else 0
        for w in run.workloads:
            o, ref = run.get(t.name, w.key), run.get(w.reference, w.key)
            if not runs_on(w, t) or not (o and o.ok):
                continue
            assert o.data is not None
            value = primary(w, o.data)
            goal: float | None = GOALS[w.key][col] if w.key in GOALS else None
            ref_txt = "failed" if ref else "not run"
            vs_ref, met = "—", "—"
            if ref and ref.ok:
                assert ref.data is not None
                rv = primary(w, ref.data)
                ref_txt = fnum(rv, 2 if w.key == "W4" else 0)
                if w.key == "W4":
                    diff = value - rv
                    vs_ref = f"{diff:+.2f} ms"
                    if goal is not None:
                        met = "yes" if diff <= goal else "no"
                else:
                    r = _ratio(run, t, w, w.reference)
                    vs_ref = fratio(r)
                    if goal is not None and r is not None:
                        met = "yes" if r >= goal else "no"
            goal_txt = (
                "—" if goal is None else (f"<= +{goal} ms" if w.key == "W4" else f">= {goal}x")
            )
            rows.append(
                [
                    f"`{t.name}`",
                    column(w),
                    fnum(value, 2 if w.key == "W4" else 0),
                    f"{ref_txt} (`{w.reference}`)",
                    vs_ref,
                    goal_txt,
                    met,
                    fratio(_ratio(run, t, w, "direct")),
                ]
            )
            if w.key == "W5":
                kib = rss_per_session_kib(o.data)
                rss_goal = GOALS["W5rss"][col]
                ref_kib = rss_per_session_kib(ref.data) if ref and ref.ok and ref.data else None
                rows.append(
                    [
                        f"`{t.name}`",
                        "W5 KiB/session",
                        fnum(kib, 1),
                        f"{fnum(ref_kib, 1)} (`{w.reference}`)",
                        fratio(kib / ref_kib if kib is not None and ref_kib else None),
                        f"<= {rss_goal} KiB",
                        "—" if kib is None else ("yes" if kib <= rss_goal else "no"),
                        "—",
                    ]
                )
    if not rows:
        return []
    head = ["wsgate row", "metric", "wsgate", "reference", "vs reference", "target", "met",
            "vs direct"]  # fmt: skip
    return ["## wsgate against the references", "", *table(head, rows)]


# wsgate's message-mode targets and the tunnel-mode target each is compared with.
MODE_PAIRS: tuple[tuple[str, str], ...] = (
    ("wsgate", "wsgate-tunnel"),
    ("wsgate-2w", "wsgate-tunnel-2w"),
)
MODE_FAMILIES = ("W1", "W2", "W3")  # the echo workloads compared across modes and message types


def _value(run: Run, target: str, w: Workload) -> float | None:
    o = run.get(target, w.key)
    return primary(w, o.data) if o and o.ok and o.data else None


def _by_family(run: Run) -> list[Workload]:
    """W1, W1t, W2, W2t, W3, W3t (those in the run), binary before text."""
    ws = [w for w in run.workloads if w.family in MODE_FAMILIES]
    return sorted(ws, key=lambda w: (MODE_FAMILIES.index(w.family), w.text))


def _modes(run: Run) -> list[str]:
    """wsgate's message mode against its tunnel mode, binary and text: message/tunnel."""
    rows = []
    for msg, tun in MODE_PAIRS:
        for w in _by_family(run):
            m, t = _value(run, msg, w), _value(run, tun, w)
            if m is None or t is None:
                continue
            kind = "text" if w.text else "binary"
            rows.append([f"`{msg}` / `{tun}`", f"{w.key} ({kind})", UNITS[w.family], fnum(m),
                         fnum(t), fratio(m / t if t > 0 else None)])  # fmt: skip
    if not rows:
        return []
    head = ["pair", "workload", "metric", "message mode", "tunnel mode", "message / tunnel"]
    return ["## Message mode against tunnel mode", "", *table(head, rows)]


def _text_cost(run: Run) -> list[str]:
    """Each target's text variant against its binary workload: text/binary."""
    rows = []
    binary = {w.key: w for w in run.workloads if not w.text}
    for t in run.targets:
        for w in _by_family(run):
            b = binary.get(w.base) if w.text else None
            if b is None:
                continue
            bv, tv = _value(run, t.name, b), _value(run, t.name, w)
            if bv is None or tv is None:
                continue
            rows.append([f"`{t.name}`", f"{w.key} / {b.key}", UNITS[w.family], fnum(bv), fnum(tv),
                         fratio(tv / bv if bv > 0 else None)])  # fmt: skip
    if not rows:
        return []
    head = ["target", "workloads", "metric", "binary", "text", "text / binary"]
    explain = (
        "Only wsgate's message mode decodes frames and checks text for valid UTF-8; the other "
        "targets relay the same bytes with another opcode, so their ratio is 1.00x up to noise."
    )
    return ["## Text messages against binary messages", "", *table(head, rows), "", explain]


def _scaling(run: Run) -> list[str]:
    rows = []
    for t in run.targets:
        if not t.base:
            continue
        for w in run.workloads:
            if w.key in ("W4",) or not runs_on(w, t) or run.get(t.base, w.key) is None:
                continue
            rows.append([f"`{t.name}` / `{t.base}`", w.key, fratio(_ratio(run, t, w, t.base))])
    if not rows:
        return []
    return ["## Gain from a second worker", "", *table(["pair", "workload", "gain"], rows)]


def _details(run: Run, w: Workload) -> list[str]:
    out = [f"### {w.key}: {w.title}", ""]
    rows = []
    for t in run.targets:
        if not runs_on(w, t):
            continue
        o = run.get(t.name, w.key)
        if o is None:
            continue
        if not o.ok:
            rows.append([f"`{t.name}`", f"failed: {o.error}"])
            continue
        d = o.data
        assert d is not None
        vs_ref = fratio(_ratio(run, t, w, w.reference))
        vs_direct = fratio(_ratio(run, t, w, "direct"))
        if w.mode == "handshake":
            rows.append(
                [
                    f"`{t.name}`",
                    fnum(d["handshakes_per_s"]),
                    fnum(d["hs_us"]["p50"] / 1000, 1),
                    fnum(d["hs_us"]["p99"] / 1000, 1),
                    f"{d['opened']:,}/{d['sessions']:,}",
                    str(d["dropped_during_hold"]),
                    "—" if t.kind == "direct" else fnum(d["rss_before_kb"] / 1024, 1),
                    "—" if t.kind == "direct" else fnum(d["rss_held_kb"] / 1024, 1),
                    "—" if t.kind == "direct" else fnum(rss_per_session_kib(d), 1),
                    "—" if t.kind == "direct" else fnum(cpu_ms_per_handshake(d), 3),
                    fnum(d["close_s"], 2),
                    fnum(core0_pct(d)),
                    fnum(outside_pct(d)),
                    vs_ref,
                    vs_direct,
                    str(errors(d)),
                ]
            )
        else:
            win = d["window_s"]
            proxy_pct = None if t.kind == "direct" else pct(d["proxy_cpu_s"], win)
            rows.append(
                [
                    f"`{t.name}`",
                    fnum(d["msgs_per_s"]),
                    fnum(d["mb_per_s"], 1),
                    fnum(d["rtt_us"]["p50"]),
                    fnum(d["rtt_us"]["p99"]),
                    fnum(d["rtt_us"]["p999"]),
                    fnum(proxy_pct),
                    "—" if t.kind == "direct" else fnum(cpu_per_million(d), 2),
                    fnum(core0_pct(d)),
                    fnum(outside_pct(d)),
                    vs_ref,
                    vs_direct,
                    str(errors(d)),
                ]
            )
    if w.mode == "handshake":
        head = ["target", "handshakes/s", "handshake p50 ms", "p99 ms", "opened", "dropped",
                "RSS before MiB", "RSS held MiB", "KiB/session", "CPU ms/handshake", "close s", "core 0 %", "outside %",
                f"vs `{w.reference}`", "vs direct", "errors"]  # fmt: skip
    else:
        head = ["target", "msg/s", "MB/s", "p50 µs", "p99 µs", "p99.9 µs", "proxy CPU %",
                "CPU s/M", "core 0 %", "outside %", f"vs `{w.reference}`", "vs direct", "errors"]  # fmt: skip
    return out + table(head, rows) + [""]


def direct_check(run: Run) -> list[str]:
    """Whether direct-to-backend beats every proxy on every workload (the load side is no limit)."""
    lines = []
    for w in run.workloads:
        d = run.get("direct", w.key)
        if not (d and d.ok):
            continue
        assert d.data is not None
        best = primary(w, d.data)
        losers = []
        for t in run.targets:
            o = run.get(t.name, w.key)
            if t.kind == "direct" or not (o and o.ok):
                continue
            assert o.data is not None
            v = primary(w, o.data)
            if (v < best) if lower_is_better(w) else (v > best):
                losers.append(f"`{t.name}`")
        verdict = "yes" if not losers else "NO, beaten by " + ", ".join(losers)
        saturated = [
            f"`{t.name}`"
            for t in run.targets
            if t.kind != "direct"
            and (o := run.get(t.name, w.key))
            and o.ok
            and o.data
            and (core0_pct(o.data) or 0) >= SATURATED_PCT
        ]
        if saturated:
            verdict += f"; core 0 saturated (>= {SATURATED_PCT} %) with " + ", ".join(saturated)
        lines.append(f"- {w.key}: direct beats every proxy: {verdict}")
    if not lines:
        return []
    explain = (
        "The load generator and the backend share core 0. Where core 0 is saturated behind a "
        "proxy, that proxy's number is a lower bound of what it can do (the load side limited "
        "it). Through a proxy, part of the kernel's loopback work for the backend's side "
        "(connection setup, delivering the proxy's writes) runs in the proxy's context on its "
        "own core, so core 0 does a little less per message than with `direct`: where core 0 is "
        "the limit (W5's handshakes), an efficient proxy can come close to `direct`, and a NO "
        "there says core 0 was the limit, not that a proxy is faster than no proxy."
    )
    return ["## Is the load side fast enough?", "", *lines, "", explain]


def render(run: Run) -> str:
    out = _header(run) + [""] + _summary(run) + [""]
    for section in (_versus(run), _modes(run), _text_cost(run), _scaling(run), direct_check(run)):
        if section:
            out += section + [""]
    out += ["## Details", ""]
    for w in run.workloads:
        out += _details(run, w)
    notes = list(run.notes)
    noisy = [
        f"`{t}` {k} ({v:.0f} %)"
        for t, r in run.results.items()
        for k, o in r.items()
        if o.data and (v := outside_pct(o.data) or 0) > noise_limit(k)
    ]
    repeated = [
        f"`{t}` {k} ({o.attempts} runs)"
        for t, r in run.results.items()
        for k, o in r.items()
        if o.attempts > 1
    ]
    if repeated:
        notes.append(
            "Measurements disturbed by other work were repeated and the least disturbed run kept: "
            + ", ".join(repeated)
            + "."
        )
    if noisy:
        notes.append(
            f"Other work used more than {NOISY_PCT} % of a core ({NOISY_PCT_LATENCY} % for W4) "
            f"during: {', '.join(noisy)}; "
            "those rows are disturbed, run again on a quiet machine."
        )
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)

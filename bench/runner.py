"""``python -m bench``: build what is needed, run W1-W6 (and the text variants W1t-W3t) against every
target, write the tables.

One echo backend serves the whole run.  Each target is started fresh for W1-W4 and W6, and again
for W5 (so the RSS per held session starts from a process that has not served traffic yet); at
--quick one start serves all workloads.  Every load run is one bounded wsload process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench import report, tools
from bench.procs import Proc, free_port, raise_nofile, wait_port
from bench.targets import LOAD_CPUS, TARGETS, Env, Running, Target, start
from bench.workloads import FULL_W5_SESSIONS, Workload, runs_on, workloads

__all__ = ["Measurer", "log", "main", "new_run_dir", "select", "start_backend"]

OUT_DIR = tools.BENCH_DIR / "out"
RESULTS = tools.BENCH_DIR / "RESULTS.md"
LATE_PASSES = 2  # later passes over measurements still disturbed (full runs only)
KEEP_RUNS = 5  # logs of the last runs kept in bench/out/
RETRY_PAUSE = 5.0  # seconds before repeating a disturbed measurement right away
RETRY_BUDGET = 20 * 60.0  # no repeat starts after this many seconds of measuring


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join(t.name for t in TARGETS)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="WebSocket proxy benchmark: wsgate side by side with NGINX and HAProxy.",
    )
    p.add_argument("--quick", action="store_true", help="tiny counts, under a minute: checks "
                   "that the benchmark works, the numbers mean nothing")  # fmt: skip
    p.add_argument("--only", "--targets", dest="only", default="",
                   help=f"comma-separated targets (default all: {names})")  # fmt: skip
    p.add_argument("--workloads", default="", help="comma-separated subset of W1,W2,W3,W1t,W2t,"
                   "W3t,W4,W5,W6 (W1t-W3t: W1-W3 with text messages; default all)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="where to write the Markdown table "
                   "(default: bench/RESULTS.md for a full run of everything, else bench/out/)")  # fmt: skip
    return p.parse_args(argv)


def select(names: str, items: list, what: str, key) -> list:
    if not names:
        return items
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {key(i): i for i in items}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [known[n] for n in wanted]


def run_workload(w: Workload, target: Running, wsload: Path, backend: Proc) -> report.Outcome:
    """One bounded wsload run of ``w`` against a started target."""
    port = target.tls_port if w.tls else target.port
    cores = ",".join(sorted(set(LOAD_CPUS.split(",")) | set(target.target.cpus.split(","))))
    argv = ["taskset", "-c", LOAD_CPUS, str(wsload)]
    argv += w.argv(port, target.watch_pids(), backend.pid, cores)
    try:
        r = subprocess.run(
            argv, capture_output=True, text=True, timeout=w.time_limit(), preexec_fn=raise_nofile
        )
    except subprocess.TimeoutExpired:
        return report.Outcome(error=f"wsload did not finish within {w.time_limit():.0f} s")
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return report.Outcome(error=f"wsload exit {r.returncode}: {r.stderr.strip()[-300:]}")
    data = json.loads(lines[-1])
    if target.proc and not target.proc.alive():
        return report.Outcome(data, f"{target.target.name} died: {target.proc.log_tail(3)}")
    if data.get("timed_out"):
        return report.Outcome(data, "wsload's own time bound ran out while opening connections")
    if w.mode == "handshake":
        if not data["opened"]:
            return report.Outcome(data, "no session opened")
    elif not data["messages"]:
        return report.Outcome(data, "no message echoed in the window")
    return report.Outcome(data)


def _noise(o: report.Outcome) -> float:
    return (report.outside_pct(o.data) or 0.0) if o.data else 0.0


def _better(a: report.Outcome, b: report.Outcome) -> report.Outcome:
    """The measurement to keep of two: one that worked, then the least disturbed."""
    keep = b if (b.ok, -_noise(b)) > (a.ok, -_noise(a)) else a
    keep.attempts = a.attempts + b.attempts
    return keep


class Measurer:
    """Runs groups of workloads against targets, and again what other work disturbed.

    A measurement is disturbed when other work used more than ``report.noise_limit()`` % of a core
    on the cores involved.  In a full run it is repeated once right away after a pause, and what is
    still disturbed after the whole pass is measured again in up to ``LATE_PASSES`` later passes
    (other work on a shared machine comes in bursts that can last minutes), each on a fresh start of
    the target; the least disturbed run is kept.  No repeat starts once the time budget is spent.
    """

    def __init__(self, env: Env, bins: dict[str, Path], backend: Proc, repeat: bool, budget: float):
        self.env, self.bins, self.backend = env, bins, backend
        self.repeat = repeat
        self.deadline = time.monotonic() + budget

    def disturbed(self, w: Workload, o: report.Outcome) -> bool:
        return o.ok and _noise(o) > report.noise_limit(w.key)

    def may_repeat(self) -> bool:
        return self.repeat and time.monotonic() < self.deadline

    def warm_up(self, w: Workload, running: Running) -> None:
        """A few sessions opened and closed before W5, so that code imported or memory allocated on
        first use is not charged to the measured sessions."""
        warm = replace(w, sessions=min(50, w.sessions), hs_inflight=10, hold=0.0)
        out = run_workload(warm, running, self.bins["wsload"], self.backend)
        if not out.ok:
            raise RuntimeError(f"warm-up before {w.key} failed: {out.error}")

    def group(self, t: Target, group: list[Workload]) -> dict[str, report.Outcome]:
        """Measure ``group`` on one start of ``t`` (W5 on a start of its own for each run)."""
        results: dict[str, report.Outcome] = {}
        running: Running | None = None
        try:
            for w in group:
                for attempt in (1, 2):
                    if running is None or (w.mode == "handshake" and attempt > 1):
                        if running is not None:
                            running.stop()
                            running = None
                        log(f"{t.name}: starting for {w.key}")
                        running = start(t, self.env)
                        if w.mode == "handshake":
                            self.warm_up(w, running)
                    out = run_workload(w, running, self.bins["wsload"], self.backend)
                    log(f"{t.name} {w.key}: {_brief(w, out)}")
                    results[w.key] = _better(results[w.key], out) if w.key in results else out
                    time.sleep(0.3)
                    if attempt == 2 or not self.disturbed(w, out) or not self.may_repeat():
                        break
                    log(f"{t.name} {w.key}: disturbed ({_noise(out):.0f} % outside), again")
                    time.sleep(RETRY_PAUSE)
        except Exception as e:  # a target that cannot start fails the rest of its group
            log(f"{t.name}: {e}")
            for w in group:
                results.setdefault(w.key, report.Outcome(error=str(e)[-300:]))
        finally:
            if running is not None:
                running.stop()
        return results

    def late_passes(
        self,
        targets: list[Target],
        wls: list[Workload],
        results: dict[str, dict[str, report.Outcome]],
    ) -> None:
        """Measure again, later, what is still disturbed; keep the least disturbed run."""
        for n in range(1, LATE_PASSES + 1):
            for t in targets:
                todo = [
                    w for w in wls if (o := results[t.name].get(w.key)) and self.disturbed(w, o)
                ]
                for group in groups(t, todo, quick=False):
                    if not self.may_repeat():
                        return
                    log(f"late pass {n}: {t.name} {', '.join(w.key for w in group)}")
                    for key, out in self.group(t, group).items():
                        results[t.name][key] = _better(results[t.name][key], out)


def groups(t: Target, wls: list[Workload], quick: bool) -> list[list[Workload]]:
    todo = [w for w in wls if runs_on(w, t)]
    if quick:
        return [todo] if todo else []
    first = [w for w in todo if w.key != "W5"]
    w5 = [w for w in todo if w.key == "W5"]
    return [g for g in (first, w5) if g]


def new_run_dir(prefix: str, stamp: datetime) -> Path:
    """``bench/out/<prefix>-<time>/`` for a run's logs; older ones beyond KEEP_RUNS are removed."""
    run_dir = OUT_DIR / f"{prefix}-{stamp.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in sorted(OUT_DIR.glob(f"{prefix}-*"))[:-KEEP_RUNS]:
        shutil.rmtree(old, ignore_errors=True)
    return run_dir


def start_backend(wsecho: Path, run_dir: Path, nofile: int) -> tuple[Proc, Env]:
    """The run's one echo backend (plain and TLS, on the load side's core), started and
    listening, and the Env that every target of the run shares."""
    cert, key, cert_and_key = tools.ensure_cert()
    bport, btls = free_port(), free_port()
    argv = [str(wsecho), "--port", str(bport), "--tls-port", str(btls)]
    argv += ["--cert", str(cert), "--key", str(key)]
    backend = Proc("wsecho", argv, LOAD_CPUS, run_dir / "wsecho.log")
    try:
        wait_port(bport, backend)
        wait_port(btls, backend)
    except Exception:
        backend.stop()
        raise
    return backend, Env(run_dir, bport, btls, cert, key, cert_and_key, nofile)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets: list[Target] = select(args.only, list(TARGETS), "target", lambda t: t.name)
    nofile = raise_nofile()
    wls: list[Workload] = select(
        args.workloads, workloads(args.quick, nofile), "workload", lambda w: w.key
    )
    for w in wls:
        if not any(runs_on(w, t) for t in targets):
            log(f"{w.key} runs against none of the selected targets")
    started = time.monotonic()
    kinds = {t.kind for t in targets}
    tools.ensure_packages(kinds, log)
    bins = tools.build_tools(log)

    stamp = datetime.now(UTC)
    run_dir = new_run_dir("run", stamp)
    run = report.Run(
        quick=args.quick,
        date=stamp.strftime("%Y-%m-%d %H:%M UTC"),
        cpu=tools.cpu_model(),
        cores=os.cpu_count() or 0,
        mem_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        versions=tools.versions(kinds),
        targets=targets,
        workloads=wls,
        command=" ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
    )
    w5 = next((w for w in wls if w.key == "W5"), None)
    if w5 and not args.quick and w5.sessions < FULL_W5_SESSIONS:
        run.notes.append(
            f"W5 holds {w5.sessions:,} sessions, not {FULL_W5_SESSIONS:,}: this machine's hard "
            f"RLIMIT_NOFILE is {nofile:,} and cannot be raised here, and a proxy process needs "
            "two descriptors per session (client and backend side)."
        )

    backend, env = start_backend(bins["wsecho"], run_dir, nofile)
    try:
        measurer = Measurer(env, bins, backend, not args.quick, RETRY_BUDGET)
        for t in targets:
            run.results[t.name] = {}
            for group in groups(t, wls, args.quick):
                run.results[t.name].update(measurer.group(t, group))
        measurer.late_passes(targets, wls, run.results)
    finally:
        backend.stop()

    where = run_dir.relative_to(tools.BENCH_DIR.parent)
    run.notes.append(f"Run took {time.monotonic() - started:.0f} s; logs and configs in {where}/.")
    text = report.render(run)
    print(text)
    if args.out:
        dest = args.out
    elif args.quick:
        dest = OUT_DIR / "RESULTS-quick.md"
    elif args.only or args.workloads:
        dest = OUT_DIR / "RESULTS-partial.md"
    else:
        dest = RESULTS
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    (run_dir / "results.json").write_text(
        json.dumps({t: {k: vars(o) for k, o in r.items()} for t, r in run.results.items()})
    )
    log(f"wrote {dest}")
    failed = [f"{t} {k}" for t, r in run.results.items() for k, o in r.items() if not o.ok]
    if failed:
        log("failed: " + ", ".join(failed))
        return 1
    return 0


def _brief(w: Workload, o: report.Outcome) -> str:
    if not o.ok or o.data is None:
        return f"FAILED ({o.error})"
    v = report.primary(w, o.data)
    unit = {"W3": "MB/s", "W4": "ms p99"}.get(
        w.family, "handshakes/s" if w.mode == "handshake" else "msg/s"
    )
    return f"{v:,.2f} {unit}"

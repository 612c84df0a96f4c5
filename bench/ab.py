"""
``python -m bench.ab REV_A REV_B``: two revisions of wsgate measured side by side, in one run,
with this checkout's harness (its load generator, echo backend, workloads and cores).

Each revision gets a detached git worktree under ``bench/out/ab-<time>/`` and a venv in it
(``pip install -e``, which builds its C extension); the ``wsgate`` (message mode) and
``wsgate-tunnel`` targets run from that venv.  ``WORKTREE`` is this work tree as it is, with its
uncommitted changes and the files git does not ignore.  The measurements are interleaved: each
round runs every mode and workload for A and for B back to back, A first in odd rounds and B first
in even ones, so that drift of the machine hits both alike.  The table gives each side's median
over the rounds, B/A and the spread.  Every measurement starts its gate fresh and stops it by PID;
the worktrees are removed at the end, on failure too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report, tools
from bench.procs import Proc, raise_nofile
from bench.runner import OUT_DIR, Measurer, log, new_run_dir, select, start_backend
from bench.targets import LOAD_CPUS, PROXY_CPUS, TARGETS
from bench.workloads import Workload, workloads

__all__ = ["main"]

ROOT = tools.BENCH_DIR.parent
WORKTREE = "WORKTREE"  # the revision that is this work tree as it is
MODES = {"message": "wsgate", "tunnel": "wsgate-tunnel"}  # a mode's one-process target
LABELS = ("A", "B")
GIT_TIMEOUT = 120.0
INSTALL_TIMEOUT = 900.0  # pip install -e, C extension included

# Run by a revision's venv: where its wsgate comes from, what it runs on, which C sources it has
# and which of them were built.
PROBE = """import json, pathlib, autobahn, twisted, wsgate
pkg = pathlib.Path(wsgate.__file__).parent
print(json.dumps({"package": str(pkg), "twisted": twisted.__version__,
    "autobahn": autobahn.__version__, "sources": sorted(p.stem for p in pkg.rglob("*.c")),
    "built": sorted(p.name.split(".")[0] for p in pkg.rglob("*.so"))}))"""

COLUMNS = ["mode", "workload", "metric", "A", "B", "B/A", "A min-max", "B min-max", "runs (A, B)"]
Key = tuple[str, str, str]  # (mode, workload, label)
Metric = tuple[str, Callable[[dict[str, Any]], float | None], int]  # name, value, digits


@dataclass
class Revision:
    label: str  # A or B
    name: str  # as given
    commit: str  # what its worktree checks out
    about: str  # the commit's subject, or what WORKTREE holds
    python: Path = Path()  # its venv's python, once installed
    runs_on: str = ""  # what that venv runs: versions and C extensions


@dataclass
class Run:
    revisions: list[Revision]
    modes: list[str]
    workloads: list[Workload]
    rounds: int
    quick: bool
    command: str
    date: str
    machine: str
    results: dict[Key, list[report.Outcome]] = field(default_factory=dict)  # in round order


def parse_args(argv: list[str] | None, nofile: int) -> argparse.Namespace:
    """The options, with ``modes`` and ``workloads`` checked and turned into lists."""
    p = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description="Two revisions of wsgate side by side: message and tunnel mode, interleaved "
        "rounds, medians and B/A.",
    )
    rev = "anything git rev-parse takes, or WORKTREE: this work tree with its uncommitted changes"
    p.add_argument("rev_a", metavar="REV_A", help=f"the baseline ({rev})")
    p.add_argument("rev_b", metavar="REV_B", help="the revision compared with it (the same)")
    p.add_argument("--workloads", default="W1,W2,W5", help="comma-separated, as for python -m "
                   "bench (default W1,W2,W5)")  # fmt: skip
    p.add_argument("--modes", default="message,tunnel", help="comma-separated subset of "
                   "message,tunnel (default both)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="measurements of each side (default 3)")
    p.add_argument("--quick", action="store_true", help="the benchmark's --quick counts: checks "
                   "that the A/B run works, the numbers mean nothing")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT_DIR / "AB.md",
                   help="where to write the Markdown table (default bench/out/AB.md)")  # fmt: skip
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    args.modes = select(args.modes, list(MODES), "mode", lambda m: m)
    args.workloads = select(
        args.workloads, workloads(args.quick, nofile), "workload", lambda w: w.key
    )
    return args


def schedule(
    rounds: int, modes: list[str], wls: list[Workload]
) -> list[tuple[int, str, Workload, str]]:
    """Every measurement in order, as (round, mode, workload, label): A and B back to back, A first
    in odd rounds and B first in even ones."""
    return [
        (n, mode, w, label)
        for n in range(1, rounds + 1)
        for mode in modes
        for w in wls
        for label in (LABELS if n % 2 else LABELS[::-1])
    ]


# ---------- the revisions: commits, worktrees, venvs ----------
def git(*args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        ["git", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def snapshot() -> str:
    """A commit of this work tree as it is (parent HEAD, on no branch): tracked files as they are
    now and the untracked files git does not ignore.  It is written through a copy of the index,
    so the work tree and its index stay as they are."""
    index = git("rev-parse", "--path-format=absolute", "--git-path", "index")
    with tempfile.TemporaryDirectory() as tmp:
        who = {f"GIT_{r}_{k}": v for r in ("AUTHOR", "COMMITTER")
               for k, v in (("NAME", "bench.ab"), ("EMAIL", "bench.ab@localhost"))}  # fmt: skip
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"), **who)
        shutil.copyfile(index, env["GIT_INDEX_FILE"])
        git("add", "--all", env=env)
        tree = git("write-tree", env=env)
        return git("commit-tree", tree, "-p", "HEAD", "-m", "bench.ab: the work tree", env=env)


def resolve(label: str, name: str) -> Revision:
    if name != WORKTREE:
        commit = git("rev-parse", "--verify", "--end-of-options", f"{name}^{{commit}}")
        return Revision(label, name, commit, git("log", "-1", "--format=%s", commit))
    commit = snapshot()
    changed = git("rev-parse", f"{commit}^{{tree}}") != git("rev-parse", "HEAD^{tree}")
    what = "its uncommitted changes" if changed else "no uncommitted change"
    return Revision(label, name, commit, f"this work tree: HEAD {git('rev-parse', 'HEAD')[:12]} "
                    f"with {what}")  # fmt: skip


def install(rev: Revision, tree: Path, cwd: Path) -> None:
    """A venv in ``tree`` with ``tree`` installed in it; checks that it imports wsgate from there
    (run from ``cwd``, as the targets are)."""
    python = tree / ".venv" / "bin" / "python"
    steps = [
        ([sys.executable, "-m", "venv", str(python.parent.parent)], GIT_TIMEOUT),
        ([str(python), "-m", "pip", "install", "-q", "-e", str(tree)], INSTALL_TIMEOUT),
        ([str(python), "-c", PROBE], GIT_TIMEOUT),
    ]
    for argv, limit in steps:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=limit)
        if r.returncode != 0:
            raise RuntimeError(f"{rev.label}: {' '.join(argv[:4])} failed:\n{r.stderr[-2000:]}")
    info = json.loads(r.stdout.splitlines()[-1])
    if not Path(info["package"]).is_relative_to(tree):
        raise RuntimeError(f"{rev.label}: {python} imports wsgate from {info['package']}")
    missing = sorted(set(info["sources"]) - set(info["built"]))
    rev.python = python
    rev.runs_on = (
        f"Twisted {info['twisted']}, Autobahn {info['autobahn']}, C extensions built: "
        + (", ".join(info["built"]) or "none")
        + (f" (**not built: {', '.join(missing)}**)" if missing else "")
    )


def remove_worktree(tree: Path) -> None:
    if not tree.exists():
        return
    try:
        git("worktree", "remove", "--force", str(tree))
    except (RuntimeError, subprocess.TimeoutExpired):
        shutil.rmtree(tree, ignore_errors=True)
        git("worktree", "prune")


# ---------- the table ----------
def metrics(w: Workload) -> list[Metric]:
    """What the table reports of ``w``: its main number, then the gate's CPU (W5: and memory)."""
    if w.mode == "handshake":
        return [
            ("handshakes/s", lambda d: report.primary(w, d), 0),
            ("KiB/session (lower is better)", report.rss_per_session_kib, 1),
            ("CPU ms/handshake (lower is better)", report.cpu_ms_per_handshake, 3),
        ]
    better = " (lower is better)" if report.lower_is_better(w) else ""
    return [
        (report.UNITS[w.family] + better, lambda d: report.primary(w, d), 2 * (w.family == "W4")),
        ("CPU s/M (lower is better)", report.cpu_per_million, 2),
    ]


def _values(
    outcomes: list[report.Outcome], value: Callable[[dict[str, Any]], float | None]
) -> list[float]:
    return [v for o in outcomes if o.ok and o.data and (v := value(o.data)) is not None]


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    return f"{report.fnum(min(values), digits)}-{report.fnum(max(values), digits)}"


def rows(run: Run) -> list[list[str]]:
    out = []
    for mode in run.modes:
        for w in run.workloads:
            for name, value, digits in metrics(w):
                a, b = (_values(run.results.get((mode, w.key, x), []), value) for x in LABELS)
                ma = statistics.median(a) if a else None
                mb = statistics.median(b) if b else None
                ratio = f"{mb / ma:.3f}x" if ma and mb is not None else "—"
                out.append([mode, w.key, name, report.fnum(ma, digits), report.fnum(mb, digits),
                            ratio, _spread(a, digits), _spread(b, digits),
                            f"{len(a)}, {len(b)}"])  # fmt: skip
    return out


def notes(run: Run) -> list[str]:
    """Failed and disturbed measurements, by round."""
    failed, noisy = [], []
    for (mode, key, label), outcomes in run.results.items():
        for n, o in enumerate(outcomes, 1):
            where = f"{mode} {key} {label} round {n}"
            if not o.ok:
                failed.append(f"{where}: {o.error}")
            elif o.data and (v := report.outside_pct(o.data) or 0) > report.noise_limit(key):
                noisy.append(f"{where} ({v:.0f} %)")
    out = [f"Failed: {f}" for f in failed]
    if noisy:
        out.append(f"Other work used more than {report.NOISY_PCT} % of a core "
                   f"({report.NOISY_PCT_LATENCY} % for W4) during: {', '.join(noisy)}.")  # fmt: skip
    if run.quick:
        out.append("Run with --quick: it checks that the A/B run works; the numbers mean nothing.")
    return out


def render(run: Run) -> str:
    a, b = run.revisions
    out = [
        f"# wsgate A/B: `{a.name}` (A) against `{b.name}` (B)",
        "",
        f"- Date: {run.date}; command: `{run.command}`; machine: {run.machine}",
        *(f"- {r.label}: `{r.name}` = {r.commit[:12]} ({r.about}); {r.runs_on}" for r in (a, b)),
        f"- Cores: the load generator and the echo backend are pinned together to core "
        f"{LOAD_CPUS}, the gate under test (one process, A or B, never both at once) to core "
        f"{PROXY_CPUS} (`taskset -c`); one echo backend serves both sides. Each side's gate runs "
        "from its own git worktree and venv; the harness is this checkout's.",
        f"- Order: {run.rounds} round(s); each runs every mode and workload for A and for B back to "
        "back, A first in odd rounds and B first in even ones. Each measurement starts its gate "
        "fresh (W5: after 50 sessions opened and closed).",
        "- Modes: " + ", ".join(f"{m} (target `{MODES[m]}`)" for m in run.modes),
        "- Workloads: " + "; ".join(f"{w.key}: {w.title}" for w in run.workloads),
        "- A and B are the medians of the rounds, B/A their ratio (above 1 B gives more; in rows "
        "where lower is better, below 1 B costs less), min-max the spread of the rounds.",
        "",
        "## Results",
        "",
        *report.table(COLUMNS, rows(run)),
    ]
    if extra := notes(run):
        out += ["", "## Notes", "", *(f"- {n}" for n in extra)]
    return "\n".join(out) + "\n"


# ---------- the run ----------
def _dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the finally blocks stop what was started, remove the trees


def main(argv: list[str] | None = None) -> int:
    nofile = raise_nofile()
    args = parse_args(argv, nofile)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.pop("PYTHONPATH", None)  # each side's wsgate comes from its own venv, nowhere else
    try:
        revs = [resolve(x, name) for x, name in zip(LABELS, (args.rev_a, args.rev_b), strict=True)]
    except RuntimeError as e:
        raise SystemExit(f"python -m bench.ab: {e}") from None
    tools.ensure_packages(set(), log)
    bins = tools.build_tools(log)
    stamp = datetime.now(UTC)
    ab_dir = new_run_dir("ab", stamp)
    run = Run(
        revs,
        args.modes,
        args.workloads,
        args.rounds,
        args.quick,
        " ".join(["python -m bench.ab", *(argv if argv is not None else sys.argv[1:])]),
        stamp.strftime("%Y-%m-%d %H:%M UTC"),
        f"{tools.cpu_model()}, {os.cpu_count()} cores",
    )
    trees = [ab_dir / f"{r.label}-{_dirname(r.name)}" for r in revs]
    backend: Proc | None = None
    try:
        for rev, tree in zip(revs, trees, strict=True):
            log(f"{rev.label}: {rev.name} = {rev.commit[:12]}: worktree and venv in {tree}")
            git("worktree", "add", "--detach", str(tree), rev.commit)
            install(rev, tree, ab_dir)
        backend, env = start_backend(bins["wsecho"], ab_dir, nofile)
        measurers = {
            r.label: Measurer(
                replace(env, run_dir=ab_dir / f"{r.label}-logs", python=r.python),
                bins,
                backend,
                repeat=False,
                budget=0.0,
            )
            for r in revs
        }
        targets = {t.name: t for t in TARGETS}
        for n, mode, w, label in schedule(args.rounds, args.modes, args.workloads):
            log(f"round {n}/{args.rounds}: {mode} mode, {w.key}, {label}")
            out = measurers[label].group(targets[MODES[mode]], [w])[w.key]
            run.results.setdefault((mode, w.key, label), []).append(out)
    finally:
        if backend is not None:
            backend.stop()
        for tree in trees:
            remove_worktree(tree)

    text = render(run)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (ab_dir / "results.json").write_text(
        json.dumps({" ".join(k): [vars(o) for o in v] for k, v in run.results.items()})
    )
    log(f"wrote {args.out}; logs in {ab_dir}")
    return 1 if any(not o.ok for v in run.results.values() for o in v) else 0


if __name__ == "__main__":
    sys.exit(main())

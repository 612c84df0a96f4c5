"""
The benchmark's A/B mode (``bench/ab.py``) without running it: its options, the order of the
measurements, the table of medians and ratios, and the commit it makes of a work tree.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import ab
from bench.report import Outcome
from bench.workloads import workloads

NOFILE = 20_000
W1, W5 = (w for w in workloads(False, NOFILE) if w.key in ("W1", "W5"))


def run_of(results: dict[ab.Key, list[Outcome]], wls=(W1,), modes=("message",)) -> ab.Run:
    revs = [
        ab.Revision("A", "HEAD~1", "a" * 40, "old", runs_on="Twisted x"),
        ab.Revision("B", "WORKTREE", "b" * 40, "this work tree", runs_on="Twisted x"),
    ]
    return ab.Run(
        revs, list(modes), list(wls), 3, False, "python -m bench.ab", "today", "cpu", results
    )


def echo(msgs_per_s: float, cpu_s: float = 1.0, **extra: Any) -> Outcome:
    return Outcome({"msgs_per_s": msgs_per_s, "messages": 1_000_000, "proxy_cpu_s": cpu_s, **extra})


def held(hs_per_s: float, rss_held_kb: int, cpu_s: float) -> Outcome:
    return Outcome(
        {"mode": "handshake", "handshakes_per_s": hs_per_s, "opened": 1000,
         "rss_before_kb": 10_000, "rss_held_kb": rss_held_kb, "proxy_cpu_s": cpu_s}
    )  # fmt: skip


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without options: W1, W2 and W5 at full size, both modes, 3 rounds, bench/out/AB.md."""
        args = ab.parse_args(["HEAD", "WORKTREE"], NOFILE)
        self.assertEqual((args.rev_a, args.rev_b), ("HEAD", "WORKTREE"))
        self.assertEqual([w.key for w in args.workloads], ["W1", "W2", "W5"])
        self.assertEqual(args.workloads[2].sessions, 9_900)
        self.assertEqual(args.workloads[2].hold, 30.0)
        self.assertEqual(args.modes, ["message", "tunnel"])
        self.assertEqual(args.rounds, 3)
        self.assertEqual(args.out, ab.OUT_DIR / "AB.md")

    def test_selection(self) -> None:
        """--workloads and --modes select in the order given; --quick takes the runner's counts."""
        argv = ["v1", "v2", "--workloads", "W5,W1", "--modes", "tunnel", "--rounds", "5"]
        args = ab.parse_args([*argv, "--quick", "--out", "/tmp/x.md"], NOFILE)
        self.assertEqual([w.key for w in args.workloads], ["W5", "W1"])
        self.assertEqual(args.workloads[0].sessions, 200)
        self.assertEqual((args.modes, args.rounds, args.out), (["tunnel"], 5, Path("/tmp/x.md")))

    def test_refused(self) -> None:
        """An unknown mode or workload, no rounds, or a missing revision stop before any work."""
        for argv in (
            ["a", "b", "--modes", "message,fast"],
            ["a", "b", "--workloads", "W9"],
            ["a", "b", "--rounds", "0"],
            ["a"],
        ):
            with self.assertRaises(SystemExit, msg=argv):
                ab.parse_args(argv, NOFILE)


class ScheduleTests(SynchronousTestCase):
    def test_interleaved_and_alternating(self) -> None:
        """Each round runs every mode and workload for A and B back to back; A goes first in odd
        rounds, B in even ones."""
        order = [(n, m, w.key, x) for n, m, w, x in ab.schedule(2, ["message", "tunnel"], [W1, W5])]
        self.assertEqual(
            order,
            [
                (1, "message", "W1", "A"), (1, "message", "W1", "B"),
                (1, "message", "W5", "A"), (1, "message", "W5", "B"),
                (1, "tunnel", "W1", "A"), (1, "tunnel", "W1", "B"),
                (1, "tunnel", "W5", "A"), (1, "tunnel", "W5", "B"),
                (2, "message", "W1", "B"), (2, "message", "W1", "A"),
                (2, "message", "W5", "B"), (2, "message", "W5", "A"),
                (2, "tunnel", "W1", "B"), (2, "tunnel", "W1", "A"),
                (2, "tunnel", "W5", "B"), (2, "tunnel", "W5", "A"),
            ],
        )  # fmt: skip


class TableTests(SynchronousTestCase):
    def test_medians_ratio_and_spread(self) -> None:
        """Each side's median of the rounds, B/A of the medians, min-max of each side, and the
        number of rounds that gave a value; a failed round counts in neither and is noted."""
        run = run_of(
            {
                ("message", "W1", "A"): [echo(100, 2.0), echo(110, 2.4), echo(90, 2.2)],
                ("message", "W1", "B"): [echo(105, 1.0), Outcome(error="boom"), echo(99, 1.2)],
            }
        )
        rows = ab.rows(run)
        self.assertEqual(
            rows,
            [
                ["message", "W1", "msg/s", "100", "102", "1.020x", "90-110", "99-105", "3, 2"],
                ["message", "W1", "CPU s/M (lower is better)", "2.20", "1.10", "0.500x",
                 "2.00-2.40", "1.00-1.20", "3, 2"],
            ],
        )  # fmt: skip
        self.assertIn("- Failed: message W1 B round 2: boom", ab.render(run))

    def test_handshakes(self) -> None:
        """W5 reports handshakes/s, KiB per held session and CPU ms per handshake."""
        run = run_of(
            {
                ("tunnel", "W5", "A"): [held(1000, 22_000, 0.8)],
                ("tunnel", "W5", "B"): [held(1500, 21_000, 0.6)],
            },
            wls=(W5,),
            modes=("tunnel",),
        )
        self.assertEqual(
            [r[2:6] for r in ab.rows(run)],
            [
                ["handshakes/s", "1,000", "1,500", "1.500x"],
                ["KiB/session (lower is better)", "12.0", "11.0", "0.917x"],
                ["CPU ms/handshake (lower is better)", "0.800", "0.600", "0.750x"],
            ],
        )

    def test_missing_side(self) -> None:
        """A side without a value has no median and no ratio."""
        run = run_of({("message", "W1", "A"): [echo(100)], ("message", "W1", "B"): []})
        self.assertEqual(ab.rows(run)[0][3:], ["100", "—", "—", "100-100", "—", "1, 0"])

    def test_header_and_notes(self) -> None:
        """The output names both revisions with their commits, the cores, the rounds' order, and
        the rounds other work disturbed."""
        busy = {"window_s": 8.0, "backend_cpu_s": 0.0, "client_cpu_s": 0.0}
        run = run_of(
            {
                ("message", "W1", "A"): [echo(100, machine_busy_s=3.0, **busy)],
                ("message", "W1", "B"): [echo(100, machine_busy_s=1.0, **busy)],
            }
        )
        text = ab.render(run)
        self.assertIn("- A: `HEAD~1` = aaaaaaaaaaaa (old); Twisted x", text)
        self.assertIn("- B: `WORKTREE` = bbbbbbbbbbbb (this work tree)", text)
        self.assertIn("pinned together to core 0, the gate under test", text)
        self.assertIn("to core 1 (`taskset -c`)", text)
        self.assertIn("A first in odd rounds and B first in even ones", text)
        self.assertIn("| message | W1 | msg/s | 100 | 100 | 1.000x |", text)
        self.assertIn("during: message W1 A round 1 (25 %).", text)


class SnapshotTests(SynchronousTestCase):
    def git(self, *args: str) -> str:
        r = subprocess.run(["git", "-C", str(self.repo), *args], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return r.stdout

    def test_work_tree_as_it_is(self) -> None:
        """WORKTREE is a commit on HEAD with the tracked files as they are, new files that git does
        not ignore, without deleted and ignored ones; the work tree's index is not touched."""
        self.repo = Path(tempfile.mkdtemp())
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.repo)])
        self.git("init", "-q")
        for name, text in (("kept", "1"), ("changed", "1"), ("gone", "1"), (".gitignore", "x\n")):
            (self.repo / name).write_text(text)
        self.git("add", ".")
        self.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
        (self.repo / "changed").write_text("2")
        (self.repo / "gone").unlink()
        (self.repo / "new").write_text("3")
        (self.repo / "x").write_text("ignored")
        status = self.git("status", "--porcelain")
        self.patch(ab, "ROOT", self.repo)

        rev = ab.resolve("B", ab.WORKTREE)

        self.assertEqual(self.git("rev-parse", f"{rev.commit}^"), self.git("rev-parse", "HEAD"))
        files = self.git("ls-tree", "--name-only", rev.commit).split()
        self.assertEqual(sorted(files), [".gitignore", "changed", "kept", "new"])
        self.assertEqual(self.git("show", f"{rev.commit}:changed"), "2")
        self.assertIn("with its uncommitted changes", rev.about)
        self.assertEqual(self.git("status", "--porcelain"), status)

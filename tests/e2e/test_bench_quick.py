"""
The benchmark itself works: ``python -m bench --quick`` against the direct path and wsgate.

This runs the real benchmark (it compiles its C tools and starts the echo backend and the gate on
loopback) with tiny counts.  It checks that every workload produced numbers, never how fast they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # the quick run takes well under a minute; gcc and a cold start get some slack
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def summary_table(markdown: str) -> dict[str, dict[str, str]]:
    """The "## Summary" table as {target: {column: cell}}."""
    section = markdown.split("## Summary", 1)[1].strip()
    rows = section.split("\n\n", 1)[0].splitlines()
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    table = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(head[1:], cells[1:], strict=True))
    return table


class QuickBenchmarkTests(SynchronousTestCase):
    def test_quick_run_has_numbers_for_every_workload(self) -> None:
        """
        ``python -m bench --quick --only direct,wsgate`` exits 0 within its bound and its summary
        table has a number for each workload (W1-W3, their text variants W1t-W3t, W4-W6) for both
        targets, and an RSS per held session for wsgate; no NGINX or HAProxy is needed for that.
        """
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "RESULTS.md"
            proc = subprocess.run(
                [sys.executable, "-m", "bench", "--quick", "--only", "direct,wsgate"]
                + ["--out", str(out)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:] + proc.stdout[-3000:])
            text = out.read_text()
        self.assertIn("## Summary", proc.stdout)
        table = summary_table(text)
        self.assertEqual(sorted(table), ["direct", "wsgate"])
        columns = [c for c in table["direct"] if c.startswith("W")]
        self.assertEqual(
            [c.split()[0] for c in columns],
            ["W1", "W2", "W3", "W1t", "W2t", "W3t", "W4", "W5", "W6", "W5"],
        )
        for target, row in table.items():
            for column in columns:
                if target == "direct" and column == "W5 KiB/session":
                    continue  # no proxy, no gate RSS
                self.assertRegex(row[column], NUMBER, f"{target} {column}")

    def test_text_payload_is_valid_utf8_of_the_exact_size(self) -> None:
        """
        ``wsload --text`` sends exactly ``--size`` bytes of valid UTF-8 with multi-byte characters
        (a character that does not fit whole at the end is never cut); binary stays ASCII letters.
        """
        from bench.tools import build_tools

        wsload = build_tools(lambda msg: None)["wsload"]

        def payload(*args: str) -> bytes:
            argv = [str(wsload), "--dump-payload", *args]
            return subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout

        for size in [*range(0, 130), 1024, 65536]:  # every end in the repeated record, and more
            data = payload("--text", "--size", str(size))
            self.assertEqual(len(data), size)
            text = data.decode("utf-8")  # raises on invalid UTF-8, a cut character included
            if size >= 64:
                self.assertIn("é", text)
                self.assertIn("€", text)
                self.assertGreater(sum(b < 0x80 for b in data), 0.8 * size)  # mostly ASCII
        self.assertEqual(payload("--size", "30"), b"abcdefghijklmnopqrstuvwxyzabcd")

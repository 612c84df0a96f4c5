"""
Choosing a server: smooth weighted round robin and the exclusion of servers already tried.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from wsgate.config import ServerSpec, UpstreamSpec
from wsgate.upstream import Upstream


def upstream(*weights: int) -> Upstream:
    servers = tuple(ServerSpec(url=f"ws://s{i}.test:1", weight=w) for i, w in enumerate(weights))
    return Upstream(UpstreamSpec(name="u", servers=servers))


class RoundRobinTests(SynchronousTestCase):
    def test_smooth(self) -> None:
        """Weights 5/1/1 interleave (a a b a c a a), never a burst of five."""
        u = upstream(5, 1, 1)
        picks = "".join("abc"[u.servers.index(u.pick())] for _ in range(7))  # type: ignore[arg-type]
        self.assertEqual(picks, "aabacaa")

    def test_exact_over_cycle(self) -> None:
        """Over whole cycles every server gets exactly its weight's share."""
        u = upstream(3, 2, 1)
        counts = Counter(u.pick().url for _ in range(600))  # type: ignore[union-attr]
        self.assertEqual(sorted(counts.values()), [100, 200, 300])

    def test_exclude(self) -> None:
        """Servers already tried are skipped; with all tried there is no server."""
        u = upstream(1, 1)
        first = u.pick()
        assert first is not None
        self.assertIsNot(u.pick(exclude=[first]), first)
        self.assertIsNone(u.pick(exclude=u.servers))

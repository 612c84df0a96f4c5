"""
Limits without a gate: per-address and total admission with its handshake token bucket, the
message budget, and rate-limited warnings.  The limits as a gate enforces them are in
``tests/dataplane/test_limits.py``.
"""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wsgate.config import Limits
from wsgate.core.limits import Admission, MessageRate, WarningLimiter


class AdmissionTests(SynchronousTestCase):
    def test_limits(self) -> None:
        """Per-address and total session limits refuse with 429 and 503; release frees a place."""
        admission = Admission(Limits(max_sessions=3, max_sessions_per_ip=2), lambda: 0.0)
        self.assertIsNone(admission.admit("10.0.0.1"))
        self.assertIsNone(admission.admit("10.0.0.1"))
        self.assertEqual(admission.admit("10.0.0.1")[0], 429)  # type: ignore[index]
        self.assertIsNone(admission.admit("10.0.0.2"))
        self.assertEqual(admission.admit("10.0.0.3")[0], 503)  # type: ignore[index]
        admission.release("10.0.0.1")
        self.assertIsNone(admission.admit("10.0.0.3"))
        self.assertEqual(admission.total, 3)

    def test_token_bucket(self) -> None:
        """Handshakes per second per address: a burst, then the rate; other addresses unaffected."""
        now = [0.0]
        admission = Admission(Limits(handshake_rate=2.0, handshake_burst=3), lambda: now[0])
        results = [admission.admit("a") is None for _ in range(4)]
        self.assertEqual(results, [True, True, True, False])
        self.assertIsNone(admission.admit("b"))
        now[0] = 0.5  # one token back
        self.assertIsNone(admission.admit("a"))
        self.assertIsNotNone(admission.admit("a"))


class MessageRateTests(SynchronousTestCase):
    def test_budget(self) -> None:
        """Over the per-second budget, spend says how long until the window ends."""
        now = [10.0]
        rate = MessageRate(3, 0, lambda: now[0])
        self.assertEqual([rate.spend(1) for _ in range(3)], [0.0, 0.0, 0.0])
        now[0] = 10.25
        self.assertAlmostEqual(rate.spend(1), 0.75)
        now[0] = 11.0
        self.assertEqual(rate.spend(1), 0.0)
        self.assertAlmostEqual(MessageRate(0, 100, lambda: 0.0).spend(101), 1.0)


class WarningLimiterTests(SynchronousTestCase):
    def test_flood(self) -> None:
        """After the burst a kind of warning is counted, and the count reported later."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        now = [0.0]
        limiter = WarningLimiter(lambda: now[0], burst=3, interval=60)
        for i in range(100):
            limiter.warn("handshake_400", "client={client}", client=i)
        now[0] = 61
        limiter.warn("handshake_400", "client={client}", client="last")
        mine = [e for e in events if e.get("log_format", "").startswith("handshake_400 ")]
        self.assertEqual(len(mine), 4)
        self.assertEqual(mine[-1]["suppressed"], 97)

"""The autouse fixture in conftest.py: a test's fake clock does not outlive the test."""

from __future__ import annotations

import txaio
from twisted.internet import task

from tests.helpers import Network, make_config


def test_a_network_points_autobahn_at_its_clock() -> None:
    net = Network(make_config(["ws://a.test:1"]), {})
    assert txaio.config.loop is net.clock


def test_the_next_test_has_the_loop_back() -> None:
    """Runs after the test above (pytest keeps file order): its Clock is gone."""
    assert not isinstance(txaio.config.loop, task.Clock)

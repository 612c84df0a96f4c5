"""
Fixtures every test gets: Autobahn's timer loop (``txaio.config.loop``) restored after each test,
as the in-memory tests (``tests.helpers.Network``) point it at their fake clock, and a later
test on the real reactor would otherwise have Autobahn's timers on a clock nobody advances.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import txaio


@pytest.fixture(autouse=True)
def _restore_txaio_loop() -> Iterator[None]:
    loop = txaio.config.loop
    yield
    txaio.config.loop = loop


def pytest_report_header() -> str:
    from wsgate.dataplane import _compat

    return f"wsgate fast paths: {'on' if _compat.FAST_PATHS else 'off (WSGATE_FAST_PATHS=0)'}"

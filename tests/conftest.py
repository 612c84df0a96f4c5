"""
Fixtures every test gets: Autobahn's timer loop (``txaio.config.loop``) restored after each test,
as the in-memory tests (``tests.helpers.Network``) point it at their fake clock, and a later
test on the real reactor would otherwise have Autobahn's timers on a clock nobody advances.

And SIGINT's default for the processes the tests start: a suite run as a background job of a
shell without job control inherits SIGINT ignored, every gate it starts would inherit that too,
and Twisted (rightly) leaves an ignored SIGINT ignored, so the tests of Ctrl-C would fail.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import txaio


@pytest.fixture(autouse=True)
def _restore_txaio_loop() -> Iterator[None]:
    loop = txaio.config.loop
    yield
    txaio.config.loop = loop


def pytest_configure() -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header() -> str:
    from wsgate.dataplane import _compat

    return f"wsgate fast paths: {'on' if _compat.FAST_PATHS else 'off (WSGATE_FAST_PATHS=0)'}"

"""
SIGHUP: reload the config file from the signal, for the single process and the workers' parent.

Owns the signal handler (installed by a service's ``startService``, restored by its
``stopService``) and what happens to a refused config: every problem is logged and the running
config stays.  It must not know what a reload changes: the service's ``reload`` does that.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from wsgate.config import ConfigError

__all__ = ["reload_on_sighup"]


def reload_on_sighup(reactor: Any, reload: Callable[[], object], log: Any) -> Callable[[], None]:
    """
    Call ``reload`` in the reactor thread on every SIGHUP; a ``ConfigError`` it raises is logged
    (``config_reload_refused``) instead.  Returns the function that puts the previous handler back.
    """

    def reload_logged() -> None:
        try:
            reload()
        except ConfigError as e:
            for problem in e.problems:
                log.error("config_reload_refused {problem}", problem=problem)
            log.error("config_reload_refused: the running config stays")

    previous = signal.signal(
        signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload_logged)
    )

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

    return restore

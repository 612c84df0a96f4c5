"""
The Gateway: the one runtime object of a running wsgate.

Owns the current config, the router, the upstreams, the registry of live sessions and the counters
that the access log, console and metrics share.  Must not do I/O itself: sessions (``bridge.py``)
register and report here; listeners and connections are built by ``service.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from wsgate.config import Config
from wsgate.routing import Router
from wsgate.upstream import Upstream

if TYPE_CHECKING:
    from wsgate.bridge import Session

__all__ = ["Clock", "Gateway"]


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f, *args, **kwargs): ...  # noqa: ANN001


class Gateway:
    """
    Routes, upstreams, live sessions and counters.

    ``counters`` keys: ``handshakes.<result>`` (``ok``, ``404``, ``502``, ...), ``sessions.opened``,
    ``sessions.closed``.  Per-session figures live on each :class:`~wsgate.bridge.Session`.
    """

    log = Logger()

    def __init__(self, config: Config, clock: Clock) -> None:
        self.clock = clock
        self.sessions: dict[int, Session] = {}
        self.counters: Counter[str] = Counter()
        self._next_id = 1
        self.config = config
        self.router = Router(config.routes)
        self.upstreams = {name: Upstream(spec) for name, spec in config.upstreams.items()}

    def new_session_id(self) -> int:
        session_id = self._next_id
        self._next_id += 1
        return session_id

    def handshake_result(self, result: str) -> None:
        """Count one client handshake by its result: ``ok`` or the HTTP status it was refused with."""
        self.counters[f"handshakes.{result}"] += 1

    def session_opened(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.counters["sessions.opened"] += 1
        self.log.info(
            "session_opened {session_id} client={client} route={route} server={server} "
            "path={path} subprotocol={subprotocol}",
            **session.describe(),
        )

    def session_closed(self, session: Session) -> None:
        """Forget a finished session and write its access-log line."""
        if self.sessions.pop(session.id, None) is None:
            return
        self.counters["sessions.closed"] += 1
        self.log.info(
            "session_closed {session_id} client={client} route={route} server={server} "
            "duration={duration:.3f}s messages_up={messages_up} bytes_up={bytes_up} "
            "messages_down={messages_down} bytes_down={bytes_down} "
            "client_close={client_close} backend_close={backend_close} closed_by={closed_by}",
            **session.describe(),
        )

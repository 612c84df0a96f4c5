"""
What the gate's own HTTP calls share (forward auth, JWKS fetches, lifecycle webhooks): reading an
answer's body with a bound, so that no auth service or webhook receiver can grow the gate's
memory.  The connection pools come from :func:`wsgate.dataplane._compat.quiet_pool`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

__all__ = ["read_body"]


def read_body(response: Any, limit: int | None) -> Deferred:
    """
    The body of ``response`` (an ``IResponse``): fires with at most ``limit`` bytes, or fails
    with ValueError when there are more (the connection is then dropped); ``limit = None`` reads
    and forgets the body (fires with ``b""``), so that the connection can be reused.  Cancelling
    drops the connection.
    """
    reader = _BoundedBody(limit)
    response.deliverBody(reader)
    return reader.done


class _BoundedBody(Protocol):
    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred = Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._limit is None:
            return
        self._size += len(data)
        if self._size <= self._limit:
            self._parts.append(data)
            return
        self._parts = []
        if not self.done.called:
            self.done.errback(ValueError(f"answer longer than {self._limit} bytes"))
        self._abort()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

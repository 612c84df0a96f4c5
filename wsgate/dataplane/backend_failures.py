"""
Why a backend attempt failed, as one word of the bounded set
:data:`wsgate.core.metrics.BACKEND_FAILURE_REASONS` (the ``reason`` label of
``wsgate_backend_failures_total``).

Owns the mapping from what Twisted, the TLS layer and Autobahn report (a connect ``Failure``, a
backend leg that timed out, was refused or was lost during its handshake) to that word.  Must not
count or log: the session reports the word to the Gateway, which counts it.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.python.failure import Failure

from wsgate.net.tls import TLSHandshakeError

__all__ = ["connect_failure_reason", "handshake_failure_reason"]

# TimeoutError: the endpoint's timeout (or the TLS wait's); TCPTimedOutError: the kernel's.
_CONNECT_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (error.ConnectionRefusedError, "connect_refused"),
    (error.TimeoutError, "connect_timeout"),
    (error.TCPTimedOutError, "connect_timeout"),
    (error.DNSLookupError, "dns"),
    (TLSHandshakeError, "tls"),
)


def connect_failure_reason(failure: Failure) -> str:
    """The reason of a failed connect (TCP, and for ``wss://`` the TLS handshake)."""
    for kind, reason in _CONNECT_ERRORS:
        if failure.check(kind):
            return reason
    return "connect_error"


def handshake_failure_reason(timed_out: bool, refusal: str | None, status_line: str | None) -> str:
    """
    The reason of a backend connection that ended before its WebSocket handshake completed:
    ``timed_out`` (the upstream's handshake_timeout), ``refusal`` (Autobahn failed the handshake,
    with this text) and ``status_line`` (the HTTP status line the backend answered, if one came).
    """
    if timed_out:
        return "handshake_timeout"
    if refusal is None:
        return "handshake_lost"
    parts = (status_line or "").split()
    if len(parts) >= 2 and parts[1].isdigit() and parts[1] != "101":
        return "http_status"
    return "handshake_invalid"

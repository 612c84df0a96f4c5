"""
PROXY protocol listeners (``proxy_protocol = true``): Twisted's parser, fed whole headers.

Twisted's PROXY protocol wrapper chooses between v1 and v2 on the first chunk it receives and
drops the connection when that chunk is shorter than 16 bytes (v2) or 8 bytes (v1), even when the
rest of a valid header is on its way.  This module owns the fix: a wrapper in front of it that
holds the first bytes until a header can be recognised (16 bytes, or a complete v1 line) and from
then on passes bytes straight through.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

__all__ = ["proxy_protocol_endpoint"]

# Bytes Twisted's parser needs to recognise a v2 header; a v1 header may end sooner.
_RECOGNISABLE = 16


class _WholeHeader(ProtocolWrapper):
    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._head: bytes | None = b""

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            data = self._head + data
            v1_line = data.startswith(b"PROXY") and b"\r\n" in data
            if len(data) < _RECOGNISABLE and not v1_line:
                self._head = data
                return
            self._head = None
        wrapped: Any = self.wrappedProtocol
        wrapped.dataReceived(data)


class _WholeHeaderFactory(WrappingFactory):
    protocol = _WholeHeader
    noisy = False


@implementer(IStreamServerEndpoint)
class _WholeHeaderEndpoint:
    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(_WholeHeaderFactory(factory))


def proxy_protocol_endpoint(endpoint: Any) -> Any:
    """``endpoint`` (a listening socket's endpoint) speaking the PROXY protocol, v1 and v2."""
    whole: Any = _WholeHeaderEndpoint(endpoint)
    return proxyEndpoint(whole)

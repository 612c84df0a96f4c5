"""
TLS: how the gate opens connections to backend servers (and, later, its server-side contexts).

Owns the backend endpoints: ``ws://`` servers over plain TCP, ``wss://`` servers over TLS verified
with service_identity against the system trust store, with SNI.  ``service_identity`` is imported
here on purpose so that a missing install fails at startup instead of silently weakening hostname
checks.
"""

from __future__ import annotations

from typing import Any

import service_identity  # noqa: F401 - see the module docstring
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import optionsForClientTLS

from wsgate.config import ServerSpec

__all__ = ["BackendConnector"]


class BackendConnector:
    """Opens a connection to a backend server: ``connector(server, factory, timeout)``."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor

    def __call__(self, server: ServerSpec, factory: Any, timeout: float) -> Deferred:
        endpoint: Any = HostnameEndpoint(self._reactor, server.host, server.port, timeout=timeout)
        if server.secure:
            endpoint = wrapClientTLS(optionsForClientTLS(server.host), endpoint)
        return endpoint.connect(factory)

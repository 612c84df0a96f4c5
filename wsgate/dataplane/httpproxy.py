"""
Plain HTTP on WebSocket routes: a reverse proxy for requests that are not upgrades.

A route with ``http = true`` sends such requests (Socket.IO/SockJS long-polling, health pages,
static assets) to a server of the same upstream, chosen by the same balancer with the same key,
so that with ``hash`` on a cookie or query parameter a client's polling requests and its later
upgrade reach the same server.  Without ``http = true`` the client keeps getting 426.

How a request gets here.  Autobahn parses every request on a listener; for one without
``Upgrade`` (426) or with a method other than GET (405) the :class:`~wsgate.dataplane.bridge.ClientLeg` calls
:func:`start_http` before answering the error.  When the route allows HTTP, an
:class:`HttpExchange` takes over the connection: the leg passes on every later byte and the loss
of the connection, and Autobahn is not involved any more.

One request per client connection.  The request head is rewritten (hop-by-hop headers removed:
``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``,
``Trailer``, ``Upgrade``, ``Proxy-Authorization``; ``Host`` becomes the server's; the forwarded
headers ``X-Forwarded-For``/``-Proto``/``-Host``, ``X-Real-IP`` and ``X-Request-ID`` (as for
sessions) are added; ``Connection: close``) and the body streams through unchanged (its ``Content-Length`` or ``chunked`` framing is
end to end because both connections close after one exchange).  The response head loses its
hop-by-hop headers and gains ``Connection: close``; its body streams back as it arrives.  Each
transport is the other's producer, so a slow reader pauses the fast writer.  A server that
cannot be connected to is skipped like for sessions (``tries``, passive health); a server that
drops the connection before answering gives 502.

This module must not know about WebSocket framing; it receives the leg, the gateway and the
connector as arguments.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate.core.redact import new_request_id, redact_target, sanitize_request_id
from wsgate.core.upstream import Server
from wsgate.dataplane.backend_failures import connect_failure_reason

__all__ = ["HttpExchange", "parse_head", "start_http"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}
_MAX_RESPONSE_HEAD = 64 * 1024


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """An HTTP head -> (its first line, [(name, value), ...]) in order, names as sent."""
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without the hop-by-hop ones (including those named by ``Connection``)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = _HOP_BY_HOP | named
    return [(n, v) for n, v in headers if n.lower() not in drop]


def start_http(leg: Any, gateway: Any, connect: Any) -> HttpExchange | None:
    """
    Take over ``leg``'s connection for the plain HTTP request Autobahn just parsed, when its route
    has ``http = true``; None (nothing done) otherwise.
    """
    head = getattr(leg, "http_request_data", None)
    if not head:
        return None
    request_line, headers = parse_head(head)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    lower = {name.lower(): value for name, value in headers}
    if "upgrade" in lower:
        return None
    method, target = parts[0], parts[1]
    host = lower.get("host", "").rsplit(":", 1)[0] if "]" not in lower.get("host", "") else ""
    path = urlsplit(target).path or "/"
    route = gateway.router.match(host, path)
    if route is None or not getattr(route, "http", False):
        return None
    upstream = gateway.upstreams[route.upstream]
    exchange = HttpExchange(leg, gateway, connect, upstream, method, target, headers)
    exchange.start(leg.data[len(head) :])
    return exchange


class HttpExchange:
    """One plain HTTP request of a client connection, proxied to one server of an upstream."""

    log = Logger()

    def __init__(
        self,
        leg: Any,
        gateway: Any,
        connect: Any,
        upstream: Any,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
    ) -> None:
        self.leg = leg
        self.client = leg.transport
        self.gateway = gateway
        self.upstream = upstream
        self.method = method
        self.target = target
        self.headers = headers
        self.server: Server | None = None
        self.status: int | None = None
        self.bytes_down = 0
        self._connect = connect
        self._tried: list[Server] = []
        self._backend: _BackendHttp | None = None
        self._attempt: Any = None
        self._buffer: list[bytes] = []
        self._done = False
        lower = {n.lower(): v for n, v in headers}
        self._lower = lower
        length = lower.get("content-length", "")
        # Bytes of body still to forward: None for "until the client stops" (chunked).
        self._remaining: int | None = int(length) if length.isdigit() else 0
        if "chunked" in lower.get("transfer-encoding", "").lower():
            self._remaining = None
        peer = self.client.getPeer()
        self.client_address = str(getattr(peer, "host", peer))
        self.tls = ISSLTransport.providedBy(self.client)
        self.request_id = sanitize_request_id(lower.get("x-request-id")) or new_request_id()

    # -- the client side ----------------------------------------------------------------------

    def start(self, body_start: bytes) -> None:
        self.leg.cancel_handshake_timer()
        self.gateway.counters["http.requests"] += 1
        self.client.pauseProducing()  # until a server is connected
        self.client_data(body_start)
        self._try_next(None)

    def client_data(self, data: bytes) -> None:
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        if not data:
            return
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.write(data)
        else:
            self._buffer.append(data)

    def client_lost(self) -> None:
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.loseConnection()
        self._finish(self.status or 499)

    # -- choosing and connecting --------------------------------------------------------------

    def _try_next(self, failure: tuple[int, str] | None) -> None:
        upstream = self.upstream
        server = None
        if len(self._tried) < upstream.spec.tries:
            query = parse_qs(urlsplit(self.target).query)
            server = upstream.pick(
                self._tried, client=self.client_address, headers=self._lower, params=query
            )
        if server is None:
            self._respond_error(*(failure or (503, "No backend server available")))
            return
        self._tried.append(server)
        upstream.attempt_started(server)
        factory = Factory.forProtocol(lambda: _BackendHttp(self))
        self._attempt = self._connect(server.spec, factory, upstream.spec.connect_timeout)
        self._attempt.addCallbacks(self._connected, self._failed, (server,), None, (server,))

    def _connected(self, backend: _BackendHttp, server: Server) -> None:
        self._attempt = None
        self.upstream.attempt_ended(server, True)
        self.server = server
        self._backend = backend
        if self._done:
            backend.transport.loseConnection()
            return
        backend.transport.write(self._request_head(server))
        for chunk in self._buffer:
            backend.transport.write(chunk)
        self._buffer = []
        # Each transport is the other's producer: a slow reader pauses the fast writer.
        backend.transport.registerProducer(self.client, True)
        self.client.registerProducer(backend.transport, True)
        self.client.resumeProducing()

    def _failed(self, reason: Failure, server: Server) -> None:
        self._attempt = None
        if self._done:
            self.upstream.attempt_ended(server, None)
            return
        self.upstream.attempt_ended(server, False)
        self.gateway.backend_failed(self.upstream.name, server.url, connect_failure_reason(reason))
        status = 504 if reason.check(TimeoutError) else 502
        self.log.warn(
            "backend_attempt_failed http client={client} server={server} status={status} "
            "reason={reason}",
            client=self.client_address,
            server=server.url,
            status=status,
            reason=reason.getErrorMessage(),
        )
        self._try_next((status, "No backend server accepted the request"))

    def _request_head(self, server: Server) -> bytes:
        headers = [(n, v) for n, v in _end_to_end(self.headers) if n.lower() != "host"]
        xff = self._lower.get("x-forwarded-for")
        forwarded = {
            "x-forwarded-for": f"{xff}, {self.client_address}" if xff else self.client_address,
            "x-forwarded-proto": "https" if self.tls else "http",
            "x-forwarded-host": self._lower.get("host", ""),
            "x-real-ip": self.client_address,
            "x-request-id": self.request_id,
        }
        headers = [(n, v) for n, v in headers if n.lower() not in forwarded]
        spec = server.spec
        default = 443 if spec.secure else 80
        host = spec.host if spec.port == default else f"{spec.host}:{spec.port}"
        if ":" in spec.host:
            host = f"[{spec.host}]" if spec.port == default else f"[{spec.host}]:{spec.port}"
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {host}"]
        lines += [f"{n}: {v}" for n, v in headers]
        lines += [f"{n.title()}: {v}" for n, v in forwarded.items()]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    # -- the response -------------------------------------------------------------------------

    def response_head(self, head: bytes) -> bytes:
        """The server's response head as the client gets it."""
        status_line, headers = parse_head(head)
        parts = status_line.split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
        lines = [status_line] + [f"{n}: {v}" for n, v in _end_to_end(headers)]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def response_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self.client.write(data)

    def backend_lost(self, answered: bool) -> None:
        self._backend = None
        if self._done:
            return
        if not answered:
            self._respond_error(502, "The backend server closed the connection without answering")
            return
        self.client.unregisterProducer()
        self.client.loseConnection()
        self._finish(self.status or 502)

    def _respond_error(self, status: int, reason: str) -> None:
        if self._done:
            return
        self.leg.sendHttpErrorResponse(status, reason)
        self.client.resumeProducing()
        self.client.loseConnection()
        self._finish(status)

    def _finish(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        self.status = status
        self.gateway.counters[f"http.{status}"] += 1
        self.log.info(
            "http_request client={client} method={method} path={path} request_id={request_id} "
            "upstream={upstream} server={server} status={status} bytes_down={bytes_down}",
            client=self.client_address,
            method=self.method,
            path=redact_target(self.target, self.gateway.config.log),
            request_id=self.request_id,
            upstream=self.upstream.name,
            server=self.server.url if self.server else None,
            status=status,
            bytes_down=self.bytes_down,
        )


class _BackendHttp(Protocol):
    """The connection to the server: rewrites the response head, then streams the rest."""

    transport: Any

    def __init__(self, exchange: HttpExchange) -> None:
        self.exchange = exchange
        self._head = b""
        self._answered = False

    def dataReceived(self, data: bytes) -> None:
        if self._answered:
            self.exchange.response_data(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_RESPONSE_HEAD:
                self.transport.abortConnection()
            return
        head, rest = self._head[: end + 4], self._head[end + 4 :]
        self._head = b""
        self._answered = True
        self.exchange.client.write(self.exchange.response_head(head))
        if rest:
            self.exchange.response_data(rest)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.exchange.backend_lost(self._answered)

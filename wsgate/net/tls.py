"""
TLS: the gate's front door (server-side contexts) and its connections to backend servers.

Server side.  :class:`ServerTLS` is the connection creator of one TLS listener: TLS 1.2+ (or 1.3+),
for TLS 1.2 only cipher suites with forward secrecy and AEAD unless the listener's ``ciphers``
says otherwise (``config.DEFAULT_CIPHERS``; TLS 1.3 keeps OpenSSL's suites), ALPN offering only
``http/1.1`` (so browsers never try WebSocket over HTTP/2), a default certificate for clients that
send no SNI (or an unknown name) and certificates chosen by SNI name, exact or ``*.example.com``
wildcard (one label, as browsers match).  :meth:`ServerTLS.reload` builds a whole new set of
contexts and swaps it in at once: connections already open keep the contexts they started with,
new connections get the new ones, and a set that fails to build leaves the old one in place.
:func:`tls_server_factory` wraps a protocol factory in TLS with a transport that declares
``ISSLTransport`` (as ``reactor.listenSSL`` transports do), so sessions know they came over TLS.

Backend side.  :class:`BackendConnector` opens ``ws://`` servers over TCP and ``wss://`` servers over
TLS verified with service_identity against the system trust store or the server's ``ca`` bundle,
sending SNI, with an optional client certificate (mutual TLS).  ``verify = false`` turns
verification off for that server only (SNI is still sent; :func:`unverified_servers` lists them so
that the service can warn at every start).  The connect Deferred fires only once the TLS handshake
is done, within the connect timeout; a failed handshake fails it with :class:`TLSHandshakeError`,
whose text says why (untrusted certificate, host name mismatch, ...).

``service_identity`` is imported here on purpose so that a missing install fails at startup
instead of silently weakening hostname checks.  This module must not read the config file or
decide routing; it receives specs from ``wsgate.config`` and is wired by ``service.py``.

Over 500 lines because the server side (contexts, SNI, reload) and the backend side (verified
connections) share the certificate loading and the failure texts; a split is the next step if
either grows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import service_identity  # see the module docstring
import service_identity.hazmat
import service_identity.pyopenssl
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import resource, server
from zope.interface import implementer

from wsgate.config import CertificateFiles, Config, ListenerTLS, ServerSpec, certificate_problems
from wsgate.core.redact import logfmt_value

__all__ = [
    "ALPN_PROTOCOLS",
    "BackendConnector",
    "HTTPSRedirect",
    "ServerTLS",
    "TLSHandshakeError",
    "TLSLoadError",
    "certificate_rows",
    "redirect_site",
    "tls_facts",
    "tls_server_factory",
    "unverified_servers",
]

ALPN_PROTOCOLS = [b"http/1.1"]
_MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TLSLoadError(Exception):
    """Certificates could not be loaded: ``problems`` lists ``file: reason`` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _certificates(path: str) -> list[Certificate]:
    return [Certificate.loadPEM(pem) for pem in _PEM_CERTIFICATE.findall(_read(path))]


def _not_after(certificates: list[Certificate]) -> float:
    """When the first of ``certificates`` expires (Unix time)."""
    return min(c.original.to_cryptography().not_valid_after_utc.timestamp() for c in certificates)


def _chain_not_after(files: CertificateFiles) -> float:
    """When the first certificate a listener serves from ``files`` (leaf or chain) expires."""
    chain = [*_certificates(files.cert), *(_certificates(files.chain) if files.chain else [])]
    return _not_after(chain)


def _private_certificate(cert: str, key: str) -> PrivateCertificate:
    return PrivateCertificate.loadPEM(_read(cert) + b"\n" + _read(key))


def _server_options(files: CertificateFiles, spec: ListenerTLS, **extra: Any) -> CertificateOptions:
    """
    ``CertificateOptions`` for one server certificate (the cert file may carry its chain), with
    the listener's lowest version and TLS 1.2 ciphers (TLS 1.3 keeps OpenSSL's suites).
    """
    chain = _certificates(files.cert)[1:]
    if files.chain is not None:
        chain += _certificates(files.chain)
    private = _private_certificate(files.cert, files.key)
    return CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in chain],
        raiseMinimumTo=_MIN_VERSIONS[spec.min_version],
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(spec.ciphers),
        acceptableProtocols=ALPN_PROTOCOLS,
        **extra,
    )


def _load_problems(files: Iterator[CertificateFiles]) -> list[str]:
    """Readable reasons why a set of certificate files did not load."""
    problems = [reason for f in files for _, reason in certificate_problems(f.cert, f.key, f.chain)]
    return problems


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS connection creator of one listener.  Stays the same object for the listener's life;
    :meth:`reload` swaps the certificates it hands to new connections.
    """

    log = Logger()

    def __init__(self, spec: ListenerTLS) -> None:
        self.spec = spec
        self._default, self._by_name, self.expiries = self._build(spec)

    def _build(
        self, spec: ListenerTLS
    ) -> tuple[CertificateOptions, Mapping[bytes, SSL.Context], list[tuple[str, str, float]]]:
        """
        The default context, the contexts by SNI name, and ``(SNI name or "default", cert file,
        notAfter)`` of each certificate (for the expiry metric): all of them, or TLSLoadError.
        """
        try:
            named = [("default", spec.default), *spec.sni.items()]
            expiries = [(name, files.cert, _chain_not_after(files)) for name, files in named]
            by_name = {
                name.encode("idna"): _server_options(files, spec).getContext()
                for name, files in spec.sni.items()
            }
            default = _server_options(spec.default, spec, contextForServerName=self._context_for)
            default.getContext()  # build it now, so that errors show here and not per connection
        except Exception as e:  # OpenSSL and file errors alike: say which file and why
            files = iter([spec.default, *spec.sni.values()])
            raise TLSLoadError(_load_problems(files) or [f"{type(e).__name__}: {e}"]) from e
        return default, by_name, expiries

    def reload(self, spec: ListenerTLS) -> None:
        """
        Load ``spec``'s certificates and use them for new connections.  Raises
        :class:`TLSLoadError` (and keeps the current certificates) when they do not load.
        """
        self._default, self._by_name, self.expiries = self._build(spec)
        self.spec = spec

    def names(self) -> list[str]:
        """The SNI names that have their own certificate."""
        return sorted(name.decode() for name in self._by_name)

    def _context_for(self, server_name: bytes | None) -> SSL.Context | None:
        """The context for a client's SNI name: exact, then ``*.parent``; None: the default."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(b".")
        by_name = self._by_name
        found = by_name.get(name)
        if found is None and b"." in name:
            found = by_name.get(b"*." + name.split(b".", 1)[1])
        return found

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._default.serverConnectionForTLS(tlsProtocol)


@implementer(ISSLTransport)
class _ServerTLSProtocol(TLSMemoryBIOProtocol):
    """A TLS server connection: as a transport it is an ``ISSLTransport`` (it is one)."""


class _ServerTLSFactory(TLSMemoryBIOFactory):
    protocol = _ServerTLSProtocol


def tls_server_factory(
    creator: ServerTLS, factory: IProtocolFactory, clock: IReactorTime | None = None
) -> TLSMemoryBIOFactory:
    """Wrap a server protocol factory in TLS from ``creator``."""
    tls_creator: Any = creator  # implements IOpenSSLServerConnectionCreator (mypy cannot see it)
    return _ServerTLSFactory(tls_creator, False, factory, clock=clock)


# -- plain-HTTP redirect -----------------------------------------------------------------------


class HTTPSRedirect(resource.Resource):
    """
    Answers every request with ``301 Moved Permanently`` to the same host, path and query over
    https (on ``https_port``; the port is left out when it is 443).  WebSocket upgrade requests get
    the same answer: ``ws://`` clients fail with it, which says "use wss://".
    """

    isLeaf = True

    def __init__(self, https_port: int = 443) -> None:
        super().__init__()
        self.https_port = https_port

    def render(self, request: Any) -> bytes:
        host = request.getRequestHostname().decode("ascii", "replace")
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        port = "" if self.https_port == 443 else f":{self.https_port}"
        location = f"https://{host}{port}{request.uri.decode('ascii', 'replace')}"
        request.setResponseCode(301)
        request.setHeader(b"Location", location.encode("ascii"))
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return f"301 Moved Permanently: {location}\n".encode()


def redirect_site(
    https_port: int = 443, redact: Callable[[str], str | None] = lambda target: target
) -> server.Site:
    """
    The protocol factory of a plain-HTTP redirect listener.  Each request is logged as one
    ``http_redirect`` line, its target passed through ``redact`` (Twisted's own combined-log line
    would carry the query string and the referrer as they came).
    """

    def log_line(timestamp: str, request: Any) -> str:
        peer = request.getClientAddress()
        target = request.uri.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        return (
            f"http_redirect client={getattr(peer, 'host', '-')} method={logfmt_value(method)} "
            f"path={logfmt_value(redact(target) or '')} status={request.code}"
        )

    site = server.Site(HTTPSRedirect(https_port), logFormatter=log_line)
    site.displayTracebacks = False
    return site


# -- backends ----------------------------------------------------------------------------------


class TLSHandshakeError(Exception):
    """A backend's TLS handshake failed; the text says why."""


def _describe_tls_failure(reason: Failure, host: str) -> str:
    value = reason.value
    if isinstance(value, service_identity.VerificationError | service_identity.CertificateError):
        return f"certificate does not match host name {host!r}"
    if isinstance(value, SSL.Error):
        texts = [err[2] for err in value.args[0] if isinstance(err, tuple) and len(err) == 3]
        return "; ".join(t for t in texts if t) or str(value)
    if isinstance(value, ConnectionDone):
        return "the server closed the connection"
    return reason.getErrorMessage()


@implementer(IHandshakeListener)
class _HandshakeWait(ProtocolWrapper):
    """
    Sits between a backend TLS connection and its leg: ``ready`` fires with the leg once the TLS
    handshake is done, or fails with :class:`TLSHandshakeError` when the connection ends first.
    """

    def __init__(
        self, factory: Any, wrappedProtocol: Any, host: str, port: int, verify: bool
    ) -> None:
        super().__init__(factory, wrappedProtocol)
        self.host = host
        self.port = port
        self.verify = verify
        self.ready: Deferred = Deferred(self._cancel)

    def makeConnection(self, transport: Any) -> None:
        # Not ProtocolWrapper.makeConnection: it would copy the TLS transport's interfaces, and
        # Autobahn expects an ISSLTransport to be a TLSMemoryBIOProtocol.
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        wrapped: Any = self.wrappedProtocol
        wrapped.makeConnection(self)

    def _cancel(self, d: Deferred) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        if self.ready.called:
            return
        problem = self._identity_problem() if self.verify else None
        if problem is not None:
            self.ready.errback(
                TLSHandshakeError(f"TLS handshake with {self.host}:{self.port} failed: {problem}")
            )
            transport: Any = self.transport
            transport.abortConnection()
            return
        self.ready.callback(self.wrappedProtocol)

    def _identity_problem(self) -> str | None:
        """
        The host name check again, failing closed.  Twisted 26.10's own (``_sslverify._verifyCB``)
        refuses a certificate only on ``VerificationError``: any other exception, such as
        service_identity's ``CertificateError`` for a name it cannot parse (``*.localhost``), is
        logged and the chain's verdict kept, so a trusted certificate for another name plus such
        a pattern was accepted.
        """
        host = self.host
        ip = isIPAddress(host) or isIPv6Address(host)
        wanted = (
            service_identity.hazmat.IPAddress_ID(host)
            if ip
            else (service_identity.hazmat.DNS_ID(host))
        )
        try:
            transport: Any = self.transport
            cert = transport.getPeerCertificate()
            patterns = service_identity.pyopenssl.extract_patterns(cert)
            service_identity.hazmat.verify_service_identity(patterns, [wanted], [])
        except Exception:  # noqa: BLE001  VerificationError and any other: refuse
            return f"certificate does not match host name {host!r}"
        return None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if not self.ready.called:
            why = _describe_tls_failure(reason, self.host)
            self.ready.errback(
                TLSHandshakeError(f"TLS handshake with {self.host}:{self.port} failed: {why}")
            )
        super().connectionLost(reason)


class _HandshakeWaitFactory(WrappingFactory):
    noisy = False

    def __init__(self, wrappedFactory: Any, host: str, port: int, verify: bool) -> None:
        super().__init__(wrappedFactory)
        self.host = host
        self.port = port
        self.verify = verify

    def buildProtocol(self, addr: Any) -> _HandshakeWait:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return _HandshakeWait(self, wrapped, self.host, self.port, self.verify)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS to a backend without certificate checks (``verify = false``), still sending SNI."""

    def __init__(self, host: str, options: CertificateOptions) -> None:
        self._options = options
        self._server_name = None
        if not (isIPAddress(host) or isIPv6Address(host)):
            self._server_name = host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def client_tls(server: ServerSpec) -> IOpenSSLClientConnectionCreator:
    """The TLS settings for connecting to one ``wss://`` server."""
    client = None
    if server.client_cert is not None and server.client_key is not None:
        client = _private_certificate(server.client_cert, server.client_key)
    if not server.verify:
        extra: dict[str, Any] = {}
        if client is not None:
            extra = {"privateKey": client.privateKey.original, "certificate": client.original}
        unverified: Any = _UnverifiedClientTLS(
            server.host, CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2, **extra)
        )
        return unverified
    trust = trustRootFromCertificates(_certificates(server.ca)) if server.ca else platformTrust()
    return optionsForClientTLS(server.host, trustRoot=trust, clientCertificate=client)


def unverified_servers(config: Config) -> list[str]:
    """``upstream NAME: URL`` of every ``wss://`` server with ``verify = false``."""
    return [
        f"upstream {name}: {s.url}"
        for name, upstream in config.upstreams.items()
        for s in upstream.servers
        if s.secure and not s.verify
    ]


class BackendConnector:
    """
    Opens a connection to a backend server: ``connector(server, factory, timeout)`` fires with the
    factory's protocol once TCP (and, for ``wss://``, the TLS handshake) is done, all within
    ``timeout`` seconds.  TLS settings are built once per server spec; :meth:`forget` drops them
    so that CA bundles and client certificates are read again (on reload).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._tls: dict[ServerSpec, IOpenSSLClientConnectionCreator] = {}
        self._expiries: dict[ServerSpec, list[tuple[str, str, float]]] = {}

    def forget(self) -> None:
        self._tls.clear()
        self._expiries.clear()

    def tls_for(self, server: ServerSpec) -> IOpenSSLClientConnectionCreator:
        creator = self._tls.get(server)
        if creator is None:
            expiries = [
                (use, path, _not_after(_certificates(path)))
                for use, path in (("backend_ca", server.ca), ("backend_client", server.client_cert))
                if path is not None
            ]
            creator = self._tls[server] = client_tls(server)
            self._expiries[server] = expiries
        return creator

    def expiries(self, server: ServerSpec) -> list[tuple[str, str, float]]:
        """
        ``(use, file, notAfter)`` of the CA bundle and client certificate connections to the
        ``wss://`` ``server`` use (loaded now if no connection has loaded them yet; none when
        they do not load).
        """
        if not server.secure:
            return []
        try:
            self.tls_for(server)
        except Exception:  # noqa: BLE001  files gone: the next connection says why
            return []
        return self._expiries.get(server, [])

    def _endpoint(self, server: ServerSpec, timeout: float) -> Any:
        """
        TCP to the server: an IP address is connected to directly; a host name goes through
        HostnameEndpoint (resolution in a thread, then happy eyeballs), which for an address
        would still ask getaddrinfo in a thread: a sixth of a handshake's CPU.
        """
        host = server.host
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, server.port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, server.port, timeout=timeout)
        return HostnameEndpoint(self._reactor, host, server.port, timeout=timeout)

    def __call__(self, server: ServerSpec, factory: Any, timeout: float) -> Deferred:
        endpoint = self._endpoint(server, timeout)
        if not server.secure:
            return endpoint.connect(factory)
        try:
            creator = self.tls_for(server)
        except Exception as e:  # files gone or changed since the config was checked
            return fail(TLSHandshakeError(f"TLS settings for {server.url} failed to load: {e}"))
        tls_endpoint: Any = wrapClientTLS(creator, endpoint)
        wait = _HandshakeWaitFactory(factory, server.host, server.port, server.verify)
        d = tls_endpoint.connect(wait)
        d.addCallback(lambda wait: wait.ready)
        d.addTimeout(timeout, self._reactor)  # type: ignore[arg-type]
        return d


def certificate_rows(
    listeners: Mapping[str, ServerTLS], connector: BackendConnector, config: Config
) -> list[dict[str, Any]]:
    """
    Every certificate the gate uses, for ``wsgate_certificate_expiration_timestamp_seconds``:
    each TLS listener's (by endpoint and SNI name, as loaded at start or the last reload) and
    each ``wss://`` server's CA bundle and client certificate (``sni``: the name sent).
    """
    rows = [
        {"use": "listener", "endpoint": endpoint, "sni": name, "file": path, "not_after": when}
        for endpoint, tls in listeners.items()
        for name, path, when in tls.expiries
    ]
    seen = set()
    for upstream in config.upstreams.values():
        for spec in upstream.servers:
            for use, path, when in connector.expiries(spec):
                row = {"use": use, "endpoint": spec.url, "sni": spec.host, "file": path}
                key = tuple(row.values())
                if key not in seen:
                    seen.add(key)
                    rows.append({**row, "not_after": when})
    return rows


def tls_facts(transport: Any) -> tuple[str | None, str | None]:
    """
    A client connection's TLS version (``TLSv1.3``) and the SNI name it asked for, for the access
    log; (None, None) on plain TCP.  Read once the request has arrived, so after the handshake.
    """
    if not ISSLTransport.providedBy(transport):
        return None, None
    connection = transport.getHandle()
    name = connection.get_servername()
    return connection.get_protocol_version_name(), (
        name.decode("ascii", "replace") if name else None
    )

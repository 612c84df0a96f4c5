"""
TLS in memory: config checks of certificates and keys, the front door's SNI, versions and ALPN over
``TLSMemoryBIOFactory``, and the service tree; certificates made at test time
(``tests/certs.py``).  The real peers (Python's ``ssl`` and ``websockets`` clients, ``openssl
s_client``, the gate under ``twistd``, a wss:// backend) are in ``tests/e2e/test_tls.py``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from tests import procs
from tests.helpers import Certs, write_config
from wsgate import config as configmod
from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.net.tls import (
    HTTPSRedirect,
    ServerTLS,
    TLSLoadError,
    _certificates,
    tls_server_factory,
)
from wsgate.service import Options, makeService

# -- helpers -------------------------------------------------------------------------------------


# -- config --------------------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certs(self.dir)
        self.source = os.path.join(self.dir, "gate.toml")

    def parse(self, listen: dict[str, Any], server: dict[str, Any] | None = None) -> Any:
        data = {
            "listen": [listen],
            "route": [{"path": "/", "upstream": "u"}],
            "upstream": {"u": {"servers": [server or {"url": "ws://127.0.0.1:9"}]}},
        }
        return configmod.parse(data, self.source)

    def problems(self, listen: dict[str, Any], server: dict[str, Any] | None = None) -> str:
        e = self.assertRaises(configmod.ConfigError, self.parse, listen, server)
        return str(e)

    def test_tls_listener(self) -> None:
        """tls = {cert, key, min_version, sni} parses; relative paths are from the file's dir."""
        self.certs.server("a", "a.test")
        self.certs.server("w", "*.w.test")
        c = self.parse(
            {
                "endpoint": "tcp:0",
                "tls": {
                    "cert": "a.pem",
                    "key": "a.key",
                    "min_version": "1.3",
                    "sni": {
                        "A.test": {"cert": "a.pem", "key": "a.key"},
                        "*.w.test": {"cert": "w.pem", "key": "w.key"},
                    },
                },
            }
        )
        tls = c.listeners[0].tls
        self.assertEqual(tls.default.cert, os.path.abspath(os.path.join(self.dir, "a.pem")))
        self.assertEqual(tls.min_version, "1.3")
        self.assertEqual(sorted(tls.sni), ["*.w.test", "a.test"])

    def test_ciphers(self) -> None:
        """tls.ciphers defaults to forward-secret AEAD suites; a custom OpenSSL string is kept;
        one that selects no suite is refused with its key path."""
        self.certs.server("a", "a.test")
        tls = (
            self.parse({"endpoint": "tcp:0", "tls": {"cert": "a.pem", "key": "a.key"}})
            .listeners[0]
            .tls
        )
        self.assertEqual(tls.ciphers, configmod.DEFAULT_CIPHERS)
        custom = "ECDHE+AESGCM"
        tls = (
            self.parse(
                {"endpoint": "tcp:0", "tls": {"cert": "a.pem", "key": "a.key", "ciphers": custom}}
            )
            .listeners[0]
            .tls
        )
        self.assertEqual(tls.ciphers, custom)
        for bad in ("NOSUCHCIPHER", "", 3):
            text = self.problems(
                {"endpoint": "tcp:0", "tls": {"cert": "a.pem", "key": "a.key", "ciphers": bad}}
            )
            self.assertIn("listen[0].tls.ciphers: ", text)

    def test_certificate_problems(self) -> None:
        """Missing files, a key of another certificate and an expired certificate are reported
        with the config file, key path, certificate file and reason, all at once."""
        a = self.certs.server("a", "a.test")
        b = self.certs.server("b", "b.test")
        old = self.certs.server("old", "old.test", expired=True)
        text = self.problems(
            {
                "endpoint": "tcp:0",
                "tls": {
                    "cert": a["cert"],
                    "key": b["key"],
                    "sni": {
                        "old.test": old,
                        "gone.test": {"cert": "gone.pem", "key": a["key"]},
                        "bad name": a,
                    },
                },
            }
        )
        self.assertIn(
            f"{self.source}: listen[0].tls.key: {b['key']}: private key does not match the "
            f"certificate {a['cert']}",
            text,
        )
        self.assertIn(
            f"{self.source}: listen[0].tls.sni.old.test.cert: {old['cert']}: certificate expired on",
            text,
        )
        gone = os.path.abspath(os.path.join(self.dir, "gone.pem"))
        self.assertIn(
            f"{self.source}: listen[0].tls.sni.gone.test.cert: {gone}: No such file", text
        )
        self.assertIn("listen[0].tls.sni.bad name: not a host name", text)

    def test_not_pem(self) -> None:
        """A file that is not PEM is named."""
        a = self.certs.server("a", "a.test")
        text = self.problems(
            {"endpoint": "tcp:0", "tls": {"cert": a["key"], "key": a["cert"], "min_version": "1.1"}}
        )
        self.assertIn(f"listen[0].tls.cert: {a['key']}: no PEM certificate", text)
        self.assertIn(f"listen[0].tls.key: {a['cert']}: not an unencrypted PEM private key", text)
        self.assertIn("listen[0].tls.min_version: '1.1' is not one of 1.2, 1.3", text)

    def test_backend_tls_keys(self) -> None:
        """ca, verify and client_cert/client_key on a wss:// server; checked like the others."""
        client = self.certs.client()
        c = self.parse(
            {"endpoint": "tcp:0"},
            {"url": "wss://b.test:443", "ca": self.certs.ca_file, **client},
        )
        server = c.upstreams["u"].servers[0]
        self.assertEqual((server.ca, server.verify), (self.certs.ca_file, True))
        self.assertEqual(server.client_cert, client["client_cert"])
        unverified = self.parse({"endpoint": "tcp:0"}, {"url": "wss://b.test", "verify": False})
        self.assertFalse(unverified.upstreams["u"].servers[0].verify)

    def test_backend_tls_problems(self) -> None:
        """TLS keys on ws://, a half client pair, ca with verify = false, a bad bundle."""
        client = self.certs.client()
        text = self.problems(
            {"endpoint": "tcp:0"}, {"url": "ws://b.test", "ca": self.certs.ca_file}
        )
        self.assertIn("upstream.u.servers[0].ca: only for wss:// servers", text)
        text = self.problems(
            {"endpoint": "tcp:0"}, {"url": "wss://b.test", "client_cert": client["client_cert"]}
        )
        self.assertIn(
            "upstream.u.servers[0].client_key: client_cert and client_key go together", text
        )
        text = self.problems(
            {"endpoint": "tcp:0"},
            {"url": "wss://b.test", "ca": self.certs.ca_file, "verify": False},
        )
        self.assertIn("servers[0].ca: a ca bundle is pointless with verify = false", text)
        text = self.problems(
            {"endpoint": "tcp:0"}, {"url": "wss://b.test", "ca": client["client_key"]}
        )
        self.assertIn(f"servers[0].ca: {client['client_key']}: no PEM certificate", text)

    def test_example(self) -> None:
        """etc/wsgate-tls.toml: a TLS listener with SNI, a redirect and a verified mTLS backend."""
        c = configmod.load(str(procs.REPO / "etc" / "wsgate-tls.toml"))
        self.assertIsNotNone(c.listeners[0].tls)
        self.assertEqual(c.redirects[0].https_port, 8443)
        server = c.upstreams["secure"].servers[0]
        self.assertTrue(server.verify and server.ca and server.client_cert)


# -- in memory -----------------------------------------------------------------------------------


class _Recorder(Protocol):
    def connectionMade(self) -> None:
        self.factory.transports.append(self.transport)


class InMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certs(self.dir)

    def spec(self, **sni: dict[str, str]) -> configmod.ListenerTLS:
        default = self.certs.server("default", "default.test")
        return configmod.ListenerTLS(
            default=configmod.CertificateFiles(**default),
            sni={name: configmod.CertificateFiles(**files) for name, files in sni.items()},
        )

    def connect(self, server_tls: ServerTLS, name: str) -> tuple[Any, Any]:
        """An in-memory TLS client (verifying ``name``) against ``server_tls``: returns the
        client's TLS transport and the server-side transport the application saw."""
        server_factory: Any = Factory.forProtocol(_Recorder)
        server_factory.transports = []
        client_factory: Any = Factory.forProtocol(Protocol)
        trust = trustRootFromCertificates(_certificates(self.certs.ca_file))
        client_tls = TLSMemoryBIOFactory(
            optionsForClientTLS(name, trustRoot=trust), True, client_factory
        )
        client, _, pump = iosim.connectedServerAndClient(
            lambda: tls_server_factory(server_tls, server_factory).buildProtocol(None),
            lambda: client_tls.buildProtocol(None),
            greet=False,
        )
        pump.flush()
        return client, server_factory.transports[0]

    def test_sni_exact_wildcard_default(self) -> None:
        """The certificate follows the SNI name: exact, then *.parent, else the default."""
        server_tls = ServerTLS(
            self.spec(
                **{
                    "a.test": self.certs.server("a", "a.test"),
                    "*.w.test": self.certs.server("w", "*.w.test"),
                }
            )
        )
        for name, cn in [
            ("a.test", "a.test"),
            ("x.w.test", "*.w.test"),
            ("default.test", "default.test"),
        ]:
            client, _ = self.connect(server_tls, name)
            cert = client.getPeerCertificate()
            self.assertIsNotNone(cert, name)
            self.assertEqual(cert.get_subject().CN, cn)
            self.assertEqual(client.negotiatedProtocol, None)  # the client offered no ALPN

    def test_default_ciphers(self) -> None:
        """The listener's context offers, for TLS 1.2, only ECDHE/DHE key exchange with AES-GCM or
        ChaCha20-Poly1305 (no static RSA, no CBC, no SHA-1 MAC); TLS 1.3 suites stay."""
        context = ServerTLS(self.spec())._default.getContext()
        offered = SSL.Connection(context, None).get_cipher_list()
        tls12 = [c for c in offered if not c.startswith("TLS_")]
        self.assertTrue(tls12)
        for cipher in tls12:
            self.assertRegex(cipher, r"^(ECDHE|DHE)-(RSA|ECDSA)-")
            self.assertRegex(cipher, r"(-GCM-SHA(256|384)|-CHACHA20-POLY1305)$")
        self.assertIn("ECDHE-RSA-AES128-GCM-SHA256", tls12)
        self.assertNotIn("AES128-SHA", offered)
        self.assertIn("TLS_AES_128_GCM_SHA256", offered)

    def test_custom_ciphers(self) -> None:
        """tls.ciphers replaces the TLS 1.2 suites."""
        spec = dataclasses.replace(self.spec(), ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
        context = ServerTLS(spec)._default.getContext()
        offered = SSL.Connection(context, None).get_cipher_list()
        self.assertEqual([c for c in offered if not c.startswith("TLS_")], [spec.ciphers])

    def test_server_transport_is_ssl(self) -> None:
        """Sessions see ISSLTransport on a TLS listener (so X-Forwarded-Proto is https)."""
        _, server_transport = self.connect(ServerTLS(self.spec()), "default.test")
        self.assertTrue(ISSLTransport.providedBy(server_transport))

    def test_reload_keeps_old_on_failure(self) -> None:
        """A reload that fails names the file and reason and keeps serving the old certificate;
        a good one serves the new certificate to new connections."""
        server_tls = ServerTLS(self.spec())
        bad = configmod.ListenerTLS(
            default=configmod.CertificateFiles(
                cert=str(self.dir) + "/default.pem", key=str(self.dir) + "/missing.key"
            )
        )
        e = self.assertRaises(TLSLoadError, server_tls.reload, bad)
        self.assertIn("missing.key: No such file or directory", str(e))
        client, _ = self.connect(server_tls, "default.test")
        self.assertEqual(client.getPeerCertificate().get_subject().CN, "default.test")
        new = self.certs.server("new", "default.test", "new.test")
        server_tls.reload(configmod.ListenerTLS(default=configmod.CertificateFiles(**new)))
        client, _ = self.connect(server_tls, "new.test")
        self.assertEqual(client.getPeerCertificate().digest("sha256"), _digest(new["cert"]))

    def test_redirect(self) -> None:
        """The redirect answers 301 to https with host, path and query (port unless 443)."""
        for https_port, location in [
            (443, b"https://gate.test/a/b?c=1"),
            (8443, b"https://gate.test:8443/a/b?c=1"),
        ]:
            request = DummyRequest([b"a", b"b"])
            request.uri = b"/a/b?c=1"
            request.requestHeaders.setRawHeaders(b"host", [b"gate.test:80"])
            request.getRequestHostname = lambda: b"gate.test"  # type: ignore[method-assign]
            HTTPSRedirect(https_port).render(request)
            self.assertEqual(request.responseCode, 301)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"location"), [location])


def _digest(path: str) -> bytes:
    from OpenSSL import crypto

    return crypto.load_certificate(crypto.FILETYPE_PEM, Path(path).read_bytes()).digest("sha256")


class MakeServiceTests(SynchronousTestCase):
    def test_tls_tree(self) -> None:
        """A TLS listener is an endpoint service with the client-leg factory wrapped in TLS;
        a redirect is a web Site; verify = false adds a start-time warning."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certs(d)
        tls = certs.server("gate", "localhost")
        path = write_config(
            os.path.join(d, "gate.toml"),
            [{"endpoint": "tcp:0", "tls": tls}],
            [{"url": "wss://localhost:1", "verify": False}],
            [{"endpoint": "tcp:0"}],
        )
        options = Options()
        options.parseOptions(["--config", path])
        top = makeService(options, MemoryReactorClock())
        listeners = [s for s in top if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        self.assertIsInstance(listeners[0].factory, TLSMemoryBIOFactory)
        self.assertIsInstance(listeners[0].factory.wrappedFactory, ClientLegFactory)
        self.assertIsInstance(listeners[1].factory, Site)
        self.assertIn("_UnverifiedWarning", [type(s).__name__ for s in top])


# -- real peers ----------------------------------------------------------------------------------

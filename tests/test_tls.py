"""
TLS: config checks of certificates and keys, the front door (SNI, versions, ALPN, reload, the
http->https redirect, port 443 with --uid) and verified wss:// to backends (wrong host, untrusted,
mutual TLS), with certificates made at test time (``tests/certs.py``).

In-memory where the behaviour is ours alone; real peers where the issue names them: Python's
``ssl`` and ``websockets`` clients, ``openssl s_client``, the gate under ``twistd`` and a
``websockets`` wss:// backend in a subprocess, all on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
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
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests import procs
from tests.certs import CA
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

LOOPBACK = procs.LOOPBACK

# A wss:// echo backend: answers "headers" with the upgrade request's headers as JSON and any other
# text with "echo: <text>".  argv: PORT CERT KEY [CLIENT_CA] (with CLIENT_CA: mutual TLS required).
BACKEND = r"""
import asyncio, json, ssl, sys
from websockets.asyncio.server import serve
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
if len(sys.argv) > 4:
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(sys.argv[4])
async def handler(ws):
    async for message in ws:
        if message == "headers":
            await ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
        else:
            await ws.send("echo: " + message)
async def main():
    async with serve(handler, "127.0.0.1", port, ssl=context):
        print("Server started", flush=True)
        await asyncio.sleep(120)
asyncio.run(main())
"""


# -- helpers -------------------------------------------------------------------------------------


class Certs:
    """A CA and certificate files in one directory."""

    def __init__(self, directory: str, ca: CA | None = None) -> None:
        self.dir = Path(directory)
        self.ca = ca or CA()
        self.ca_file = self.ca.write(self.dir, "ca")

    def server(self, stem: str, *names: str, **kwargs: Any) -> dict[str, str]:
        cert, key = self.ca.issue(*names, **kwargs).write(self.dir, stem)
        return {"cert": cert, "key": key}

    def client(self, stem: str = "client") -> dict[str, str]:
        cert, key = self.ca.issue("gate client", client=True).write(self.dir, stem)
        return {"client_cert": cert, "client_key": key}


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def write_config(
    path: str,
    listen: list[dict[str, Any]],
    servers: list[dict[str, Any]] | None = None,
    redirects: list[dict[str, Any]] | None = None,
) -> str:
    lines = []
    for item in listen:
        lines += ["[[listen]]"] + [f"{k} = {_toml(v)}" for k, v in item.items()]
    for item in redirects or []:
        lines += ["[[redirect]]"] + [f"{k} = {_toml(v)}" for k, v in item.items()]
    lines += ["[[route]]", 'path = "/"', 'upstream = "b"', "[upstream.b]", "tries = 1"]
    lines.append(f"servers = {_toml(servers or [{'url': 'ws://127.0.0.1:9'}])}")
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def start_backend(case: Any, port: int, cert: str, key: str, client_ca: str | None = None) -> Any:
    argv = [sys.executable, "-c", BACKEND, str(port), cert, key]
    if client_ca:
        argv.append(client_ca)
    process = procs.start_process(case, argv, ready_port=port)
    process.wait_for_output("Server started")
    return process


def handshake(
    port: int,
    server_name: str | None,
    ca: str,
    alpn: list[str] | None = None,
) -> tuple[ssl.SSLSocket, dict[str, Any]]:
    """A Python ``ssl`` client handshake; returns the socket (caller closes) and facts."""
    context = ssl.create_default_context(cafile=ca)
    if server_name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    tls = context.wrap_socket(sock, server_hostname=server_name)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    facts = {
        "cn": dict(x[0] for x in tls.getpeercert()["subject"])["commonName"],  # type: ignore[index]
        "der": der,
        "alpn": tls.selected_alpn_protocol(),
        "version": tls.version(),
    }
    return tls, facts


def served(port: int, server_name: str | None, ca: str) -> dict[str, Any]:
    tls, facts = handshake(port, server_name, ca)
    tls.close()
    return facts


def s_client(port: int, *args: str) -> str:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout + result.stderr


def ws_client(port: int, ca: str, path: str = "/") -> ClientConnection:
    context = ssl.create_default_context(cafile=ca)
    return connect(
        f"wss://{LOOPBACK}:{port}{path}",
        ssl=context,
        server_hostname="localhost",
        # Above the gate's own backend connect timeout (5 s): the gate answers 502/504 first.
        open_timeout=15,
        close_timeout=2,
        proxy=None,
    )


def pem_der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


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


class FrontDoorTests(SynchronousTestCase):
    """The gate under twistd with a TLS listener, probed by Python ssl and openssl s_client."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certs(self.dir)
        self.port, self.redirect_port = procs.free_ports(2)

    def start(self, min_version: str = "1.2", rsa: bool = False) -> procs.Process:
        tls = {
            **self.certs.server("default", "localhost", rsa=rsa),
            "min_version": min_version,
            "sni": {
                "a.test": self.certs.server("a", "a.test"),
                "*.w.test": self.certs.server("w", "*.w.test"),
            },
        }
        path = write_config(
            os.path.join(self.dir, "gate.toml"),
            [{"endpoint": f"tcp:{self.port}:interface={LOOPBACK}", "tls": tls}],
            redirects=[
                {
                    "endpoint": f"tcp:{self.redirect_port}:interface={LOOPBACK}",
                    "https_port": self.port,
                }
            ],
        )
        return procs.start_configured_gate(self, path, self.port)

    def test_python_ssl(self) -> None:
        """Python's ssl client: the handshake verifies with the CA; SNI picks exact and wildcard
        certificates, no SNI gets the default; ALPN is http/1.1 even when h2 is offered."""
        self.start()
        self.assertEqual(served(self.port, "a.test", self.certs.ca_file)["cn"], "a.test")
        self.assertEqual(served(self.port, "x.w.test", self.certs.ca_file)["cn"], "*.w.test")
        self.assertEqual(served(self.port, None, self.certs.ca_file)["cn"], "localhost")
        self.assertEqual(served(self.port, "localhost", self.certs.ca_file)["cn"], "localhost")
        tls, facts = handshake(self.port, "localhost", self.certs.ca_file, ["h2", "http/1.1"])
        tls.close()
        self.assertEqual(facts["alpn"], "http/1.1")
        self.assertIn(facts["version"], ("TLSv1.2", "TLSv1.3"))

    def test_openssl_s_client(self) -> None:
        """openssl s_client: verified handshake, SNI, ALPN http/1.1; TLS 1.0 and 1.1 refused by
        the gate (a protocol_version alert)."""
        self.start()
        out = s_client(
            self.port,
            "-servername",
            "a.test",
            "-CAfile",
            self.certs.ca_file,
            "-alpn",
            "h2,http/1.1",
            "-verify_return_error",
        )
        self.assertIn("Verify return code: 0 (ok)", out)
        self.assertIn("subject=CN = a.test", out)
        self.assertIn("ALPN protocol: http/1.1", out)
        for old in ("-tls1", "-tls1_1"):
            out = s_client(self.port, old, "-cipher", "DEFAULT@SECLEVEL=0")
            self.assertIn("alert protocol version", out, old)
            self.assertIn("no peer certificate available", out, old)

    def test_openssl_ciphers(self) -> None:
        """With an RSA certificate, TLS 1.2 with static-RSA key exchange and CBC (AES128-SHA) is
        refused; ECDHE-RSA-AES128-GCM-SHA256 is served."""
        self.start(rsa=True)
        out = s_client(self.port, "-tls1_2", "-cipher", "AES128-SHA")
        self.assertIn("no peer certificate available", out)
        self.assertRegex(out, r"handshake failure|no shared cipher")
        out = s_client(
            self.port,
            "-tls1_2",
            "-cipher",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "-CAfile",
            self.certs.ca_file,
        )
        self.assertIn("Cipher is ECDHE-RSA-AES128-GCM-SHA256", out)
        self.assertIn("Verify return code: 0 (ok)", out)

    def test_min_version_13(self) -> None:
        """min_version = "1.3" refuses TLS 1.2."""
        self.start("1.3")
        self.assertIn("alert protocol version", s_client(self.port, "-tls1_2"))
        self.assertIn("TLSv1.3", s_client(self.port, "-tls1_3", "-CAfile", self.certs.ca_file))

    def test_redirect(self) -> None:
        """The plain-HTTP listener answers 301 to the same URL over https."""
        self.start()
        procs.wait_for_port(LOOPBACK, self.redirect_port, 10)
        with socket.create_connection((LOOPBACK, self.redirect_port), timeout=5) as sock:
            sock.sendall(
                b"GET /chat?room=1 HTTP/1.1\r\nHost: gate.test\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            for _ in range(100):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.1 301 "), answer)
        self.assertIn(f"Location: https://gate.test:{self.port}/chat?room=1".encode(), answer)


class BackendTLSTests(SynchronousTestCase):
    """wss:// client -> gate (twistd) -> wss:// backend (websockets server)."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certs(self.dir)
        self.port, self.backend_port = procs.free_ports(2)

    def gate(self, **server: Any) -> procs.Process:
        path = write_config(
            os.path.join(self.dir, "gate.toml"),
            [
                {
                    "endpoint": f"tcp:{self.port}:interface={LOOPBACK}",
                    "tls": self.certs.server("gate", "localhost"),
                }
            ],
            [{"url": f"wss://localhost:{self.backend_port}", **server}],
        )
        return procs.start_configured_gate(self, path, self.port)

    def backend(self, certs: Certs, *names: str, client_ca: str | None = None) -> None:
        files = certs.server("backend", *names)
        start_backend(self, self.backend_port, files["cert"], files["key"], client_ca)

    def refused(self) -> str:
        e = self.assertRaises(InvalidStatus, ws_client, self.port, self.certs.ca_file)
        self.assertEqual(e.response.status_code, 502)
        return e.response.body.decode()

    def test_end_to_end(self) -> None:
        """A wss:// session through the gate to a verified wss:// backend; the backend sees
        X-Forwarded-Proto: https."""
        self.backend(self.certs, "localhost")
        self.gate(ca=self.certs.ca_file)
        with ws_client(self.port, self.certs.ca_file) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=5), "echo: hello")
            ws.send("headers")
            headers = json.loads(ws.recv(timeout=5))
        self.assertEqual(headers["x-forwarded-proto"], "https")

    def test_wrong_host(self) -> None:
        """A backend certificate for another name: 502, and the log says why."""
        self.backend(self.certs, "other.test")
        gate = self.gate(ca=self.certs.ca_file)
        body = self.refused()
        self.assertNotIn("localhost", body)
        gate.wait_for_output("session_refused")
        self.assertIn(
            f"TLS handshake with localhost:{self.backend_port} failed: certificate does not match",
            gate.stdout(),
        )

    def test_name_service_identity_cannot_parse(self) -> None:
        """A trusted certificate for another name plus a pattern service_identity refuses to parse
        (``*.localhost``): refused, not accepted as Twisted 26.10's own check would (fail open)."""
        self.backend(self.certs, "evil.test", "*.localhost")
        gate = self.gate(ca=self.certs.ca_file)
        self.refused()
        gate.wait_for_output("session_refused")
        self.assertIn(
            f"TLS handshake with localhost:{self.backend_port} failed: certificate does not match",
            gate.stdout(),
        )

    def test_untrusted(self) -> None:
        """A backend certificate from a CA the gate does not trust (the system trust store when
        no ca is given): 502, and the log says 'certificate verify failed'."""
        self.backend(Certs(os.path.join(self.dir, "other"), CA("other CA")), "localhost")
        gate = self.gate()
        self.assertNotIn("certificate", self.refused())
        gate.wait_for_output("session_refused")
        self.assertIn("certificate verify failed", gate.stdout())

    def test_mutual_tls(self) -> None:
        """A backend that requires a client certificate accepts the configured one."""
        self.backend(self.certs, "localhost", client_ca=self.certs.ca_file)
        self.gate(ca=self.certs.ca_file, **self.certs.client())
        with ws_client(self.port, self.certs.ca_file) as ws:
            ws.send("mtls")
            self.assertEqual(ws.recv(timeout=5), "echo: mtls")

    def test_mutual_tls_missing(self) -> None:
        """Without a client certificate such a backend refuses: 502."""
        self.backend(self.certs, "localhost", client_ca=self.certs.ca_file)
        self.gate(ca=self.certs.ca_file)
        self.refused()

    def test_unverified_warns(self) -> None:
        """verify = false connects to an untrusted backend and warns at start."""
        self.backend(Certs(os.path.join(self.dir, "other"), CA("other CA")), "other.test")
        gate = self.gate(verify=False)
        self.assertIn("verify = false", gate.wait_for_output("tls_unverified"))
        with ws_client(self.port, self.certs.ca_file) as ws:
            ws.send("x")
            self.assertEqual(ws.recv(timeout=5), "echo: x")


class ReloadTests(SynchronousTestCase):
    def test_sighup(self) -> None:
        """SIGHUP swaps the certificate for new connections while a live session keeps
        exchanging messages; a reload with a bad key is logged and keeps the current one."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certs(d)
        port, backend_port = procs.free_ports(2)
        backend = certs.server("backend", "localhost")
        start_backend(self, backend_port, backend["cert"], backend["key"])
        first = certs.server("gate", "localhost")
        path = write_config(
            os.path.join(d, "gate.toml"),
            [{"endpoint": f"tcp:{port}:interface={LOOPBACK}", "tls": first}],
            [{"url": f"wss://localhost:{backend_port}", "ca": certs.ca_file}],
        )
        gate = procs.start_configured_gate(self, path, port)
        old_der = pem_der(first["cert"])
        self.assertEqual(served(port, "localhost", certs.ca_file)["der"], old_der)
        with ws_client(port, certs.ca_file) as ws:
            ws.send("before")
            self.assertEqual(ws.recv(timeout=5), "echo: before")
            certs.server("gate", "localhost")  # new certificate and key, same files
            new_der = pem_der(first["cert"])
            os.kill(gate.pid, signal.SIGHUP)
            gate.wait_for_output("tls_reloaded")
            self.assertEqual(served(port, "localhost", certs.ca_file)["der"], new_der)
            ws.send("after")
            self.assertEqual(ws.recv(timeout=5), "echo: after")
            # A key that does not match: the reload fails, the new certificate stays.
            Path(first["key"]).write_bytes(Path(backend["key"]).read_bytes())
            os.kill(gate.pid, signal.SIGHUP)
            out = gate.wait_for_output("config_reload_refused: the running config stays")
            self.assertIn(f"{first['key']}: private key does not match the certificate", out)
            self.assertEqual(served(port, "localhost", certs.ca_file)["der"], new_der)
            ws.send("still")
            self.assertEqual(ws.recv(timeout=5), "echo: still")


class PrivilegedPortTests(SynchronousTestCase):
    def test_bind_then_drop_root(self) -> None:
        """As root, twistd binds a port below 1024 in privilegedStartService, then --uid/--gid
        drop root: the gate accepts TLS and runs as uid 65534."""
        if os.getuid() != 0:
            self.skipTest("needs root (binding a port below 1024, then dropping privileges)")
        port = _free_privileged_port()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        os.chmod(d, 0o755)
        certs = Certs(d)
        path = write_config(
            os.path.join(d, "gate.toml"),
            [
                {
                    "endpoint": f"tcp:{port}:interface={LOOPBACK}",
                    "tls": certs.server("gate", "localhost"),
                }
            ],
        )
        gate = procs.start_configured_gate(self, path, port, "--uid=65534", "--gid=65534")
        self.assertEqual(served(port, "localhost", certs.ca_file)["cn"], "localhost")
        status = Path(f"/proc/{gate.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        self.assertEqual(uid_line.split()[1:], ["65534"] * 4)


def _free_privileged_port() -> int:
    for port in (443, 444, 853, 992, 994, 1000, 1001):
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024 on 127.0.0.1")

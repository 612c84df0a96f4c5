"""
TLS end to end: the front door (SNI, versions, ALPN, reload, the http->https redirect, port 443
with --uid) and verified wss:// to backends (wrong host, untrusted, mutual TLS), with certificates
made at test time (``tests/certs.py``) and real peers: Python's ``ssl`` and ``websockets``
clients, ``openssl s_client``, the gate under ``twistd`` and a ``websockets`` wss:// backend in a
subprocess, all on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import InvalidStatus

from tests import procs
from tests.certs import CA
from tests.e2e.helpers import start_wss_backend, wss_client
from tests.helpers import Certs, write_config

LOOPBACK = procs.LOOPBACK


# -- helpers -------------------------------------------------------------------------------------


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


def pem_der(path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(path).read_text())


# -- config --------------------------------------------------------------------------------------


# -- in memory -----------------------------------------------------------------------------------


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

    def test_failed_handshakes_are_a_warning_with_the_client(self) -> None:
        """A client refused at the TLS handshake (an old protocol, plain HTTP on the TLS port) is
        one warning naming its address and port, not an error line without them."""
        gate = self.start("1.3")
        s_client(self.port, "-tls1_2")
        with socket.create_connection((LOOPBACK, self.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.settimeout(5)
            while sock.recv(4096):
                pass
        deadline = time.monotonic() + 5
        while gate.stdout().count("tls_handshake_failed") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out = gate.stdout()
        lines = [line for line in out.splitlines() if "tls_handshake_failed" in line]
        self.assertEqual(len(lines), 2, out)
        for line in lines:
            self.assertIn("#warn] tls_handshake_failed client=127.0.0.1 client_port=", line)
        self.assertNotIn("#error]", out)

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
        start_wss_backend(self, self.backend_port, files["cert"], files["key"], client_ca)

    def refused(self) -> str:
        e = self.assertRaises(InvalidStatus, wss_client, self.port, self.certs.ca_file)
        self.assertEqual(e.response.status_code, 502)
        return e.response.body.decode()

    def test_end_to_end(self) -> None:
        """A wss:// session through the gate to a verified wss:// backend; the backend sees
        X-Forwarded-Proto: https."""
        self.backend(self.certs, "localhost")
        gate = self.gate(ca=self.certs.ca_file)
        with wss_client(self.port, self.certs.ca_file) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=5), "echo: hello")
            ws.send("headers")
            headers = json.loads(ws.recv(timeout=5))
        self.assertEqual(headers["x-forwarded-proto"], "https")
        # The access line says which TLS version and server name the client used.
        line = gate.wait_for_output("session_closed")
        self.assertRegex(line, r"session_closed .* tls=true tls_version=TLSv1\.3 sni=localhost ")

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
        with wss_client(self.port, self.certs.ca_file) as ws:
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
        with wss_client(self.port, self.certs.ca_file) as ws:
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
        start_wss_backend(self, backend_port, backend["cert"], backend["key"])
        first = certs.server("gate", "localhost")
        path = write_config(
            os.path.join(d, "gate.toml"),
            [{"endpoint": f"tcp:{port}:interface={LOOPBACK}", "tls": first}],
            [{"url": f"wss://localhost:{backend_port}", "ca": certs.ca_file}],
        )
        gate = procs.start_configured_gate(self, path, port)
        old_der = pem_der(first["cert"])
        self.assertEqual(served(port, "localhost", certs.ca_file)["der"], old_der)
        with wss_client(port, certs.ca_file) as ws:
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

"""
Authentication over real loopback: a gate process (twistd), the ``websockets`` library as the
client, and ``tests/fixtures/auth_peers.py`` as the auth service (``http.server``), the JWKS URL
and the backend (``websockets``, which reports the handshake it got).

- JWT from a JWKS URL (fetched with Twisted's HTTP client): a token that expires in 2 s opens a
  session whose backend got ``X-Auth-Sub`` and no token, then the client is closed 1008
  "credential expired" 2 s later; no token gets 401 with a Bearer challenge.
- Forward auth: allowed with the chosen answer headers copied (and no others), 401 with the
  service's challenge, 403, a hanging service -> 503 after ``timeout``, 500 -> 503, and the
  answer cache (a second handshake with the same credential does not reach the service).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.procs import LOOPBACK, REPO, free_ports, start_configured_gate, start_process

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> bytes:
    item = jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    item["kid"] = "e2e"
    return json.dumps({"keys": [item]}).encode()


class AuthGateTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-auth-"))
        (self.dir / "jwks.json").write_bytes(_jwks())
        self.auth_port, ws_port, self.port = free_ports(3)
        peers = start_process(
            self,
            [
                sys.executable,
                str(REPO / "tests" / "fixtures" / "auth_peers.py"),
                str(self.auth_port),
                str(ws_port),
                str(self.dir / "jwks.json"),
            ],
            ready_port=ws_port,
        )
        peers.wait_for_output("ready")
        service = f"http://{LOOPBACK}:{self.auth_port}"
        (self.dir / "wsgate.toml").write_text(
            f'[[listen]]\nendpoint = "tcp:{self.port}:interface={LOOPBACK}"\n\n'
            '[[route]]\npath = "/jwt"\nupstream = "u"\n'
            "[route.auth]\n"
            f'type = "jwt"\njwks_url = "{service}/jwks.json"\nforward_token = false\n\n'
            '[[route]]\npath = "/fwd"\nupstream = "u"\n'
            "[route.auth]\n"
            f'type = "forward"\nurl = "{service}/auth"\ntimeout = "500ms"\ncache = "30s"\n'
            'copy_headers = ["X-User", "X-Scopes"]\n\n'
            f'[upstream.u]\nservers = [{{ url = "ws://{LOOPBACK}:{ws_port}" }}]\n'
        )
        self.gate = start_configured_gate(self, self.dir / "wsgate.toml", self.port)

    def ws(self, path: str, authorization: str | None = None) -> Any:
        headers = {"Authorization": authorization} if authorization else {}
        return connect(
            f"ws://{LOOPBACK}:{self.port}{path}", additional_headers=headers, open_timeout=5
        )

    def refused(self, path: str, authorization: str | None = None) -> Any:
        with self.assertRaises(InvalidStatus) as caught:
            self.ws(path, authorization)
        return caught.exception.response

    def auth_requests(self) -> int:
        url = f"http://{LOOPBACK}:{self.auth_port}/count"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.read())

    def test_jwt_session_closed_1008_at_exp(self) -> None:
        """A token expiring in 2 s: the session opens, the backend sees the subject and not the
        token, and the gate closes the client 1008 "credential expired" about 2 s later."""
        response = self.refused("/jwt")
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.headers["WWW-Authenticate"], 'Bearer realm="wsgate"')
        exp = int(time.time()) + 2
        tok = jwt.encode({"sub": "carol", "exp": exp}, KEY, "RS256", headers={"kid": "e2e"})
        with self.ws("/jwt", f"Bearer {tok}") as ws:
            handshake = json.loads(ws.recv(timeout=5))
            self.assertEqual(handshake["headers"]["x-auth-sub"], "carol")
            self.assertNotIn("authorization", handshake["headers"])
            with self.assertRaises(ConnectionClosed):
                ws.recv(timeout=5)
            closed = time.time()
        self.assertEqual((ws.close_code, ws.close_reason), (1008, "credential expired"))
        self.assertTrue(exp - 0.05 <= closed < exp + 1.5, (exp, closed))
        self.assertIn(
            'closed_by="gate (credential expired)"', self.gate.wait_for_output("credential expired")
        )

    def test_forward_auth(self) -> None:
        """Allow with copied headers, 401 with the service's challenge, 403, 503 for a hanging
        or failing service, and cached answers."""
        with self.ws("/fwd", "Bearer allow") as ws:
            headers = json.loads(ws.recv(timeout=5))["headers"]
        self.assertEqual((headers["x-user"], headers["x-scopes"]), ("alice", "chat"))
        self.assertNotIn("x-other", headers)
        before = self.auth_requests()
        with self.ws("/fwd", "Bearer allow") as ws:
            ws.recv(timeout=5)
        self.assertEqual(self.auth_requests(), before)  # the cached answer
        response = self.refused("/fwd", "Bearer wrong")
        self.assertEqual(response.status_code, 401)
        self.assertEqual(response.headers["WWW-Authenticate"], 'Bearer realm="svc"')
        self.assertEqual(self.refused("/fwd", "Bearer deny").status_code, 403)
        started = time.monotonic()
        self.assertEqual(self.refused("/fwd", "Bearer slow").status_code, 503)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(self.refused("/fwd", "Bearer boom").status_code, 503)
        out = self.gate.wait_for_output("auth service answered 500")
        self.assertIn("auth service timed out after 0.5s", out)
        self.assertNotIn("Bearer", out)

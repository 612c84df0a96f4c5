"""
Authentication in a gate, in memory: whole sessions through a gate on a ``task.Clock`` with
``[route.auth]``: 401 with ``WWW-Authenticate`` and its access-log line, claims forwarded and the
token stripped, key rotation in a JWKS file, the 1008 close at ``exp`` with its warning,
``max_session_age`` spread; the console's session detail; the ``[route.auth]`` keys refused.
The decisions themselves (tokens, claims, forward-auth answers) are in ``tests/core/test_auth.py``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import (
    RSA_KEY,
    RSA_KEY_2,
    A,
    BackendFactory,
    Network,
    jwk,
    jwks,
    make_config,
    token,
    upgrade_request,
)
from wsgate import config as configmod


class SessionAuthTests(SynchronousTestCase):
    """Whole sessions through an in-memory gate with [route.auth] type = "jwt"."""

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(
            lambda: [os.remove(os.path.join(directory, f)) for f in os.listdir(directory)]
        )
        self.keys_path = os.path.join(directory, "jwks.json")
        with open(self.keys_path, "wb") as f:
            f.write(jwks(jwk(RSA_KEY, "k1")))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def network(self, **auth: Any) -> tuple[Network, BackendFactory]:
        route: dict[str, Any] = {
            "auth": {"type": "jwt", "keys": self.keys_path, "issuer": "https://id.test"}
        }
        route["auth"].update(auth.pop("auth", {}))
        route.update(auth)
        backend = BackendFactory()
        net = Network(make_config([A], **route), {A: backend})
        net.clock.advance(500)
        return net, backend

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_format", "").startswith("session_refused")]

    def test_missing_token_401(self) -> None:
        """No credential: 401 with a Bearer challenge, logged with its reason; no backend."""
        net, backend = self.network()
        raw = net.raw(upgrade_request("/"))
        self.assertEqual(raw.status, 401)
        self.assertIn(b'WWW-Authenticate: Bearer realm="wsgate"\r\n', raw.data)
        self.assertEqual(backend.requests, [])
        self.assertEqual(
            [(e["status"], e["reason"]) for e in self.refusals()], [(401, "auth: no credential")]
        )

    def test_expired_token_401_never_logged(self) -> None:
        """An expired token: 401 invalid_token; neither the log nor the answer holds the token."""
        net, backend = self.network()
        tok = token(exp=400)
        raw = net.raw(upgrade_request("/?x=1", f"Authorization: Bearer {tok}\r\n"))
        self.assertEqual(raw.status, 401)
        self.assertIn(b'error="invalid_token", error_description="token expired"', raw.data)
        self.assertEqual(backend.requests, [])
        self.assertNotIn(tok, repr(self.events))
        self.assertNotIn(tok.encode(), raw.data)

    def test_valid_token_claims_forwarded_token_stripped(self) -> None:
        """A valid token: the backend gets X-Auth-Sub, the mapped claims, and no token when
        forward_token = false (header source) nor the query parameter."""
        net, backend = self.network(
            auth={
                "token": ["query:tok", "header"],
                "forward_token": False,
                "claim_headers": {"email": "X-Auth-Email"},
            }
        )
        client = net.client("/chat?room=1&tok=" + token(email="a@x.test"))
        self.assertTrue(client.opened)
        request = backend.requests[0]
        self.assertEqual(request.headers["x-auth-sub"], "alice")
        self.assertEqual(request.headers["x-auth-email"], "a@x.test")
        self.assertEqual(request.path, "/chat")
        self.assertEqual(request.params, {"room": ["1"]})
        client2 = net.client("/", headers={"Authorization": "Bearer " + token()})
        self.assertTrue(client2.opened)
        self.assertNotIn("authorization", backend.requests[1].headers)

    def test_token_forwarded_by_default(self) -> None:
        """forward_token = true (default): the backend gets the client's Authorization."""
        net, backend = self.network()
        tok = token()
        self.assertTrue(net.client("/", headers={"Authorization": f"Bearer {tok}"}).opened)
        self.assertEqual(backend.requests[0].headers["authorization"], f"Bearer {tok}")

    def test_key_rotation_in_jwks_file(self) -> None:
        """A new key added to the JWKS file is found by its kid; a removed one stops working."""
        net, _ = self.network()
        self.assertTrue(net.client("/", headers={"Authorization": "Bearer " + token()}).opened)
        new = token(RSA_KEY_2, kid="k2")
        self.assertFalse(net.client("/", headers={"Authorization": f"Bearer {new}"}).opened)
        with open(self.keys_path, "wb") as f:
            f.write(jwks(jwk(RSA_KEY_2, "k2")))
        os.utime(self.keys_path, ns=(1, 1))  # a new stamp even within the clock's resolution
        self.assertTrue(net.client("/", headers={"Authorization": f"Bearer {new}"}).opened)
        old = net.raw(upgrade_request("/", f"Authorization: Bearer {token()}\r\n"))
        self.assertEqual(old.status, 401)
        self.assertEqual(self.refusals()[-1]["reason"], "auth: unknown key id")

    def test_closed_1008_at_exp_with_warning(self) -> None:
        """A session closes 1008 "credential expired" when exp passes, after a warning text
        message expiry_warning before; the access log says why."""
        net, backend = self.network(auth={"expiry_warning": "10s"})
        client = net.client("/", headers={"Authorization": "Bearer " + token(exp=560)})
        self.assertTrue(client.opened)
        net.advance(49)
        self.assertEqual(client.received, [])
        net.advance(1)
        self.assertEqual(
            client.received, [(b'{"wsgate":"credential_expiring","exp":560,"in":10}', False)]
        )
        net.advance(9.9)
        self.assertIsNone(client.close)
        net.advance(0.1)
        self.assertEqual(client.close, (1008, "credential expired"))
        self.assertEqual(backend.closes, [(1001, "credential expired")])
        closed = [e for e in self.events if e.get("log_format", "").startswith("session_closed")]
        self.assertEqual(closed[0]["closed_by"], "gate (credential expired)")

    def test_max_session_age_spread(self) -> None:
        """max_session_age closes 1001 within [age, age + spread); timers go with the session."""
        backend = BackendFactory()
        net = Network(
            make_config([A], max_session_age="60s", max_session_age_spread="30s"), {A: backend}
        )
        clients = [net.client("/") for _ in range(20)]
        net.advance(59.9)
        self.assertTrue(all(c.close is None for c in clients))
        net.advance(15.1)  # to 75 s: half of the window
        early = sum(c.close is not None for c in clients)
        self.assertTrue(0 < early < 20, early)  # spread: not all at once (1 in 500,000 fails)
        net.advance(15)
        self.assertEqual({c.close for c in clients}, {(1001, "max session age reached")})
        self.assertEqual(net.clock.getDelayedCalls(), [])

    def test_client_leaving_cancels_timers(self) -> None:
        """A session that ends before exp leaves no timer behind."""
        net, _ = self.network(max_session_age="1h")
        client = net.client("/", headers={"Authorization": "Bearer " + token(exp=5000)})
        client.proto.sendClose(1000)
        net.flush()
        net.advance(1)
        left = [call.func.__name__ for call in net.clock.getDelayedCalls()]
        self.assertEqual(left, ["_load"])  # only the key file's refresh


class ConsoleDetailTests(SynchronousTestCase):
    def test_session_detail_shows_auth_and_closes(self) -> None:
        """The console's session detail names the subject and when the gate will close it."""
        from wsgate.ops.rows import session_detail

        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "jwks.json")
        with open(path, "wb") as f:
            f.write(jwks(jwk(RSA_KEY, "k1")))
        self.addCleanup(os.remove, path)
        config = make_config([A], max_session_age="1h", auth={"type": "jwt", "keys": path})
        net = Network(config, {A: BackendFactory()})
        net.clock.advance(500)
        net.client("/", headers={"Authorization": "Bearer " + token(exp=560)})
        [session] = net.gateway.sessions.values()
        detail = session_detail(session)
        self.assertEqual(
            (detail["auth"], detail["credential_expires_in"], detail["max_age_close_in"]),
            ("jwt alice", 60.0, 3600.0),
        )


class AuthConfigTests(SynchronousTestCase):
    def problems(self, auth: Any, **route: Any) -> list[str]:
        data = {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"upstream": "u", "auth": auth, **route}],
            "upstream": {"u": {"servers": [{"url": A}]}},
        }
        try:
            configmod.parse(data, "t.toml")
        except configmod.ConfigError as e:
            return e.problems
        return []

    def test_refused_with_file_key_and_reason(self) -> None:
        """Bad [route.auth] values are refused, each naming the file and the key path."""
        directory = tempfile.mkdtemp()
        bad = os.path.join(directory, "bad.pem")
        with open(bad, "w") as f:
            f.write("not a key")
        self.addCleanup(os.remove, bad)
        table = [
            (
                {"type": "jwt", "jwks_url": "http://k", "algorithms": ["none"]},
                "route[0].auth.algorithms: 'none' is not one of",
            ),
            (
                {"type": "jwt"},
                "route[0].auth: give keys (a PEM or JWKS file) or jwks_url, not both",
            ),
            ({"type": "jwt", "keys": bad}, "route[0].auth.keys: " + bad + ": neither a JWKS file"),
            (
                {"type": "jwt", "jwks_url": "ftp://k"},
                "route[0].auth.jwks_url: 'ftp://k': not an http:// or https:// URL",
            ),
            (
                {"type": "jwt", "jwks_url": "http://k", "token": "query:"},
                "route[0].auth.token: 'query:' is not",
            ),
            (
                {"type": "jwt", "jwks_url": "http://k", "url": "http://a"},
                'route[0].auth.url: only with type = "forward"',
            ),
            (
                {"type": "jwt", "jwks_url": "http://k", "claim_headers": {"email": "Bad Header"}},
                "route[0].auth.claim_headers: 'Bad Header' is not an HTTP header name",
            ),
            ({"type": "forward"}, 'route[0].auth.url: required with type = "forward"'),
            (
                {"type": "forward", "url": "http://a", "forward_token": False},
                'route[0].auth.forward_token: only with type = "jwt"',
            ),
            ({"type": "saml"}, "route[0].auth.type: 'saml' is not one of jwt, forward"),
            (
                {"type": "forward", "url": "http://a", "timeout": "0s"},
                "route[0].auth.timeout: must be more than 0",
            ),
        ]
        for auth, expected in table:
            problems = self.problems(auth)
            self.assertTrue(
                any(p.startswith("t.toml: " + expected) for p in problems), (auth, problems)
            )

    def test_spread_needs_age(self) -> None:
        """max_session_age_spread alone is refused."""
        problems = self.problems(
            {"type": "forward", "url": "http://a"}, max_session_age_spread="1m"
        )
        self.assertEqual(
            problems, ["t.toml: route[0].max_session_age_spread: only with max_session_age"]
        )

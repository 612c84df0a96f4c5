"""
Authentication at the handshake and credential lifetime, in memory: JWT verification as a table
(valid, expired, not yet valid, wrong issuer or audience, algorithms not allowed including
``none``, HS/RS confusion, unknown key id, scopes), then whole sessions through a gate on a
``task.Clock``: 401 with ``WWW-Authenticate`` and its access-log line, claims forwarded and the
token stripped, key rotation in a JWKS file, the 1008 close at ``exp`` with its warning, and
``max_session_age`` spread.  Keys are generated at run time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import tempfile
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, make_config, upgrade_request
from wsgate import config as configmod
from wsgate.config import AuthSpec
from wsgate.core.auth import (
    AnswerCache,
    AuthFailure,
    Identity,
    UnknownKey,
    backend_view,
    claim_headers,
    find_token,
    forward_answer,
    lifetime_deadlines,
    load_keys,
    verify_jwt,
)
from wsgate.core.redact import redact_target

A = "ws://a.test:1"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    if isinstance(key, bytes):
        item: dict[str, Any] = json.loads(jwt.algorithms.HMACAlgorithm.to_jwk(key))
    elif isinstance(key, rsa.RSAPrivateKey):
        item = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        item = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    item["kid"] = kid
    if alg:
        item["alg"] = alg
    return item


def jwks(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def token(key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "k1", **claims: Any) -> str:
    body = {"sub": "alice", "iss": "https://id.test", "aud": "chat", "exp": 1000, **claims}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(secret: bytes, kid: str | None = "k1", **claims: Any) -> str:
    """An HS256 token whose secret is ``secret`` (e.g. an RSA public key's PEM), made by hand:
    PyJWT itself refuses to sign with a PEM key as an HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    body = {"sub": "mallory", "iss": "https://id.test", "aud": "chat", "exp": 1000, **claims}
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


SPEC = AuthSpec(
    type="jwt",
    keys="/unused",
    algorithms=("RS256", "ES256", "HS256"),
    issuer="https://id.test",
    audience=("chat",),
)


class VerifyTests(SynchronousTestCase):
    """verify_jwt against a key set, as a table of tokens and outcomes."""

    keys = load_keys(jwks(jwk(RSA_KEY, "k1"), jwk(EC_KEY, "e1"), jwk(SECRET, "h1")))

    def outcome(self, tok: str, spec: AuthSpec = SPEC, now: float = 500.0) -> Any:
        try:
            return verify_jwt(tok, self.keys, spec, now)
        except AuthFailure as e:
            return (e.status, e.reason)
        except UnknownKey:
            return "unknown kid"

    def test_table(self) -> None:
        """Each token gets its status and reason; valid ones an Identity with exp and sub."""
        none_token = jwt.encode({"sub": "x", "exp": 1000}, None, algorithm="none")
        rs512 = token(alg="RS512")
        table = [
            (token(), None),
            (token(EC_KEY, "ES256", "e1"), None),
            (token(SECRET, "HS256", "h1"), None),
            (token(exp=400), (401, "token expired")),
            (token(nbf=600), (401, "token not yet valid")),
            (token(iss="https://evil.test"), (401, "wrong issuer")),
            (token(aud="other"), (401, "wrong audience")),
            (token(exp=None), (401, "claim exp missing")),
            (rs512, (401, "algorithm 'RS512' not allowed")),
            (none_token, (401, "algorithm 'none' not allowed")),
            (token(RSA_KEY_2), (401, "bad signature")),
            (token(kid="k9"), "unknown kid"),
            ("not.a.token", (401, "malformed token")),
            # HS/RS confusion: HS256 with the RSA public key as secret, naming the RSA key...
            (forged_hs256(public_pem(RSA_KEY), kid="k1"), (401, "no key for algorithm HS256")),
            # ... or naming no key at all: only the oct key may verify HS256, and it fails.
            (forged_hs256(public_pem(RSA_KEY), kid=None), (401, "bad signature")),
            # an RS256 token naming the HMAC key
            (token(kid="h1"), (401, "no key for algorithm RS256")),
        ]
        for tok, expected in table:
            got = self.outcome(tok)
            if expected is None:
                self.assertIsInstance(got, Identity, tok)
                self.assertEqual((got.subject, got.expires), ("alice", 1000.0))
            else:
                self.assertEqual(got, expected, tok)

    def test_leeway(self) -> None:
        """A token expired by less than the leeway still passes; by more it does not."""
        spec = AuthSpec(**{**SPEC.__dict__, "leeway": 30.0})
        self.assertIsInstance(self.outcome(token(exp=480), spec), Identity)
        self.assertEqual(self.outcome(token(exp=460), spec), (401, "token expired"))

    def test_hs_only_route_with_pem_key(self) -> None:
        """A route with a PEM public key allowing HS256 and RS256 never verifies an HS256 token
        made with that key's PEM bytes (the classic confusion attack)."""
        keys = load_keys(public_pem(RSA_KEY))
        forged = forged_hs256(public_pem(RSA_KEY), kid=None)
        with self.assertRaises(AuthFailure) as caught:
            verify_jwt(forged, keys, SPEC, 500.0)
        self.assertEqual(caught.exception.reason, "no key for algorithm HS256")
        self.assertIsInstance(verify_jwt(token(kid=None), keys, SPEC, 500.0), Identity)

    def test_scopes(self) -> None:
        """A valid token without a required scope gets 403 insufficient_scope."""
        spec = AuthSpec(**{**SPEC.__dict__, "scopes": ("chat:write",)})
        self.assertIsInstance(self.outcome(token(scope="chat:read chat:write"), spec), Identity)
        with self.assertRaises(AuthFailure) as caught:
            verify_jwt(token(scope="chat:read"), self.keys, spec, 500.0)
        self.assertEqual(caught.exception.status, 403)
        self.assertIn('error="insufficient_scope"', caught.exception.headers[0][1])

    def test_jwk_pinned_to_other_family_is_skipped(self) -> None:
        """A JWK whose alg belongs to another key type is never loaded."""
        keys = load_keys(jwks(jwk(RSA_KEY, "k1", alg="HS256")))
        self.assertEqual(keys.keys, ())


class HelpersTests(SynchronousTestCase):
    def test_find_token(self) -> None:
        """Header, cookie and query parameter, first found wins; Basic is no bearer token."""
        sources = ("header", "cookie:at", "query:access_token")
        params = {"access_token": ["q"]}
        self.assertEqual(
            find_token(sources, {"authorization": "Bearer h"}, params), ("h", "header")
        )
        self.assertEqual(
            find_token(sources, {"authorization": "Basic x", "cookie": "a=1; at=c"}, params),
            ("c", "cookie:at"),
        )
        self.assertEqual(find_token(sources, {}, params), ("q", "query:access_token"))
        self.assertEqual(find_token(sources, {}, {}), (None, None))

    def test_backend_view(self) -> None:
        """Stripping takes only the credential: other cookies and parameters stay."""
        headers = {"Authorization": "Bearer t", "Cookie": "a=1; at=t; b=2"}
        self.assertNotIn("Authorization", backend_view("header", headers, "/")[0])
        self.assertEqual(backend_view("cookie:at", headers, "/")[0]["Cookie"], "a=1; b=2")
        self.assertEqual(
            backend_view("query:tok", {}, "/chat?room=1&tok=abc&x=2")[1], "/chat?room=1&x=2"
        )
        self.assertEqual(backend_view("query:tok", {}, "/chat?tok=abc")[1], "/chat")

    def test_claim_headers_are_sanitised(self) -> None:
        """A claim with a line break (header injection) or of excessive size is dropped."""
        claims = {"sub": "bob", "email": "x\r\nX-Admin: 1", "roles": ["a", "b"], "big": "x" * 5000}
        mapping = (("email", "X-Email"), ("roles", "X-Roles"), ("big", "X-Big"))
        self.assertEqual(
            claim_headers(claims, mapping), (("X-Auth-Sub", "bob"), ("X-Roles", "a,b"))
        )

    def test_forward_answer(self) -> None:
        """2xx copies the chosen headers; 401/403 pass with the challenge; others are 503."""
        spec = AuthSpec(type="forward", url="http://a", copy_headers=("x-user",))
        allowed = forward_answer(spec, 204, {"x-user": ["alice"], "x-other": ["no"]})
        self.assertEqual(allowed.headers, (("X-User", "alice"),))  # type: ignore[union-attr]
        refused = forward_answer(spec, 401, {"www-authenticate": ['Basic realm="x"']})
        self.assertEqual(
            (refused.status, refused.headers), (401, (("WWW-Authenticate", 'Basic realm="x"'),))
        )  # type: ignore[union-attr]
        self.assertEqual(forward_answer(spec, 403, {}).status, 403)  # type: ignore[union-attr]
        self.assertEqual(forward_answer(spec, 302, {}).status, 503)  # type: ignore[union-attr]

    def test_answer_cache_bounded_and_expiring(self) -> None:
        """At most ``size`` answers, each for ``ttl``; 503s are never remembered."""
        now = [0.0]
        cache = AnswerCache(10.0, 2, lambda: now[0])
        for key in "abc":
            cache.put(key, Identity(subject=key))
        self.assertEqual((len(cache), cache.get("a")), (2, None))
        cache.put("d", AuthFailure(503, "down"))
        self.assertIsNone(cache.get("d"))
        now[0] = 10.0
        self.assertIsNone(cache.get("c"))

    def test_deadlines(self) -> None:
        """The warning comes before exp (none if already past); the age close is spread."""
        d = lifetime_deadlines(100.0, 200.0, 30.0, 3600.0, 600.0, lambda: 0.5)
        self.assertEqual((d.warn, d.expire, d.age), (170.0, 200.0, 4000.0))
        self.assertIsNone(lifetime_deadlines(180.0, 200.0, 30.0, 0.0, 0.0).warn)

    def test_token_parameter_redacted_always(self) -> None:
        """A route's token parameter is hidden even with redact_query = false and kept names."""
        config = configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [
                    {
                        "upstream": "u",
                        "auth": {"type": "forward", "url": "http://a"},
                    },
                    {
                        "path": "/j",
                        "upstream": "u",
                        "auth": {"type": "jwt", "jwks_url": "http://k", "token": ["query:tok"]},
                    },
                ],
                "upstream": {"u": {"servers": [{"url": A}]}},
                "log": {"redact_query": False, "redact_query_keep": ["tok"]},
            },
            "t.toml",
        )
        self.assertEqual(
            redact_target("/j?room=1&tok=secret", config.log), "/j?room=1&tok=REDACTED"
        )


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
        from wsgate.ops.status import session_detail

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

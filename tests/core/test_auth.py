"""
Authentication's decisions, without a gate: JWT verification as a table (valid, expired, not yet
valid, wrong issuer or audience, algorithms not allowed including ``none``, HS/RS confusion,
unknown key id, scopes), where a token is found and what the backend gets of it, claim headers,
forward-auth answers and their cache, the credential-lifetime deadlines.  Keys are generated at
run time.  Whole sessions through a gate are in ``tests/dataplane/test_auth.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import RSA_KEY, RSA_KEY_2, A, jwk, jwks, token
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

EC_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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

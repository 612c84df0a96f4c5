"""
Authentication decisions at the handshake, without I/O: where a client's credential is, whether a
JWT is valid for a route, what the backend is told about the client, what a forward-auth answer
means, which answers are remembered, and when a session's credential or age runs out.

Owns: token extraction and stripping, key sets (PEM or JWKS bytes in, verification keys out),
JWT verification (signature with PyJWT, then ``exp``/``nbf`` against the caller's clock),
``WWW-Authenticate`` values, claim and answer headers toward the backend (sanitised: a claim can
never inject a header line), the forward-auth answer cache and the lifetime deadlines of a
session.  Must not read files, open connections or start timers (``wsgate/dataplane/auth.py``
does), and never puts a token in an error reason: reasons are logged.

Key types and algorithms are tied (``_FAMILIES``): an HMAC secret (JWK ``oct``) verifies only
``HS*`` tokens and an RSA, EC or OKP public key only its own algorithms, so a token signed with
HS256 using a public key's bytes as the secret is refused ("HS/RS confusion"); ``none`` is never
allowed (wsgate.config refuses it, and it belongs to no family).

A little over 500 lines because the JWT checks, the forward-auth answer rules and the lifetime
deadlines share the one decision a handshake gets (allow with headers, or refuse with a status).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from wsgate.config import AuthSpec

__all__ = [
    "AnswerCache",
    "AuthFailure",
    "Deadlines",
    "Identity",
    "KeySet",
    "UnknownKey",
    "VerifyKey",
    "backend_view",
    "claim_headers",
    "credential_key",
    "expiry_warning",
    "find_token",
    "forward_answer",
    "forward_request_headers",
    "lifetime_deadlines",
    "load_keys",
    "verify_jwt",
    "www_authenticate",
]

# Which algorithms a key of each type may verify.
_FAMILIES = {
    "oct": ("HS256", "HS384", "HS512"),
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512"),
    "OKP": ("EdDSA",),
}
# Longest header value the gate puts in a backend request from a claim or an auth answer.
MAX_HEADER_VALUE = 4096
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class AuthFailure(Exception):
    """
    A handshake refused by authentication: ``status`` (401, 403 or 503) for the client, ``reason``
    for the log (never the token), ``headers`` for the answer (``WWW-Authenticate`` on 401).
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class UnknownKey(Exception):
    """The token names a key id (``kid``) the key set does not hold: worth a refresh."""


def www_authenticate(realm: str, error: str | None = None, description: str = "") -> str:
    """An RFC 6750 challenge: ``Bearer realm="wsgate", error="invalid_token", ...``."""
    value = f'Bearer realm="{realm}"'
    if error:
        value += f', error="{error}"'
    if description:
        value += f', error_description="{description.replace(chr(34), chr(39))}"'
    return value


def _unauthorized(realm: str, reason: str, error: str | None = "invalid_token") -> AuthFailure:
    return AuthFailure(401, reason, (("WWW-Authenticate", www_authenticate(realm, error, reason)),))


# -- where the credential is -------------------------------------------------------------------


def _cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for item in header.split(";"):
        name, eq, value = item.strip().partition("=")
        if eq and name:
            jar.setdefault(name, value.strip().strip('"'))
    return jar


def find_token(
    sources: tuple[str, ...], headers: Mapping[str, str], params: Mapping[str, list[str]]
) -> tuple[str | None, str | None]:
    """
    The first credential found in ``sources`` (``"header"``: ``Authorization: Bearer``,
    ``"cookie:NAME"``, ``"query:NAME"``) among the request's lower-case ``headers`` and query
    ``params``: ``(token, source)``, or ``(None, None)``.
    """
    for source in sources:
        kind, _, name = source.partition(":")
        token = None
        if kind == "header":
            scheme, _, value = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        elif kind == "cookie":
            token = _cookies(headers.get("cookie", "")).get(name)
        else:
            values = params.get(name)
            token = values[0] if values else None
        if token:
            return token, source
    return None, None


def backend_view(
    source: str | None, headers: dict[str, str], target: str
) -> tuple[dict[str, str], str]:
    """
    The forwarded ``headers`` (title-case names) and request ``target`` without the credential
    taken from ``source`` (``forward_token = false``): no ``Authorization``, the cookie removed
    from ``Cookie`` (the others stay), the parameter removed from the query.
    """
    headers = dict(headers)
    kind, _, name = (source or "").partition(":")
    if kind == "header":
        headers.pop("Authorization", None)
    elif kind == "cookie" and "Cookie" in headers:
        others = [c for c in headers["Cookie"].split(";") if c.strip().partition("=")[0] != name]
        if any(c.strip() for c in others):
            headers["Cookie"] = ";".join(others).strip()
        else:
            del headers["Cookie"]
    elif kind == "query" and "?" in target:
        rest, hash_, fragment = target.partition("#")
        path, _, query = rest.partition("?")
        kept = [item for item in query.split("&") if unquote_plus(item.split("=")[0]) != name]
        target = path + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return headers, target


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyKey:
    """One verification key: its id (``kid``, may be None), type, pinned algorithm and key."""

    kid: str | None
    kty: str
    alg: str | None
    key: Any

    def verifies(self, alg: str) -> bool:
        return alg in _FAMILIES[self.kty] and self.alg in (None, alg)


@dataclass(frozen=True)
class KeySet:
    """The keys of one source, as loaded; ``kids`` for the unknown-key check."""

    keys: tuple[VerifyKey, ...] = ()

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(k.kid for k in self.keys if k.kid is not None)

    def candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        """The keys that may verify a token with ``kid`` and ``alg``; UnknownKey for a new kid."""
        if kid is not None and kid not in self.kids:
            raise UnknownKey(kid)
        return [k for k in self.keys if k.verifies(alg) and (kid is None or k.kid == kid)]


def _key_type(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "OKP"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def load_keys(data: bytes) -> KeySet:
    """
    The keys of a JWKS document (``{"keys": [...]}``; keys of an unknown type or use are
    skipped) or of PEM public keys and certificates.  ValueError saying what is wrong.
    """
    if data.lstrip().startswith(b"{"):
        return _load_jwks(data)
    keys: list[VerifyKey] = []
    for match in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", data, re.S):
        pem, label = match.group(0), match.group(1)
        key: Any
        if label == b"CERTIFICATE":
            key = x509.load_pem_x509_certificate(pem).public_key()
        elif label == b"PUBLIC KEY":
            key = load_pem_public_key(pem)
        else:
            continue  # a private key or parameters: never a verification key
        keys.append(VerifyKey(None, _key_type(key), None, key))
    if not keys:
        raise ValueError("no PEM public key or certificate")
    return KeySet(tuple(keys))


def _load_jwks(data: bytes) -> KeySet:
    try:
        document = json.loads(data)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    items = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ValueError("not a JWKS document (a JSON object with a keys list)")
    keys = []
    for item in items:
        if not isinstance(item, dict) or item.get("kty") not in _FAMILIES:
            continue
        if item.get("use", "sig") != "sig":
            continue
        alg = item.get("alg")
        if alg is not None and alg not in _FAMILIES[item["kty"]]:
            continue  # a key pinned to an algorithm of another family is never usable
        try:
            parsed = jwt.PyJWK(item, algorithm=alg or _FAMILIES[item["kty"]][0])
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = item.get("kid")
        keys.append(VerifyKey(kid if isinstance(kid, str) else None, item["kty"], alg, parsed.key))
    return KeySet(tuple(keys))


# -- the token ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """
    Who a handshake was authenticated as: ``subject`` (for the log and console), ``expires``
    (the JWT's ``exp``, None without one), ``headers`` for the backend request and the
    credential's ``source`` (stripped from what the backend gets unless ``forward``).
    """

    subject: str | None = None
    expires: float | None = None
    headers: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    forward: bool = True
    method: str = "jwt"
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False)


def verify_jwt(token: str, keys: KeySet, spec: AuthSpec, now: float) -> Identity:
    """
    Check ``token`` for the route's ``spec`` at time ``now`` (the gateway's clock): algorithm
    allowed and of the key's family, signature, ``iss``, ``aud``, required claims, ``exp`` and
    ``nbf`` (with ``leeway``), then ``scopes`` (403 when missing).  AuthFailure on any problem,
    UnknownKey when the token names a key id the set lacks.
    """
    realm = spec.realm
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _unauthorized(realm, "malformed token") from None
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in spec.algorithms:
        raise _unauthorized(realm, f"algorithm {str(alg)[:16]!r} not allowed")
    if kid is not None and not isinstance(kid, str):
        raise _unauthorized(realm, "malformed token")
    candidates = keys.candidates(kid, alg)
    if not candidates:
        raise _unauthorized(realm, f"no key for algorithm {alg}")
    claims = None
    for candidate in candidates:
        try:
            claims = jwt.decode(
                token,
                candidate.key,
                algorithms=[alg],
                audience=list(spec.audience) or None,
                issuer=spec.issuer,
                options={
                    "verify_exp": False,  # checked below against the gateway's clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": bool(spec.audience),
                    "require": list(spec.required_claims),
                },
            )
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.MissingRequiredClaimError as e:
            raise _unauthorized(realm, f"claim {e.claim} missing") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized(realm, "wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized(realm, "wrong audience") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _unauthorized(realm, "malformed token") from None
    if claims is None:
        raise _unauthorized(realm, "bad signature")
    expires = _time_claim(claims, "exp", realm)
    not_before = _time_claim(claims, "nbf", realm)
    if expires is not None and now >= expires + spec.leeway:
        raise _unauthorized(realm, "token expired")
    if not_before is not None and now < not_before - spec.leeway:
        raise _unauthorized(realm, "token not yet valid")
    missing = sorted(set(spec.scopes) - _scopes(claims))
    if missing:
        reason = f"scope {' '.join(missing)} missing"
        challenge = www_authenticate(realm, "insufficient_scope", reason)
        raise AuthFailure(403, reason, (("WWW-Authenticate", challenge),))
    subject = claims.get("sub")
    return Identity(
        subject=str(subject) if subject is not None else None,
        expires=expires,
        headers=claim_headers(claims, spec.claim_headers),
        claims=claims,
    )


def _time_claim(claims: Mapping[str, Any], name: str, realm: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _unauthorized(realm, f"claim {name} is not a number")
    return float(value)


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    """OAuth scopes: ``scope`` (space-separated) or ``scp`` (a list or a string)."""
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(str(v) for v in value)
    return found


def _header_value(value: Any) -> str | None:
    """A claim or answer value as a header value: no control characters, bounded; None: drop."""
    if value is None or isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else None
    elif isinstance(value, list):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if text is None or _UNSAFE.search(text) or len(text) > MAX_HEADER_VALUE:
        return None
    return text


def claim_headers(
    claims: Mapping[str, Any], mapping: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    """``X-Auth-Sub`` from ``sub`` and a header per ``(claim, header)`` of ``mapping``."""
    headers = []
    for claim, header in (("sub", "X-Auth-Sub"), *mapping):
        value = _header_value(claims.get(claim))
        if value is not None:
            headers.append((header, value))
    return tuple(headers)


# -- forward auth ------------------------------------------------------------------------------


def forward_request_headers(
    spec: AuthSpec, incoming: Mapping[str, str], forwarded: Mapping[str, str], method: str, uri: str
) -> dict[str, str]:
    """
    The headers of the request to the auth service: the client's ``send_headers`` and, as
    Traefik's ForwardAuth sends them, ``X-Forwarded-Method``/``-Uri``/``-For``/``-Proto``/
    ``-Host`` (the last three from ``forwarded``, what the backend would get).
    """
    headers = {name: incoming[name] for name in spec.send_headers if name in incoming}
    headers["X-Forwarded-Method"] = method
    headers["X-Forwarded-Uri"] = uri
    for name in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID"):
        if name in forwarded:
            headers[name] = forwarded[name]
    return headers


def forward_answer(
    spec: AuthSpec, status: int, headers: Mapping[str, list[str]]
) -> Identity | AuthFailure:
    """
    What the auth service's answer means (NGINX ``auth_request``): 2xx allows and copies
    ``copy_headers`` to the backend request; 401 and 403 go to the client (with the service's
    ``WWW-Authenticate``); anything else means the service is unusable: 503.
    """
    if 200 <= status < 300:
        copied = []
        for name in spec.copy_headers:
            for value in headers.get(name, []):
                clean = _header_value(value)
                if clean is not None:
                    copied.append((name.title(), clean))
        user = next((v for n, v in copied if n in ("X-Auth-User", "X-User", "X-Auth-Sub")), None)
        return Identity(subject=user, headers=tuple(copied), method="forward")
    if status in (401, 403):
        challenge = [v for v in headers.get("www-authenticate", []) if _header_value(v)]
        if status == 401 and not challenge:
            challenge = [www_authenticate(spec.realm)]
        reason = "auth service refused" if status == 401 else "auth service forbade"
        return AuthFailure(status, reason, tuple(("WWW-Authenticate", v) for v in challenge))
    return AuthFailure(503, f"auth service answered {status}")


def credential_key(spec: AuthSpec, incoming: Mapping[str, str]) -> str:
    """The cache key of a forward-auth answer: a digest of the credential headers sent."""
    digest = hashlib.sha256()
    for name in spec.send_headers:
        digest.update(name.encode() + b"\0" + incoming.get(name, "").encode() + b"\0")
    return digest.hexdigest()


class AnswerCache:
    """
    Forward-auth answers (allow or 401/403) by credential, each for ``ttl`` seconds, at most
    ``size`` of them (the least recently used go first).  ``now`` is the gateway's clock.
    """

    def __init__(self, ttl: float, size: int, now: Callable[[], float]) -> None:
        self.ttl = ttl
        self.size = size
        self._now = now
        self._answers: OrderedDict[str, tuple[float, Identity | AuthFailure]] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Identity | AuthFailure | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        until, answer = entry
        if self._now() >= until:
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return answer

    def put(self, key: str, answer: Identity | AuthFailure) -> None:
        if self.ttl <= 0 or (isinstance(answer, AuthFailure) and answer.status == 503):
            return
        self._answers[key] = (self._now() + self.ttl, answer)
        self._answers.move_to_end(key)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)


# -- lifetime ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadlines:
    """When (gateway clock) to warn of expiry, close for expiry (1008) and for age (1001)."""

    warn: float | None = None
    expire: float | None = None
    age: float | None = None


def lifetime_deadlines(
    opened: float,
    expires: float | None,
    warning: float,
    max_age: float,
    spread: float,
    draw: Callable[[], float] = random.random,
) -> Deadlines:
    """
    The deadlines of a session opened at ``opened`` whose credential expires at ``expires``
    (None: never): a warning ``warning`` seconds before (0: none; none either if that moment has
    passed), and, with ``max_age``, an age close at a random moment (``draw()`` in [0, 1)) of
    ``[opened + max_age, opened + max_age + spread)``.
    """
    warn = None
    if expires is not None and warning > 0 and expires - warning > opened:
        warn = expires - warning
    age = opened + max_age + spread * draw() if max_age > 0 else None
    return Deadlines(warn=warn, expire=expires, age=age)


def expiry_warning(expires: float, now: float) -> bytes:
    """The text message that warns a client of its credential's end (documented in README)."""
    message = {"wsgate": "credential_expiring", "exp": int(expires), "in": round(expires - now)}
    return json.dumps(message, separators=(",", ":")).encode()

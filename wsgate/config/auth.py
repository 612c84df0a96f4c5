"""
A route's ``[route.auth]`` table: ``type = "jwt"`` (where the token is, its keys, algorithms and
claims) or ``type = "forward"`` (the auth service's URL and which headers go and come back), each
refusing the other type's keys.  The keys themselves are read by ``wsgate/core/auth.py``.
"""

from __future__ import annotations

import re

from wsgate.config.files import key_file
from wsgate.config.schema import AUTH_TYPES, JWT_ALGORITHMS, AuthSpec
from wsgate.config.syntax import HEADER_NAME, header_names, http_url
from wsgate.config.table import Table
from wsgate.config.units import (
    choice,
    one_or_more,
    parse_duration,
    positive_duration,
    positive_int,
    strings,
    typed,
)

__all__ = ["read_auth"]

_AUTH_KEYS = {
    "jwt": {
        "token", "keys", "jwks_url", "keys_refresh", "algorithms", "issuer", "audience",
        "leeway", "required_claims", "scopes", "claim_headers", "forward_token",
        "expiry_warning",
    },
    "forward": {"url", "method", "send_headers", "copy_headers", "cache", "cache_size"},
}  # fmt: skip


def read_auth(table: Table) -> AuthSpec:
    """A route's ``auth`` table."""
    kind = table.required("type", choice(*AUTH_TYPES), "")
    spec = AuthSpec(
        type=kind,
        realm=table.field(AuthSpec, "realm", _quotable),
        token=table.field(AuthSpec, "token", _token_sources),
        keys=table.field(AuthSpec, "keys", key_file(table.reader)),
        jwks_url=table.field(AuthSpec, "jwks_url", http_url),
        keys_refresh=table.field(AuthSpec, "keys_refresh", positive_duration),
        algorithms=table.field(AuthSpec, "algorithms", _algorithms),
        issuer=table.field(AuthSpec, "issuer", typed(str, "a string")),
        audience=table.field(AuthSpec, "audience", one_or_more),
        leeway=table.field(AuthSpec, "leeway", parse_duration),
        required_claims=table.field(AuthSpec, "required_claims", strings),
        scopes=table.field(AuthSpec, "scopes", strings),
        claim_headers=table.field(AuthSpec, "claim_headers", _claim_headers),
        forward_token=table.field(AuthSpec, "forward_token", typed(bool, "true or false")),
        expiry_warning=table.field(AuthSpec, "expiry_warning", parse_duration),
        url=table.field(AuthSpec, "url", http_url),
        method=table.field(AuthSpec, "method", choice("GET", "POST", "HEAD")),
        send_headers=table.field(AuthSpec, "send_headers", header_names),
        copy_headers=table.field(AuthSpec, "copy_headers", header_names),
        cache=table.field(AuthSpec, "cache", parse_duration),
        cache_size=table.field(AuthSpec, "cache_size", positive_int),
        timeout=table.field(AuthSpec, "timeout", positive_duration),
    )
    other = "forward" if kind == "jwt" else "jwt"
    for name in sorted(n for n in _AUTH_KEYS[other] if table.given(n)):
        table.reader.problem(table.key(name), f'only with type = "{other}"')
    if kind == "jwt" and table.given("keys") == table.given("jwks_url"):
        table.reader.problem(table.path, "give keys (a PEM or JWKS file) or jwks_url, not both")
    if kind == "forward" and not table.given("url"):
        table.reader.problem(table.key("url"), 'required with type = "forward"')
    table.done()
    return spec


def _quotable(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[ -~]*", value) or '"' in value:
        raise ValueError("expected printable ASCII text without double quotes")
    return value


def _token_sources(value: object) -> tuple[str, ...]:
    sources = (value,) if isinstance(value, str) else strings(value)
    for source in sources:
        kind, _, name = source.partition(":")
        if not (source == "header" or (kind in ("cookie", "query") and name.strip())):
            raise ValueError(f'{source!r} is not "header", "cookie:NAME" or "query:NAME"')
    if not sources:
        raise ValueError("name at least one place to look for the token")
    return sources


def _algorithms(value: object) -> tuple[str, ...]:
    names = strings(value)
    for name in names:
        if name not in JWT_ALGORITHMS:
            raise ValueError(f"{name!r} is not one of {', '.join(JWT_ALGORITHMS)}")
    if not names:
        raise ValueError("allow at least one algorithm")
    return names


def _claim_headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('expected a table of claim = "Header-Name"')
    for header in value.values():
        if not HEADER_NAME.match(header):
            raise ValueError(f"{header!r} is not an HTTP header name")
    return tuple(sorted(value.items()))

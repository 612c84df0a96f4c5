"""
What the gate shows of a client's request: query strings with their values hidden, secret headers
hidden, and the request id that ties a session's log line to the backend's.

Owns the redaction rules shared by the access log, ``/status.json``, the status page and the
console, so that all of them hide the same things: every query-string value becomes ``REDACTED``
(parameter names stay; ``[log] redact_query_keep`` names parameters whose values stay), a
fragment becomes ``REDACTED``; a parameter that carries a route's credential (``[route.auth]
token = "query:NAME"``) is hidden always, even with ``redact_query = false``; and the values of ``Authorization``, ``Cookie``,
``Proxy-Authorization`` and ``Sec-WebSocket-Key`` become ``<redacted>``.  Pure functions: they
never change what the backend receives (the session keeps the real request).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from urllib.parse import unquote_plus

from wsgate.config import LogSpec

__all__ = [
    "logfmt_value",
    "HIDDEN",
    "REDACTED",
    "SECRET_HEADERS",
    "new_request_id",
    "redact_headers",
    "redact_target",
    "redact_text",
    "sanitize_request_id",
]

REDACTED = "REDACTED"
HIDDEN = "<redacted>"
SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "sec-websocket-key"})
REQUEST_ID_MAX = 128

_NOT_REQUEST_ID = re.compile(r"[^A-Za-z0-9._-]")
# A query string or fragment inside free text (an HTTP request line quoted in an error message).
_IN_TEXT = re.compile(r"([?#])([^\s\"'<>]*)")


def _redact_query(query: str, spec: LogSpec) -> str:
    """
    ``token=abc&page=2`` -> ``token=REDACTED&page=2`` (with ``page`` kept); with ``redact_query``
    off, only the ``redact_always`` parameters are hidden.
    """
    keep, always = spec.redact_query_keep, spec.redact_always
    parts = []
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not part or (eq and not value):
            parts.append(part)  # nothing to hide
        elif not eq:
            # A bare item may be the secret itself (``?s3cr3t``): hidden unless its name is kept.
            shown = not spec.redact_query or unquote_plus(part) in keep
            parts.append(part if shown else REDACTED)
        elif unquote_plus(name) in always:
            parts.append(f"{name}={REDACTED}")
        elif not spec.redact_query or unquote_plus(name) in keep:
            parts.append(part)
        else:
            parts.append(f"{name}={REDACTED}")
    return "&".join(parts)


def _redacting(spec: LogSpec, text: str) -> bool:
    """Whether anything of ``text`` may be hidden under ``spec``."""
    return bool(text) and (spec.redact_query or (bool(spec.redact_always) and "?" in text))


def redact_target(target: str | None, spec: LogSpec) -> str | None:
    """
    A request target (path and query) as the gate shows it: with ``redact_query`` on, every
    query value replaced by ``REDACTED`` except those of the ``redact_query_keep`` parameters,
    and a fragment replaced by ``REDACTED``.
    """
    if not target or not _redacting(spec, target) or ("?" not in target and "#" not in target):
        return target
    rest, hash_, fragment = target.partition("#")
    path, question, query = rest.partition("?")
    shown = path + question + _redact_query(query, spec)
    if not spec.redact_query:
        return shown + hash_ + fragment
    return shown + (hash_ + REDACTED if fragment else hash_)


def redact_text(text: str, spec: LogSpec, target: str | None = None) -> str:
    """
    Free text (an error message that may quote the request line or target) with every query
    string and fragment in it redacted as :func:`redact_target` does; with ``target``, the
    request's own fragment quoted bare (``"frag"``) is hidden too.
    """
    if not _redacting(spec, text):
        return text
    if spec.redact_query and target and "#" in target:
        fragment = target.partition("#")[2]
        if fragment:
            text = text.replace(f'"{fragment}"', f'"{REDACTED}"')

    def hide(match: re.Match[str]) -> str:
        mark, rest = match.groups()
        if mark == "#":
            return "#" + REDACTED if rest and spec.redact_query else "#" + rest
        return "?" + _redact_query(rest, spec)

    return _IN_TEXT.sub(hide, text)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with the values of credentials and the handshake key shown as ``<redacted>``."""
    return {
        name: HIDDEN if name.lower() in SECRET_HEADERS else value for name, value in headers.items()
    }


def sanitize_request_id(sent: str | None) -> str | None:
    """
    A client's ``X-Request-ID`` as the gate passes it on: only ``A-Z a-z 0-9 . _ -`` kept, at
    most 128 characters; None when nothing usable is left (or none was sent).
    """
    if not sent:
        return None
    clean = _NOT_REQUEST_ID.sub("", sent)[:REQUEST_ID_MAX]
    return clean or None


def new_request_id() -> str:
    """A fresh random request id (128 bits, 32 hex digits)."""
    return secrets.token_hex(16)


_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')


def logfmt_value(text: str) -> str:
    """``console (ops)`` -> ``"console (ops)"``; plain values stay as they are."""
    if _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text

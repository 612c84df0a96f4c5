"""
The bearer-token check the admin listener and the control API share: ``Authorization: Bearer
TOKEN``, compared in constant time.  Must not read files (the callers hold the token read at start).
"""

from __future__ import annotations

import hmac
from typing import Any

__all__ = ["CHALLENGE", "bearer_ok"]

# What a refused request's WWW-Authenticate says, after "Bearer ".
CHALLENGE = 'realm="wsgate"'


def bearer_ok(request: Any, token: str | None) -> bool:
    """Whether ``request`` (a twisted.web Request) carries ``token``; None asks for none."""
    if token is None:
        return True
    given = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, value = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )

"""
Routing: which route a client request belongs to.

Owns the ordered route table and the match rule (first match wins; see :meth:`Route.matches`).
Must not know about sockets or backends.
"""

from __future__ import annotations

from collections.abc import Iterable

from wsgate.config import Route

__all__ = ["Router"]


class Router:
    """An ordered table of routes; the first that matches a request wins."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, host: str, path: str) -> Route | None:
        """The route for a request to ``host`` (without port) and ``path``, or None."""
        for route in self.routes:
            if route.matches(host, path):
                return route
        return None

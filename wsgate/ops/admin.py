"""
The admin HTTP listener: ``/metrics`` (Prometheus text format), ``/status.json``, ``/ready`` (for
readiness probes and load balancers) and the live status page ``/`` with its files under
``/static/`` (package data in ``wsgate/ops/static``; plain HTML, JS and CSS: no build step, nothing
from a CDN).

Owns the HTTP side only: figures come from the gate's operations view (:mod:`wsgate.ops.view`,
one process or workers alike) through :mod:`wsgate.ops.status` and :mod:`wsgate.core.metrics`
(process figures from :mod:`wsgate.ops.process_metrics`).  Must
not act on the gate: every resource is read-only.  With ``token_file`` every path but ``/ready``
asks for a bearer token (a probe needs none); without, there is no authentication: bind it to
loopback or a management network.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from twisted.application import service, strports
from twisted.web import resource, static
from twisted.web.server import Request, Site

import wsgate
from wsgate.config import AdminSpec, read_token
from wsgate.core import metrics
from wsgate.ops import status
from wsgate.ops.bearer import CHALLENGE, bearer_ok
from wsgate.ops.process_metrics import process_text
from wsgate.ops.view import GateView

__all__ = ["STATIC_DIR", "AdminSite", "admin_resource", "admin_service", "not_ready"]

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# /status.json lists at most this many sessions (the busiest) unless ?limit= says otherwise.
DEFAULT_LIMIT = 500


def _no_store(request: Request) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")


class _GatewayResource(resource.Resource):
    """A leaf page rendered from the gate's view and the sampler's history."""

    isLeaf = True

    def __init__(self, view: GateView, sampler: status.Sampler | None) -> None:
        super().__init__()
        self.view = view
        self.sampler = sampler


class _Metrics(_GatewayResource):
    def render_GET(self, request: Request) -> bytes:
        _no_store(request)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        view = self.view
        text = metrics.render(
            status.snapshot(view, self.sampler, limit=0, history=False),
            view.closed.items(),
            view.connect_time,
            view.session_duration,
            wsgate.__version__,
        )
        text += metrics.render_operations(
            view.reloads, view.backend_failures.items(), view.certificates()
        )
        text += process_text(view.processes())
        if view.fleet is not None:  # [cluster]
            text += metrics.render_cluster(view.fleet.figures())
        return text.encode("utf-8")


class _Status(_GatewayResource):
    def render_GET(self, request: Request) -> bytes:
        _no_store(request)
        request.setHeader(b"content-type", b"application/json")
        args = request.args or {}
        try:
            limit = int(args.get(b"limit", [str(DEFAULT_LIMIT).encode()])[0])
        except ValueError:
            limit = DEFAULT_LIMIT
        history = args.get(b"history", [b"1"])[0] != b"0"
        data = status.snapshot(self.view, self.sampler, limit=max(0, limit), history=history)
        data["sessions_total"] = self.view.session_count()
        data["gate"] = {"version": wsgate.__version__, "source": self.view.config.source}
        return json.dumps(data, separators=(",", ":")).encode("utf-8")


class _Listening(Protocol):
    """Where the gate is in its life: ``starting``, ``listening`` or ``stopping``."""

    state: str


def not_ready(view: GateView, listening: _Listening | None) -> list[str]:
    """
    Why the gate should get no new sessions now (empty: ready): its listeners are not listening
    yet or it is stopping, or a route's upstream has no server up.
    """
    problems = []
    state = "listening" if listening is None else listening.state
    if state != "listening":
        problems.append(f"gate {state}")
    elif view.closing:
        problems.append("gate stopping")
    up = {row["upstream"] for row in status.upstreams(view, 0.0) if row["state"] == "up"}
    names = dict.fromkeys(route.upstream for route in view.config.routes)
    problems += [f"upstream {name}: no server up" for name in names if name not in up]
    return problems


class _Ready(resource.Resource):
    """``/ready``: 200 ``ready``, or 503 ``not ready: REASON; ...`` (short text either way)."""

    isLeaf = True

    def __init__(self, view: GateView, listening: _Listening | None) -> None:
        super().__init__()
        self.view = view
        self.listening = listening

    def render_GET(self, request: Request) -> bytes:
        _no_store(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        problems = not_ready(self.view, self.listening)
        if problems:
            request.setResponseCode(503)
            return f"not ready: {'; '.join(problems)}\n".encode()
        return b"ready\n"


class _Page(resource.Resource):
    """``/``: the status page itself."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        _no_store(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'",
        )
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
            return f.read()


class _Root(resource.Resource):
    """``/`` and the children; with a token, every child but ``/ready`` asks for it."""

    def __init__(self, page: resource.Resource, token: str | None) -> None:
        super().__init__()
        self.page = page
        self.token = token

    def getChildWithDefault(self, path: bytes, request: Request) -> resource.Resource:
        if path != b"ready" and not bearer_ok(request, self.token):
            return _Unauthorized()
        return super().getChildWithDefault(path, request)

    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        if path == b"":
            return self.page
        return resource.NoResource()


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", f"Bearer {CHALLENGE}".encode())
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"a valid bearer token is required\n"


def admin_resource(
    view: GateView,
    sampler: status.Sampler | None,
    listening: _Listening | None = None,
    token: str | None = None,
) -> resource.Resource:
    """
    The resource tree: ``/``, ``/metrics``, ``/status.json``, ``/ready`` and ``/static/``.
    ``listening`` (None: always listening) says whether the gate has started and not begun to stop.
    ``token``: the bearer token every path but ``/ready`` asks for (None: none).
    """
    root: Any = _Root(_Page(), token)
    root.putChild(b"metrics", _Metrics(view, sampler))
    root.putChild(b"status.json", _Status(view, sampler))
    root.putChild(b"ready", _Ready(view, listening))
    files: Any = static.File(STATIC_DIR)
    files.contentTypes = {**files.contentTypes, ".js": "text/javascript", ".css": "text/css"}
    files.indexNames = []
    root.putChild(b"static", files)
    return root


class AdminSite(Site):
    """A Site that writes no access log line per request (the page polls every two seconds)."""

    def log(self, request: Any) -> None:
        pass


def admin_service(
    spec: AdminSpec,
    view: GateView,
    sampler: status.Sampler | None,
    listening: _Listening | None = None,
) -> service.Service:
    """The admin listener as a ``strports`` service (binds in ``privilegedStartService``)."""
    token = read_token(spec.token_file) if spec.token_file is not None else None
    site: Any = AdminSite(admin_resource(view, sampler, listening, token))
    return strports.service(spec.endpoint, site)

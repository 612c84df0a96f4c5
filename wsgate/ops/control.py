"""
The control API: the gate's operations as JSON over HTTP, for automation (``wsgate ctl``,
``wsgate reload``, scripts, a backend pushing into a session).

Owns the HTTP side: the resource tree below, the bearer-token check, the JSON shapes and status
codes, the bound on request bodies, and the listening service (a Unix socket by default, whose
directory it makes; or a loopback TCP port, which the config allows only with a token).  Every
verb goes through the gate's operations view (:mod:`wsgate.ops.view`), the same functions the
console's ``gate`` commands call, for one process and for workers alike.  Must not hold gateway
logic or format text for people.

=========  ===========================================  ===========================================
method     path                                         does
=========  ===========================================  ===========================================
GET        /sessions[?filter=TEXT]                      live sessions (rows)
GET        /sessions/ID                                 one session in full
DELETE     /sessions/ID[?code=N&reason=TEXT]            close it: code and reason to the client
POST       /sessions/ID/messages                        send the client a message: a JSON body
                                                        ``{"text": ...}`` or ``{"binary": BASE64}``,
                                                        or a text/plain or application/octet-stream
                                                        body
GET        /upstreams                                   every upstream's servers
GET        /upstreams/NAME                              one upstream's servers
POST       /upstreams/NAME/servers                      add a server: ``{"url", "weight", "backup"}``
GET        /upstreams/NAME/servers/SERVER               one server (SERVER: its URL, percent-encoded,
                                                        or a unique part of it, e.g. ``8011``)
DELETE     /upstreams/NAME/servers/SERVER               remove it (drained; forgotten when empty)
POST       /upstreams/NAME/servers/SERVER/drain         ``{"deadline": "30s", "window": "10s"}``
POST       /upstreams/NAME/servers/SERVER/undrain
POST       /upstreams/NAME/servers/SERVER/weight        ``{"weight": 3}``
POST       /reload                                      200 ``{"accepted": true, "changes": [...]}``
                                                        or 409 ``{"accepted": false, "problems":
                                                        [...]}``
GET        /stats                                       totals and rates
GET        /fleet                                       with ``[cluster]``: the fleet's gates
GET        /fleet/sessions                              every session of every gate (``GATE:ID``)
DELETE     /fleet/sessions/GATE:ID[?code=N&reason=T]    close it on whichever gate holds it
POST       /fleet/sessions/GATE:ID/messages             send its client a message (as above)
POST       /fleet/drain                                 ``{"server", "deadline", "window", "gate"}``
                                                        on one gate or every gate that has it
=========  ===========================================  ===========================================

Errors are ``{"error": TEXT}`` with 400 (bad input), 401 (token missing or wrong), 404 (no such
session, upstream or server; ``/fleet`` without ``[cluster]``), 405, 413 (body over
:data:`MAX_BODY`), 503 (a push queue is full) or 502 (a worker or another gate of the fleet could
not do it).  Run-time changes (weight, added or removed servers) last
until the next reload, which reports each one it resets.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any
from urllib.parse import unquote

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import NOT_DONE_YET, Request

from wsgate.config import ConfigError, ControlSpec, parse_duration, read_token
from wsgate.ops import status
from wsgate.ops.bearer import bearer_ok
from wsgate.ops.preflight import binds_at
from wsgate.ops.view import MAX_PUSH, GateView, check_kick, find_server

__all__ = ["MAX_BODY", "ControlResource", "control_service", "control_target"]

# The largest request body read (a pushed message of MAX_PUSH bytes in base64 JSON fits).
MAX_BODY = MAX_PUSH * 4 // 3 + 4096


class _BadRequest(ValueError):
    """The request itself is wrong (not JSON, a missing field): 400."""


class _Request(Request):
    """A request whose body is dropped past MAX_BODY bytes (then answered 413), so no caller can
    make the gate hold more."""

    too_large = False
    _received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)


class ControlResource(resource.Resource):
    """Every path of the API (see the module docstring); ``token`` None: no token asked for."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, view: GateView, token: str | None, sampler: status.Sampler | None = None
    ) -> None:
        super().__init__()
        self.view = view
        self.token = token
        self.sampler = sampler

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if not bearer_ok(request, self.token):
            request.setHeader(b"www-authenticate", b'Bearer realm="wsgate control"')
            return _json(request, 401, {"error": "a valid bearer token is required"})
        if getattr(request, "too_large", False):
            return _json(request, 413, {"error": f"the body is over {MAX_BODY} bytes"})
        method = (request.method or b"GET").decode("ascii", "replace")
        path = [unquote(p.decode("utf-8", "replace")) for p in request.postpath or []]
        while path and path[-1] == "":
            path.pop()
        d = defer.maybeDeferred(self._route, method, path, request)
        d.addCallback(lambda answer: _json(request, *answer))
        d.addErrback(lambda failure: _json(request, *self._error(failure)))
        d.addBoth(lambda body: _finish(request, body))
        return NOT_DONE_YET

    # -- routing -------------------------------------------------------------------------------

    def _route(self, method: str, path: list[str], request: Request) -> Any:
        view = self.view
        if path == ["sessions"] and method == "GET":
            return 200, {"sessions": status.sessions(view, _arg(request, "filter"))}
        if len(path) == 2 and path[0] == "sessions":
            if method == "GET":
                return view.session(path[1]).addCallback(lambda d: (200, d))
            if method == "DELETE":
                return self._kick(path[1], request)
        if len(path) == 3 and path[0] == "sessions" and path[2] == "messages":
            if method == "POST":
                return self._push(path[1], request)
        if path == ["upstreams"] and method == "GET":
            return 200, {"upstreams": self._upstreams(None)}
        if len(path) == 2 and path[0] == "upstreams" and method == "GET":
            return 200, {"upstream": path[1], "servers": self._upstreams(path[1])[path[1]]}
        if len(path) == 3 and path[0] == "upstreams" and path[2] == "servers":
            if method == "POST":
                return self._add(path[1], request)
        if len(path) in (4, 5) and path[0] == "upstreams" and path[2] == "servers":
            return self._server_verb(method, path[1], path[3], path[4:], request)
        if path == ["reload"] and method == "POST":
            return self._reload()
        if path[:1] == ["fleet"]:
            return self._fleet(method, path[1:], request)
        if path == ["stats"] and method == "GET":
            return 200, status.stats(view, self.sampler)
        known = _known(path)
        if known:
            return 405, {"error": f"{method} is not allowed here (allowed: {known})"}
        return 404, {"error": f"no such path /{'/'.join(path)}"}

    def _upstreams(self, name: str | None) -> dict[str, list[dict[str, Any]]]:
        if name is not None and name not in self.view.config.upstreams:
            raise LookupError(f"no upstream {name}")
        rows = status.upstreams(self.view, self.view.clock.seconds())
        found: dict[str, list[dict[str, Any]]] = {n: [] for n in self.view.config.upstreams}
        for row in rows:
            if name in (None, row["upstream"]):
                found.setdefault(row["upstream"], []).append(row)
        return found if name is None else {name: found.get(name, [])}

    def _kick(self, id: str, request: Request) -> defer.Deferred:
        body = _body(request)
        code = _int(body.get("code", _arg(request, "code") or 1001), "code")
        reason = str(body.get("reason", _arg(request, "reason") or ""))
        self._logged("kick", request, f"session={id} code={code}")
        d = self.view.kick(id, code, reason, "control API")
        return d.addCallback(lambda row: (200, dict(row, closing=True, reason=reason)))

    def _push(self, id: str, request: Request) -> defer.Deferred:
        payload, binary = _message(request)
        self._logged("push", request, f"session={id} size={len(payload)} binary={binary}")
        return self.view.push(id, payload, binary).addCallback(lambda row: (200, row))

    def _add(self, upstream: str, request: Request) -> defer.Deferred:
        body = _body(request)
        url = body.get("url")
        if not isinstance(url, str):
            raise _BadRequest('give the server as {"url": "ws://host:port"}')
        weight = _int(body.get("weight", 1), "weight")
        backup = body.get("backup", False)
        if not isinstance(backup, bool):
            raise _BadRequest("backup is true or false")
        self._logged("add_server", request, f"upstream={upstream} server={url} weight={weight}")
        d = self.view.add_server(upstream, url, weight, backup)
        return d.addCallback(lambda _: (201, {"upstream": upstream, "server": url, "added": True}))

    def _server_verb(
        self, method: str, upstream: str, text: str, rest: list[str], request: Request
    ) -> Any:
        name, url = find_server(self.view, text, upstream)
        view = self.view
        done: defer.Deferred | None = None
        answer: dict[str, Any] = {"upstream": name, "server": url}
        if not rest and method == "GET":
            rows = self._upstreams(name)[name]
            return 200, next(r for r in rows if r["server"] == url)
        if not rest and method == "DELETE":
            self._logged("remove_server", request, f"upstream={name} server={url}")
            done = view.remove_server(name, url)
            answer["removed"] = True
        elif rest == ["drain"] and method == "POST":
            body = _body(request)
            deadline = _duration(body.get("deadline"), "deadline")
            window = _duration(body.get("window", 10.0), "window")
            self._logged("drain", request, f"upstream={name} server={url} deadline={deadline}")
            done = view.drain(name, url, deadline, 10.0 if window is None else window)
            answer.update(draining=True, deadline=deadline)
            return done.addCallback(lambda count: (200, dict(answer, sessions=count)))
        elif rest == ["undrain"] and method == "POST":
            self._logged("undrain", request, f"upstream={name} server={url}")
            done = view.undrain(name, url)
            answer["draining"] = False
        elif rest == ["weight"] and method == "POST":
            weight = _int(_body(request).get("weight"), "weight")
            self._logged("weight", request, f"upstream={name} server={url} weight={weight}")
            done = view.set_weight(name, url, weight)
            answer["weight"] = weight
        if done is None:
            return 405, {"error": f"{method} is not allowed here"}
        return done.addCallback(lambda _: (200, answer))

    def _fleet(self, method: str, path: list[str], request: Request) -> Any:
        """``/fleet/...``: the gates of the fleet and their sessions ([cluster] only)."""
        fleet = self.view.fleet
        if fleet is None:
            return 404, {"error": "this gate is not in a fleet (no [cluster] in its config)"}
        if path == [] and method == "GET":
            return fleet.gates().addCallback(lambda gates: (200, {"gates": gates, "up": fleet.up}))
        if path == ["sessions"] and method == "GET":
            return fleet.sessions().addCallback(lambda rows: (200, {"sessions": rows}))
        if len(path) == 2 and path[0] == "sessions" and method == "DELETE":
            body = _body(request)
            code = _int(body.get("code", _arg(request, "code") or 1001), "code")
            reason = str(body.get("reason", _arg(request, "reason") or ""))
            check_kick(code, reason)
            self._logged("fleet_kick", request, f"session={path[1]} code={code}")
            return fleet.kick(path[1], code, reason).addCallback(lambda row: (200, row))
        if len(path) == 3 and path[0] == "sessions" and path[2] == "messages" and method == "POST":
            payload, binary = _message(request)
            self._logged("fleet_push", request, f"session={path[1]} size={len(payload)}")
            data: str | bytes = payload if binary else payload.decode("utf-8")
            return fleet.push(path[1], data).addCallback(lambda row: (200, row))
        if path == ["drain"] and method == "POST":
            body = _body(request)
            server = body.get("server")
            if not isinstance(server, str):
                raise _BadRequest('give the server as {"server": "ws://host:port"}')
            deadline = _duration(body.get("deadline"), "deadline")
            window = _duration(body.get("window", 10.0), "window")
            gate = body.get("gate")
            self._logged("fleet_drain", request, f"server={server} deadline={deadline}")
            d = fleet.drain(server, deadline, 10.0 if window is None else window, gate)
            return d.addCallback(lambda gates: (200, {"server": server, "gates": gates}))
        return 404, {"error": f"no such path /fleet/{'/'.join(path)}"}

    def _reload(self) -> defer.Deferred:
        self.log.info("control_reload")

        def refused(failure: Failure) -> tuple[int, dict[str, Any]]:
            failure.trap(ConfigError)
            problems = list(failure.value.problems)  # type: ignore[union-attr]
            return 409, {"accepted": False, "problems": problems}

        d = self.view.reload()
        return d.addCallbacks(lambda lines: (200, {"accepted": True, "changes": lines}), refused)

    def _error(self, failure: Failure) -> tuple[int, dict[str, Any]]:
        value = failure.value
        if failure.check(LookupError, KeyError):
            args = getattr(value, "args", ())
            text = str(args[0]) if args else str(value)
            return 404, {"error": text}
        if failure.check(ValueError, TypeError):
            return 400, {"error": str(value)}
        if failure.check(OverflowError):
            return 503, {"error": str(value)}
        if failure.check(ConfigError):
            return 409, {"error": "; ".join(value.problems)}  # type: ignore[union-attr]
        # Another process could not do it: a worker (RemoteError) or a gate of the fleet
        # (ClusterError, named so that the fleet's modules load only with [cluster]).
        if type(value).__name__ in ("RemoteError", "ClusterError"):
            return 502, {"error": str(value)}
        self.log.failure("control_failed", failure)
        return 500, {"error": "internal error; see the gate's log"}

    def _logged(self, verb: str, request: Request, detail: str) -> None:
        self.log.info("control_{verb} {detail}", verb=verb, detail=detail)


def _known(path: list[str]) -> str:
    """The methods of a known path (for a 405), or "" for an unknown one."""
    if path == ["sessions"] or path == ["upstreams"] or path == ["stats"]:
        return "GET"
    if path == ["reload"] or path == ["fleet", "drain"]:
        return "POST"
    if path == ["fleet"] or path == ["fleet", "sessions"]:
        return "GET"
    if len(path) == 2 and path[0] == "sessions":
        return "GET, DELETE"
    if len(path) == 3 and path[0] == "sessions" and path[2] == "messages":
        return "POST"
    if len(path) == 2 and path[0] == "upstreams":
        return "GET"
    if len(path) == 3 and path[0] == "upstreams" and path[2] == "servers":
        return "POST"
    return ""


def _arg(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _body(request: Request) -> dict[str, Any]:
    """The JSON object of the body ({} for none); _BadRequest for anything else."""
    assert request.content is not None
    request.content.seek(0)
    raw = request.content.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the body is not a JSON object")
    return body


def _message(request: Request) -> tuple[bytes, bool]:
    """The message to push, and whether it is binary, from the body (see the module docstring)."""
    header = request.getHeader(b"content-type") or b"application/json"
    kind = header.decode("latin-1").split(";")[0].strip().lower()
    if kind == "application/octet-stream" or kind.startswith("text/"):
        assert request.content is not None
        request.content.seek(0)
        return request.content.read(), kind == "application/octet-stream"
    body = _body(request)
    if isinstance(body.get("text"), str) and "binary" not in body:
        return body["text"].encode("utf-8"), False
    if isinstance(body.get("binary"), str) and "text" not in body:
        try:
            return base64.b64decode(body["binary"], validate=True), True
        except (binascii.Error, ValueError):
            raise _BadRequest("binary is not base64") from None
    raise _BadRequest('give {"text": "..."} or {"binary": "<base64>"}')


def _int(value: object, name: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadRequest(f"{name} is a whole number")
    return value


def _duration(value: object, name: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise _BadRequest(f"{name}: {e}") from None


def _json(request: Request, code: int, data: object) -> bytes:
    request.setResponseCode(code)
    return json.dumps(data, separators=(",", ":"), default=str).encode() + b"\n"


def _finish(request: Request, body: bytes | Failure) -> None:
    if isinstance(body, Failure):  # pragma: no cover  (_json cannot fail on what it is given)
        ControlResource.log.failure("control_answer_failed", body)
        return
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()


# -- where it listens --------------------------------------------------------------------------


def control_target(endpoint: str) -> tuple[str, str, int]:
    """
    Where a client connects for a server ``endpoint``: ``("unix", path, 0)`` or ``("tcp", host,
    port)`` (a wildcard address is reached on loopback).
    """
    where = binds_at(endpoint)
    if where is None:
        raise ValueError(f"{endpoint!r}: a control endpoint is unix: or tcp:")
    kind, address, port = where
    return kind, {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address), port


class _ControlService(service.MultiService):
    """The listener, after making the Unix socket's directory (mode 0700) when it is missing."""

    def __init__(self, directory: str | None) -> None:
        super().__init__()
        self.directory = directory

    def privilegedStartService(self) -> None:
        if self.directory is not None and not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        super().privilegedStartService()


def control_service(
    spec: ControlSpec, view: GateView, sampler: status.Sampler | None = None
) -> service.Service:
    """The control API's listening service; the token file is read now (OSError if it cannot)."""
    token = read_token(spec.token_file) if spec.token_file is not None else None
    site: Any = server.Site(ControlResource(view, token, sampler))
    site.requestFactory = _Request
    site.noisy = False
    site.log = _no_access_log
    kind, path, _ = control_target(spec.endpoint)
    top = _ControlService(os.path.dirname(path) if kind == "unix" else None)
    strports.service(spec.endpoint, site).setServiceParent(top)  # type: ignore[arg-type]
    return top


def _no_access_log(request: Any) -> None:
    """Verbs are logged as control_* events; reads are not logged."""

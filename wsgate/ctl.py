"""
``wsgate reload`` and ``wsgate ctl VERB ...``: the client of the running gate's control API
(:mod:`wsgate.ops.control`).

Owns finding the gate (``--control ENDPOINT``; else the ``[control]`` table of ``--config PATH``,
default ``/etc/wsgate/wsgate.toml``; else the default socket, see
:func:`wsgate.config.default_control_endpoint`), the request (the standard library's HTTP client
over the Unix socket or loopback TCP, with the bearer token of ``token_file``), what is printed
(short tables for sessions and servers, JSON for the rest or with ``--json``) and the exit status:
0 done, 1 refused or failed (a new config refused by ``reload``, no such session, the gate not
reachable), each with a one-line reason on stderr.

Must not act on the gate itself, or read more than the ``[control]`` table of a config file.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import sys
import tomllib
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["DEFAULT_CONFIG", "add_ctl_parsers", "ctl", "reload"]

DEFAULT_CONFIG = "/etc/wsgate/wsgate.toml"
TIMEOUT = 30.0


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class CtlError(Exception):
    """Why the command failed, one line (exit status 1)."""


def find_control(args: argparse.Namespace) -> tuple[str, str | None]:
    """The control endpoint and bearer token to use (see the module docstring)."""
    from wsgate.config import default_control_endpoint, read_token

    endpoint, token_file = args.control, args.token_file
    if endpoint is None:
        path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
        table = _control_table(path) if path is not None else {}
        if path is not None and table is None:
            raise CtlError(f"{path}: no [control] table: the gate has no control API")
        table = table or {}
        endpoint = table.get("endpoint") or default_control_endpoint()
        if token_file is None and table.get("token_file"):
            base = os.path.dirname(os.path.abspath(path or "."))
            token_file = os.path.join(base, os.path.expanduser(str(table["token_file"])))
    try:
        token = read_token(token_file) if token_file is not None else None
    except OSError as e:
        raise CtlError(f"cannot read the token: {token_file}: {e.strerror or e}") from None
    return str(endpoint), token


def _control_table(path: str) -> dict[str, Any] | None:
    """The raw ``[control]`` table of ``path`` (read even when the rest of the file is bad, so
    that ``reload`` can ask the gate, which says what is wrong); None when there is none."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise CtlError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CtlError(f"{path}: not valid TOML: {e}") from None
    table = data.get("control")
    return table if isinstance(table, dict) else None


def request(
    endpoint: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = TIMEOUT,
) -> tuple[int, Any]:
    """One request to the control API: (status, decoded JSON answer)."""
    from wsgate.ops.control import control_target

    kind, address, port = control_target(endpoint)
    connection: http.client.HTTPConnection = (
        _UnixConnection(address, timeout)
        if kind == "unix"
        else http.client.HTTPConnection(address, port, timeout=timeout)
    )
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except OSError as e:
        raise CtlError(
            f"cannot reach the gate's control API at {endpoint}: {e.strerror or e}"
        ) from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw or b"null")
    except ValueError:
        raise CtlError(f"the control API answered {response.status} with no JSON") from None


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    endpoint, token = find_control(args)
    code, answer = request(endpoint, token, method, path, body)
    if code >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise CtlError(f"{error or answer} ({code})")
    return answer


def reload(args: argparse.Namespace) -> int:
    """``wsgate reload``: 0 and what changed, or 1 and why the gate refused the new config."""
    try:
        endpoint, token = find_control(args)
        code, answer = request(endpoint, token, "POST", "/reload")
    except CtlError as e:
        print(f"wsgate: {e}", file=sys.stderr)
        return 1
    if code == 200 and isinstance(answer, dict) and answer.get("accepted"):
        for line in answer.get("changes") or ():
            print(line)
        return 0
    if code == 409 and isinstance(answer, dict):
        print("wsgate: new config refused; the running one stays:", file=sys.stderr)
        for problem in answer.get("problems") or [answer.get("error")]:
            print(problem, file=sys.stderr)
        return 1
    error = answer.get("error") if isinstance(answer, dict) else answer
    print(f"wsgate: reload failed: {error} ({code})", file=sys.stderr)
    return 1


# -- wsgate ctl --------------------------------------------------------------------------------


def _server_path(upstream: str, server: str) -> str:
    return "/".join(["/upstreams", quote(upstream, safe=""), "servers", quote(server, safe="")])


def _sessions(args: argparse.Namespace) -> Any:
    query = f"?{urlencode({'filter': args.filter})}" if args.filter else ""
    return _call(args, "GET", f"/sessions{query}")


def _push(args: argparse.Namespace) -> Any:
    if args.binary is not None:
        if args.binary == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.binary, "rb") as f:
                data = f.read()
        body: dict[str, str] = {"binary": base64.b64encode(data).decode("ascii")}
    elif args.text is not None:
        body = {"text": args.text}
    else:
        raise CtlError("give TEXT or --binary FILE")
    return _call(args, "POST", f"/sessions/{quote(args.id, safe='')}/messages", body)


def _upstreams(args: argparse.Namespace) -> Any:
    path = "/upstreams" + (f"/{quote(args.upstream, safe='')}" if args.upstream else "")
    return _call(args, "GET", path)


def _drain(args: argparse.Namespace) -> Any:
    body = {"deadline": args.deadline, "window": args.window}
    return _call(args, "POST", _server_path(args.upstream, args.server) + "/drain", body)


_VERBS: dict[str, Any] = {
    "sessions": _sessions,
    "session": lambda a: _call(a, "GET", f"/sessions/{quote(a.id, safe='')}"),
    "kick": lambda a: _call(
        a, "DELETE", f"/sessions/{quote(a.id, safe='')}", {"code": a.code, "reason": a.reason}
    ),
    "push": _push,
    "upstreams": _upstreams,
    "server": lambda a: _call(a, "GET", _server_path(a.upstream, a.server)),
    "drain": _drain,
    "undrain": lambda a: _call(a, "POST", _server_path(a.upstream, a.server) + "/undrain"),
    "weight": lambda a: _call(
        a, "POST", _server_path(a.upstream, a.server) + "/weight", {"weight": a.weight}
    ),
    "add-server": lambda a: _call(
        a,
        "POST",
        f"/upstreams/{quote(a.upstream, safe='')}/servers",
        {"url": a.url, "weight": a.weight, "backup": a.backup},
    ),
    "remove-server": lambda a: _call(a, "DELETE", _server_path(a.upstream, a.server)),
    "reload": lambda a: _call(a, "POST", "/reload"),
    "stats": lambda a: _call(a, "GET", "/stats"),
}


def ctl(args: argparse.Namespace) -> int:
    """``wsgate ctl VERB``: print the answer (a table or JSON); 1 with the reason on failure."""
    try:
        answer = _VERBS[args.verb](args)
    except CtlError as e:
        print(f"wsgate: {e}", file=sys.stderr)
        return 1
    if args.verb == "reload" and not answer.get("accepted", True):
        print(json.dumps(answer, indent=2))
        return 1
    print(_shown(args.verb, answer) if not args.json else json.dumps(answer, indent=2))
    return 0


def _shown(verb: str, answer: Any) -> str:
    """A short table for sessions and servers; indented JSON for the rest."""
    from wsgate.ops.console import table

    if verb == "sessions":
        rows = answer["sessions"]
        columns = ("id", "client", "route", "server", "messages_up", "messages_down")
        text = table([c.upper() for c in columns], [[r[c] for c in columns] for r in rows], "045")
        return f"{text}\n({len(rows)} session{'' if len(rows) == 1 else 's'})"
    if verb == "upstreams":
        groups = answer.get("upstreams") or {answer.get("upstream"): answer.get("servers")}
        columns = ("upstream", "server", "state", "weight", "active", "fails")
        rows = [[r[c] for c in columns] for servers in groups.values() for r in servers or ()]
        return table([c.upper() for c in columns], rows, "345")
    return json.dumps(answer, indent=2)


def _control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"the gate's config file, for its [control] table (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--control", metavar="ENDPOINT", help="the control endpoint (overrides --config)"
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="the bearer token (default: [control] token_file)"
    )


def add_ctl_parsers(commands: Any) -> None:
    """The ``reload`` and ``ctl`` subcommands, on the ``wsgate`` parser's subparsers."""
    reload_parser = commands.add_parser(
        "reload",
        help="have the running gate re-read its config file; exit 1 with the reasons if refused",
        description="Ask the running gate, through its control API, to re-read its config file "
        "(as SIGHUP does).  Prints what changed (run-time changes the file resets included) and "
        "exits 0, or prints why the new config was refused and exits 1 (the running one stays).",
    )
    _control_options(reload_parser)
    ctl_parser = commands.add_parser(
        "ctl",
        help="query and act on the running gate through its control API",
        description="Query and act on the running gate through its control API (README "
        '"Control API").  Sessions and servers print as short tables, the rest as JSON.',
    )
    _control_options(ctl_parser)
    ctl_parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    verbs = ctl_parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("sessions", help="live sessions")
    p.add_argument("filter", nargs="?", help="keep those whose route, server or client has it")
    verbs.add_parser("session", help="one session in full").add_argument("id")
    p = verbs.add_parser("kick", help="close a session (code and reason to the client)")
    p.add_argument("id")
    p.add_argument("--code", type=int, default=1001, help="close code (default 1001)")
    p.add_argument("--reason", default="", help="close reason")
    p = verbs.add_parser("push", help="send the session's client a text or binary message")
    p.add_argument("id")
    p.add_argument("text", nargs="?", help="a text message")
    p.add_argument("--binary", metavar="FILE", help="send FILE's bytes (- for stdin) as binary")
    verbs.add_parser("upstreams", help="servers of every upstream, or of one").add_argument(
        "upstream", nargs="?"
    )
    for name, text in (
        ("server", "one server's state"),
        ("undrain", "let a server take new sessions again"),
        ("remove-server", "remove a server (drained, forgotten when empty) until the next reload"),
    ):
        p = verbs.add_parser(name, help=text)
        p.add_argument("upstream")
        p.add_argument("server", help="its URL or a unique part of it (e.g. 8011)")
    p = verbs.add_parser("drain", help="no new sessions to a server; close its own by a deadline")
    p.add_argument("upstream")
    p.add_argument("server", help="its URL or a unique part of it (e.g. 8011)")
    p.add_argument("--deadline", help="close its sessions after this long (e.g. 30s)")
    p.add_argument("--window", default="10s", help="spread those closes over this (default 10s)")
    p = verbs.add_parser("weight", help="set a server's weight until the next reload")
    p.add_argument("upstream")
    p.add_argument("server", help="its URL or a unique part of it (e.g. 8011)")
    p.add_argument("weight", type=int)
    p = verbs.add_parser("add-server", help="add a server to an upstream until the next reload")
    p.add_argument("upstream")
    p.add_argument("url")
    p.add_argument("--weight", type=int, default=1)
    p.add_argument("--backup", action="store_true")
    verbs.add_parser("reload", help="re-read the config file (JSON answer)")
    verbs.add_parser("stats", help="totals and rates")

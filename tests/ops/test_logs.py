"""
The gate's log and what it shows of a request, in memory: redaction of query strings and secret
headers in the access log, ``/status.json``, the status page and the console (the backend still
gets them); the request id; one access-log line per refused handshake; the ``text`` format
(checked with a logfmt parser written here) and the ``json`` format; level filtering; the
observer twistd installs; lines forwarded from workers.  The redaction functions on their own are
in ``tests/core/test_redact.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
from types import SimpleNamespace
from typing import Any

from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import CLIENT_ADDRESS, BackendFactory, Network, Terminal, get, upgrade_request
from tests.procs import REPO
from wsgate import config as configmod
from wsgate.core.redact import (
    logfmt_value,
    redact_target,
)
from wsgate.dataplane.gateway import config_changes
from wsgate.ops.admin import admin_resource
from wsgate.ops.console import Console
from wsgate.ops.logs import GateLog, json_line, text_line, twistd_log_file
from wsgate.ops.status import Sampler
from wsgate.ops.view import LocalView
from wsgate.process.channel import Channel
from wsgate.process.pool import _WorkerProcess
from wsgate.process.worker import _ForwardedLog
from wsgate.service import Options, makeService

A = "ws://a.test:1"
# Secrets a client sends: none of them may show anywhere but at the backend.
TOKEN = "tok3n-S3CRET"
AUTH = "Bearer au7h-S3CRET"
COOKIE = "sid=c00kie-S3CRET"
SECRETS = ("S3CRET", "tok3n", "au7h", "c00kie")


def gate_config(log: dict[str, Any] | None = None, **extra: Any) -> configmod.Config:
    """One route ``/`` (with ``route`` options) to upstream ``u`` on A, plus ``extra`` tables."""
    route = extra.pop("route", {})
    data: dict[str, Any] = {
        "listen": [{"endpoint": "tcp:0"}],
        "route": [{"path": "/", "upstream": "u", **route}],
        "upstream": {"u": {"servers": [{"url": A}]}},
        **extra,
    }
    if log is not None:
        data["log"] = log
    return configmod.parse(data, "test.toml")


# -- a logfmt parser, written from https://brandur.org/logfmt and go-logfmt's grammar -------------

_LINE = re.compile(r"^(\S+) \[([^\]]*)\] (.*)$", re.S)


def parse_logfmt(text: str) -> list[tuple[str, str | None]]:
    """
    ``key=value key2="quoted \\"value\\"" bare`` -> [(key, value), ...]; a bare word is a key
    without value (None).  A key is any run of characters other than space, ``=`` and ``"``; a
    value is either quoted (JSON string escapes) or a run without space and ``"``.  Raises
    ValueError on anything else (a stray quote, a quote inside a bare value).
    """
    pairs: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == " ":
            i += 1
            continue
        start = i
        while i < n and text[i] not in ' ="':
            i += 1
        key = text[start:i]
        if not key:
            raise ValueError(f"no key at {start}: {text!r}")
        if i >= n or text[i] == " ":
            pairs.append((key, None))
            continue
        if text[i] == '"':
            raise ValueError(f"quote inside key at {i}: {text!r}")
        i += 1  # '='
        if i < n and text[i] == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if end >= n:
                raise ValueError(f"unterminated quote at {i}: {text!r}")
            pairs.append((key, json.loads(text[i : end + 1])))
            i = end + 1
            if i < n and text[i] != " ":
                raise ValueError(f"text after a quoted value at {i}: {text!r}")
        else:
            start = i
            while i < n and text[i] != " ":
                if text[i] == '"':
                    raise ValueError(f"quote inside a bare value at {i}: {text!r}")
                i += 1
            pairs.append((key, text[start:i]))
    return pairs


def text_fields(line: str) -> tuple[str, dict[str, str | None]]:
    """A text line -> (event name, its key=value fields), checking the line is logfmt."""
    match = _LINE.match(line)
    assert match is not None, line
    pairs = parse_logfmt(match.group(3))
    return pairs[0][0], {k: v for k, v in pairs[1:]}


class Captured:
    """A GateLog on the global publisher writing into memory, for one test."""

    def __init__(self, case: SynchronousTestCase, current: Any) -> None:
        self.out = io.StringIO()
        self.observer = GateLog(self.out, current)
        globalLogPublisher.addObserver(self.observer)
        case.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


# -- pure functions ---------------------------------------------------------------------------------


class FormatTests(SynchronousTestCase):
    def event(self, **fields: Any) -> dict[str, Any]:
        from twisted.logger import LogLevel

        return {
            "log_format": "thing_done id={id} by={by} reason={reason} none={none} ok={ok} "
            "list={items} took={took:.2f}s prose {prose}",
            "log_level": LogLevel.warn,
            "log_namespace": "wsgate.test",
            "log_time": 1_700_000_000.25,
            **fields,
        }

    def test_logfmt_values(self) -> None:
        """Values with spaces, quotes, = or control characters are quoted and escaped."""
        self.assertEqual(logfmt_value("plain"), "plain")
        self.assertEqual(logfmt_value("console (ops)"), '"console (ops)"')
        self.assertEqual(logfmt_value('say "hi"'), '"say \\"hi\\""')
        self.assertEqual(logfmt_value("a=b"), '"a=b"')
        self.assertEqual(logfmt_value("line\nbreak"), '"line\\nbreak"')

    def test_text_line_parses(self) -> None:
        """A text line is Twisted's classic line whose message parses as logfmt."""
        line = text_line(
            self.event(
                id=7,
                by="console (ops)",
                reason='4000 "maintenance" a=b',
                none=None,
                ok=True,
                items=["ws://a:1", "ws://b:2"],
                took=1.23456,
                prose="left as it is",
            )
        )
        assert line is not None
        self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[wsgate.test#warn\] ")
        self.assertTrue(line.endswith(" prose left as it is\n"))
        name, fields = text_fields(line.split(" prose ")[0])
        self.assertEqual(name, "thing_done")
        self.assertEqual(
            fields,
            {
                "id": "7",
                "by": "console (ops)",
                "reason": '4000 "maintenance" a=b',
                "none": "",
                "ok": "true",
                "list": "ws://a:1,ws://b:2",
                "took": "1.23s",
            },
        )

    def test_text_line_is_twisteds_classic_line(self) -> None:
        """The gate's own lines, put together without Twisted's formatter, are exactly the line
        ``formatEventAsClassicLogText`` makes of them: no level, no namespace, a message over
        several lines, an empty message, one that does not format, a time of None."""
        from wsgate.ops.logs import _classic_line

        full = dict(id=7, by="a b", reason="r", none=None, ok=True, items=[1], took=1.5)
        events = [
            self.event(**full, prose="one line"),
            self.event(**full, prose="two\nlines"),
            {k: v for k, v in self.event(**full, prose="p").items() if k != "log_level"},
            {k: v for k, v in self.event(**full, prose="p").items() if k != "log_namespace"},
            {**self.event(**full, prose="p"), "log_time": None},
            {**self.event(), "log_format": ""},
            self.event(),  # fields missing: Twisted's "Unable to format event" line
        ]
        for event in events:
            self.assertEqual(text_line(event), _classic_line(event), event)

    def test_json_line(self) -> None:
        """A JSON line has the envelope and the event's own fields with their types."""
        record = json.loads(
            json_line(
                self.event(
                    id=7,
                    by="console (ops)",
                    reason="x",
                    none=None,
                    ok=False,
                    items=("a",),
                    took=2.0,
                    prose="p",
                    message="a field named like the envelope",
                )
            )
        )
        self.assertEqual(record["time"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["event"], "thing_done")
        self.assertEqual(record["namespace"], "wsgate.test")
        self.assertTrue(record["message"].startswith('thing_done id=7 by="console (ops)"'))
        self.assertEqual(
            (record["id"], record["by"], record["none"], record["ok"], record["items"]),
            (7, "console (ops)", None, False, ["a"]),
        )
        self.assertEqual(record["field_message"], "a field named like the envelope")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_failure_and_unformattable(self) -> None:
        """A failure's traceback is kept; an event that does not format still makes a line."""
        log = Logger(namespace="wsgate.test")
        out = io.StringIO()
        observer = GateLog(out, lambda: configmod.LogSpec(format="json"))
        log.observer = observer
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("thing_failed {id}", id=3)
        log.info("broken {missing}")
        failed, broken = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(failed["event"], "thing_failed")
        self.assertIn("ZeroDivisionError", failed["traceback"])
        self.assertIn("Unable to format event", broken["message"])


# -- the gate in memory -------------------------------------------------------------------------------


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(gate_config({"redact_query_keep": ["page"]}), {A: self.backend})
        self.log = Captured(self, lambda: self.net.gateway.config.log)

    def test_session_closed_fields(self) -> None:
        """session_closed carries every access-log field, logfmt-safe, and the real request
        (query string, credentials, request id) reached the backend."""
        client = self.net.client(
            f"/chat?token={TOKEN}&page=2",
            headers={"Authorization": AUTH, "Cookie": COOKIE, "X-Request-ID": "req 42/\u00e9!"},
            protocols=["chat.v1"],
        )
        client.proto.sendMessage(b"hello")
        self.net.flush()
        self.net.advance(2)
        [session] = self.net.gateway.sessions.values()
        session.close(4000, "maintenance", by="console (ops)")
        self.net.flush()
        [request] = self.backend.requests
        self.assertEqual(request.params, {"token": [TOKEN], "page": ["2"]})
        self.assertEqual(request.headers["authorization"], AUTH)
        self.assertEqual(request.headers["cookie"], COOKIE)
        self.assertEqual(request.headers["x-request-id"], "req42")
        [line] = [li for li in self.log.lines() if "session_closed" in li]
        name, fields = text_fields(line)
        self.assertEqual(name, "session_closed")
        self.assertEqual(
            {k: fields.get(k) for k in fields if k not in ("duration",)},
            {
                "session_id": str(session.id),
                "client": CLIENT_ADDRESS.host,
                "client_port": str(CLIENT_ADDRESS.port),
                "route": "/",
                "upstream": "u",
                "server": A,
                "path": "/chat?token=REDACTED&page=2",
                "request_id": "req42",
                "subprotocol": "chat.v1",
                "extensions": "",
                "tls": "false",
                "tls_version": "",
                "sni": "",
                "messages_up": "1",
                "bytes_up": "5",
                "messages_down": "1",
                "bytes_down": "5",
                "client_close": "1000",
                "client_code": "1000",
                "client_reason": "",
                "backend_close": "1000",
                "backend_code": "1000",
                "backend_reason": "",
                "closed_by": "console (ops)",
            },
        )
        self.assertEqual(fields["duration"], "2.000s")

    def test_close_codes_and_reasons_each_side(self) -> None:
        """Each side's close code and reason are fields of their own (quoted when needed)."""
        client = self.net.client("/")
        client.proto.sendMessage(b"close 4002 backend says bye")
        self.net.flush()
        [line] = [li for li in self.log.lines() if "session_closed" in li]
        _, fields = text_fields(line)
        self.assertEqual(
            (fields["backend_code"], fields["backend_reason"], fields["closed_by"]),
            ("4002", "backend says bye", "backend"),
        )
        self.assertEqual(fields["backend_close"], "4002 'backend says bye'")
        self.assertEqual(client.close, (4002, "backend says bye"))

    def test_generated_request_id(self) -> None:
        """Without X-Request-ID the gate makes one: the backend gets it and the log line has it."""
        self.net.client("/").proto.sendClose(1000)
        self.net.flush()
        sent = self.backend.requests[0].headers["x-request-id"]
        self.assertRegex(sent, r"^[0-9a-f]{32}$")
        [line] = [li for li in self.log.lines() if "session_closed" in li]
        self.assertEqual(text_fields(line)[1]["request_id"], sent)
        other = self.net.client("/")
        self.net.flush()
        self.assertNotEqual(self.backend.requests[1].headers["x-request-id"], sent)
        other.proto.sendClose(1000)

    def test_session_opened_line(self) -> None:
        """log_session_opened's line has the same names and the redacted path."""
        import dataclasses

        self.net.gateway.config = dataclasses.replace(
            self.net.gateway.config, log_session_opened=True
        )
        self.net.client(f"/x?token={TOKEN}", headers={"X-Request-ID": "r-1"})
        [line] = [li for li in self.log.lines() if "session_opened" in li]
        _, fields = text_fields(line)
        self.assertEqual((fields["path"], fields["request_id"]), ("/x?token=REDACTED", "r-1"))


class RefusalTests(SynchronousTestCase):
    """Every refused handshake is one access-log line: session_refused or handshake_refused."""

    def refused(
        self, config: configmod.Config, send: Any, backends: dict[str, Any] | None = None
    ) -> tuple[int, list[tuple[str, dict[str, str | None]]], str]:
        net = Network(config, backends or {A: BackendFactory()})
        captured = Captured(self, lambda: net.gateway.config.log)
        raw = send(net)
        lines = [text_fields(li) for li in captured.lines()]
        access = [
            (name, f) for name, f in lines if name in ("session_refused", "handshake_refused")
        ]
        return raw.status, access, captured.out.getvalue()

    def test_client_gone_before_an_answer(self) -> None:
        """A client that leaves while its backend attempt is pending gets no answer, and still one
        line: session_refused with status 499 (NGINX's "client closed request")."""
        net = Network(gate_config(), {A: "hang"})
        captured = Captured(self, lambda: net.gateway.config.log)
        raw = net.raw(upgrade_request(f"/?token={TOKEN}", "X-Request-ID: rid-9\r\n"))
        raw.transport.loseConnection()
        net.flush()
        self.assertEqual(raw.data, b"")
        self.assertEqual(net.cancelled, net.hanging)
        access = [
            f
            for name, f in (text_fields(li) for li in captured.lines())
            if name == "session_refused"
        ]
        self.assertEqual(len(access), 1, captured.out.getvalue())
        self.assertEqual(
            (access[0]["status"], access[0]["request_id"], access[0]["path"]),
            ("499", "rid-9", "/?token=REDACTED"),
        )
        self.assertEqual(access[0]["reason"], "client left before the backend answered")

    def test_every_status(self) -> None:
        """403, 404, 405, 426, 429, 431, 400, 505, 502, 503 and 504: one line each, with status,
        client, port, redacted path and the request id when the request had one."""
        secret = f"?token={TOKEN}"
        rid = "X-Request-ID: rid-7\r\n"

        def upgrade(path: str = "/", extra: str = rid) -> Any:
            return lambda net: net.raw(upgrade_request(path + secret, extra))

        def hang_then_timeout(net: Network) -> Any:
            raw = net.raw(upgrade_request("/" + secret, rid))
            net.advance(15)
            return raw

        def second_session(net: Network) -> Any:
            net.raw(upgrade_request("/" + secret))
            return net.raw(upgrade_request("/" + secret, rid))

        cases: list[tuple[int, str, configmod.Config, Any, dict[str, Any] | None]] = [
            (
                403,
                "session_refused",
                gate_config(route={"allowed_origins": ["https://ok.test"]}),
                upgrade("/", rid + "Origin: https://evil.test\r\n"),
                None,
            ),
            (
                400,
                "session_refused",
                gate_config(route={"required_subprotocol": "chat.v1"}),
                upgrade(),
                None,
            ),
            (404, "session_refused", gate_config(route={"path": "/app"}), upgrade("/other"), None),
            (
                404,
                "handshake_refused",
                gate_config(route={"path": "/app"}),
                lambda net: net.raw(
                    f"GET /other{secret} HTTP/1.1\r\nHost: gate.test\r\n{rid}\r\n".encode()
                ),
                None,
            ),
            (
                405,
                "handshake_refused",
                gate_config(),
                lambda net: net.raw(
                    f"POST /{secret} HTTP/1.1\r\nHost: gate.test\r\n{rid}\r\n".encode()
                ),
                None,
            ),
            (
                426,
                "handshake_refused",
                gate_config(),
                lambda net: net.raw(
                    f"GET /{secret} HTTP/1.1\r\nHost: gate.test\r\n{rid}\r\n".encode()
                ),
                None,
            ),
            (
                426,
                "handshake_refused",
                gate_config(),
                lambda net: net.raw(
                    upgrade_request("/" + secret, rid).replace(
                        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"
                    )
                ),
                None,
            ),
            (
                429,
                "session_refused",
                gate_config(limits={"max_sessions_per_ip": 1}),
                second_session,
                None,
            ),
            (
                431,
                "handshake_refused",
                gate_config(limits={"max_headers": 3}),
                upgrade(),
                None,
            ),
            (
                400,
                "handshake_refused",
                gate_config(),
                lambda net: net.raw(
                    f"GET /{secret} HTTP/1.1 junk\r\nHost: gate.test\r\n{rid}\r\n".encode()
                ),
                None,
            ),
            (
                505,
                "handshake_refused",
                gate_config(),
                lambda net: net.raw(upgrade_request("/" + secret, rid).replace(b"1.1", b"1.0")),
                None,
            ),
            (502, "session_refused", gate_config(), upgrade(), {A: "refuse"}),
            (503, "session_refused", gate_config(limits={"max_sessions": 1}), second_session, None),
            (504, "session_refused", gate_config(), hang_then_timeout, {A: "hang"}),
        ]
        for status, event, config, send, backends in cases:
            answered, access, everything = self.refused(config, send, backends)
            label = f"{status} {event}"
            self.assertEqual(answered, status, label)
            self.assertEqual([name for name, _ in access], [event], label)
            fields = access[0][1]
            self.assertEqual(fields["status"], str(status), label)
            self.assertEqual(fields["client"], CLIENT_ADDRESS.host, label)
            self.assertEqual(fields["client_port"], str(CLIENT_ADDRESS.port), label)
            self.assertTrue(fields["reason"], label)
            self.assertTrue((fields["path"] or "").endswith("?token=REDACTED"), label)
            # Refused before its headers were read (431), a request has no request id yet.
            self.assertEqual(fields["request_id"], "" if status == 431 else "rid-7", label)
            if event == "session_refused":
                self.assertRegex(fields["session_id"] or "", r"^\d+$", label)
            for secret_part in SECRETS:
                self.assertNotIn(secret_part, everything, label)

    def test_backend_reason_in_the_log_only(self) -> None:
        """The log line says why the backend failed and which servers were tried; the client
        gets the generic reason."""
        status, access, _ = self.refused(
            gate_config(), lambda net: net.raw(upgrade_request("/")), {A: "refuse"}
        )
        [(_, fields)] = access
        self.assertIn("backend connect failed", fields["reason"] or "")
        self.assertEqual(fields["tried"], A)


class SecretsTests(SynchronousTestCase):
    """No query-string value and no credential shows in logs, /status.json, the page or the console."""

    def setUp(self) -> None:
        self.backend = BackendFactory()
        self.net = Network(gate_config({"level": "debug"}), {A: self.backend})
        self.log = Captured(self, lambda: self.net.gateway.config.log)
        self.json_log = io.StringIO()
        json_observer = GateLog(
            self.json_log, lambda: configmod.LogSpec(level="debug", format="json")
        )
        globalLogPublisher.addObserver(json_observer)
        self.addCleanup(globalLogPublisher.removeObserver, json_observer)
        self.sampler = Sampler(LocalView(self.net.gateway), self.net.clock)
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.root = admin_resource(LocalView(self.net.gateway), self.sampler)
        self.console = Console(LocalView(self.net.gateway), self.net.clock, self.sampler)
        self.term = Terminal(self.console)

    def assertNoSecrets(self, text: str, where: str) -> None:
        for secret in SECRETS:
            self.assertNotIn(secret, text, where)

    def test_nowhere(self) -> None:
        """A session with a token in its query, a bearer token and a cookie, then kicked."""
        client = self.net.client(
            f"/room/7?token={TOKEN}&user=ann",
            headers={"Authorization": AUTH, "Cookie": COOKIE, "Proxy-Authorization": AUTH},
        )
        client.proto.sendMessage(b"hi")
        self.net.flush()
        self.net.advance(1)
        [sid] = list(self.net.gateway.sessions)
        key = client.proto.websocket_key.decode()
        _, status_json = get(self.root, "/status.json")
        _, page = get(self.root, "/")
        screens = [
            self.term.type("gate.sessions()"),
            self.term.type(f"gate.session({sid})"),
            self.term.type("gate.stats()"),
        ]
        self.term.type(f'gate.kick({sid}, 4000, "maintenance")')
        self.net.flush()
        # What was shown says what it hides.
        self.assertIn(b"/room/7?token=REDACTED&user=REDACTED", status_json)
        self.assertIn("authorization: <redacted>", screens[1])
        self.assertIn("cookie: <redacted>", screens[1])
        self.assertIn("proxy-authorization: <redacted>", screens[1])
        self.assertIn("sec-websocket-key: <redacted>", screens[1])
        self.assertIn("Authorization: <redacted>", screens[1])  # among the forwarded headers
        self.assertIn("user-agent: AutobahnPython", screens[1])
        self.assertNotIn(key, screens[1])
        # ... and nothing of the secrets is anywhere.
        self.assertNoSecrets(status_json.decode(), "/status.json")
        self.assertNoSecrets(page.decode(), "status page")
        for screen in screens:
            self.assertNoSecrets(screen, "console")
        self.assertIn("session_closed", self.log.out.getvalue())
        self.assertNoSecrets(self.log.out.getvalue(), "text log")
        self.assertNoSecrets(self.json_log.getvalue(), "json log")
        # The backend got everything as the client sent it.
        [request] = self.backend.requests
        self.assertEqual(request.params["token"], [TOKEN])
        self.assertEqual(
            (request.headers["authorization"], request.headers["cookie"]), (AUTH, COOKIE)
        )

    def test_redact_query_off(self) -> None:
        """redact_query = false shows query strings as they came (headers stay hidden)."""
        net = Network(gate_config({"redact_query": False}), {A: BackendFactory()})
        net.client(f"/x?token={TOKEN}", headers={"Authorization": AUTH})
        [session] = net.gateway.sessions.values()
        console = Console(LocalView(net.gateway), net.clock)
        screen = Terminal(console).type(f"gate.session({session.id})")
        self.assertIn(f"/x?token={TOKEN}", screen)
        self.assertNotIn(AUTH, screen)


class LevelTests(SynchronousTestCase):
    def test_warn_drops_debug_and_info(self) -> None:
        """At level = "warn" only warn, error and critical lines are written, sessions included."""
        net = Network(gate_config({"level": "warn"}), {A: "refuse"})
        captured = Captured(self, lambda: net.gateway.config.log)
        log = Logger(namespace="wsgate.test")
        log.debug("test_debug")
        log.info("test_info")
        log.warn("test_warn")
        log.error("test_error")
        log.critical("test_critical")
        net.raw(upgrade_request("/"))  # a 502: session_refused (info) and warnings
        names = [text_fields(line)[0] for line in captured.lines()]
        self.assertIn("test_warn", names)
        self.assertIn("test_error", names)
        self.assertIn("test_critical", names)
        self.assertIn("backend_attempt_failed", names)
        self.assertIn("handshake_502", names)
        for dropped in ("test_debug", "test_info", "session_refused"):
            self.assertNotIn(dropped, names)
        levels = {re.search(r"#(\w+)\]", line).group(1) for line in captured.lines()}  # type: ignore[union-attr]
        self.assertLessEqual(levels, {"warn", "error", "critical"})

    def test_default_is_info(self) -> None:
        """By default info lines are written and debug lines are not."""
        captured = Captured(self, lambda: configmod.LogSpec())
        log = Logger(namespace="wsgate.test")
        log.debug("test_debug")
        log.info("test_info")
        self.assertEqual([text_fields(li)[0] for li in captured.lines()], ["test_info"])

    def test_reload_changes_level_and_format(self) -> None:
        """A reload's new [log] applies to the next line; the change is reported."""
        net = Network(gate_config(), {A: BackendFactory()})
        captured = Captured(self, lambda: net.gateway.config.log)
        log = Logger(namespace="wsgate.test")
        log.info("before_reload")
        new = gate_config({"level": "warn", "format": "json"})
        self.assertIn("log settings changed", config_changes(net.gateway.config, new))
        net.gateway.reload(new)
        log.info("dropped_now")
        log.warn("as_json")
        first, second = captured.lines()
        self.assertEqual(text_fields(first)[0], "before_reload")
        self.assertEqual(json.loads(second)["event"], "as_json")


class ConfigTests(SynchronousTestCase):
    def test_log_table(self) -> None:
        """[log] keys, their defaults, and bad values named by key path."""
        default = gate_config()
        self.assertEqual(default.log, configmod.LogSpec("info", "text", True, ()), "defaults")
        spec = gate_config(
            {
                "level": "error",
                "format": "json",
                "redact_query": False,
                "redact_query_keep": ["page"],
            }
        ).log
        self.assertEqual(spec, configmod.LogSpec("error", "json", False, ("page",)))
        example = configmod.load(str(REPO / "etc" / "wsgate-console.toml"))
        self.assertEqual(example.log, configmod.LogSpec("info", "json", True, ("page",)))
        e = self.assertRaises(
            configmod.ConfigError,
            gate_config,
            {"level": "verbose", "format": "xml", "redact_query": "yes", "keep": 1},
        )
        self.assertEqual(
            sorted(p.split(": ")[1] for p in e.problems),
            ["log.format", "log.keep", "log.level", "log.redact_query"],
        )


# -- wiring: twistd and workers --------------------------------------------------------------------


class TwistdLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Opening a log file sets twistd's SIGUSR1 rotation handler: restore the runner's.
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)

    def options(self, path: str, *extra: str, **twistd: Any) -> Options:
        options = Options()
        options.parseOptions(["--config", path, *extra])
        if twistd:
            options.parent = twistd  # type: ignore[attr-defined]
        return options

    def config_file(self, log: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                f'[log]\n{log}\n[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                f'[[route]]\nupstream = "u"\n[upstream.u]\nservers = [{{ url = "{A}" }}]\n'
            )
        return path

    def test_application_gets_the_observer(self) -> None:
        """Under twistd the application gets the gate's observer, writing to --logfile."""
        from twisted.internet.testing import MemoryReactorClock

        logfile = self.mktemp()
        path = self.config_file('format = "json"\nlevel = "warn"')
        top = makeService(self.options(path, nodaemon=True, logfile=logfile), MemoryReactorClock())
        application = service.Application("wsgate")
        top.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsInstance(observer, GateLog)
        self.addCleanup(observer.out.close)
        log = Logger(namespace="wsgate.test", observer=observer)
        log.info("not_written")
        log.warn("written {x}", x="a b")
        self.assertTrue(signal.getsignal(signal.SIGUSR1))  # rotation, as twistd's
        with open(logfile) as f:
            [line] = f.read().splitlines()
        self.assertEqual((json.loads(line)["event"], json.loads(line)["x"]), ("written", "a b"))

    def test_not_under_twistd_or_with_syslog(self) -> None:
        """Without twistd (tests, workers), or when twistd logs to syslog, nothing is installed."""
        from twisted.internet.testing import MemoryReactorClock

        path = self.config_file("")
        for options in (
            self.options(path),
            self.options(path, nodaemon=True, syslog=True),
            self.options(path, nodaemon=False, logfile="-"),
        ):
            application = service.Application("wsgate")
            makeService(options, MemoryReactorClock()).setServiceParent(application)
            self.assertIsNone(application.getComponent(ILogObserver))

    def test_log_file_choice(self) -> None:
        """stdout in the foreground; the --logfile, or twistd.log for a daemon."""
        import sys

        self.assertIs(twistd_log_file({"nodaemon": True}), sys.stdout)
        self.assertIs(twistd_log_file({"nodaemon": True, "logfile": "-"}), sys.stdout)
        path = self.mktemp()
        out: Any = twistd_log_file({"nodaemon": True, "logfile": path})
        self.addCleanup(out.close)
        self.assertEqual(out.path, os.path.abspath(path))

    def test_log_file_reopened_never_rotated(self) -> None:
        """The file grows past twistd's 1 MB rotation without rotating; after logrotate moves it,
        SIGUSR1 makes the gate write to a new file at the same path."""
        import signal

        previous = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = os.path.abspath(self.mktemp())
        out: Any = twistd_log_file({"nodaemon": False, "logfile": path})
        self.addCleanup(out.close)
        out.write("x" * 1_500_000 + "\n")
        out.flush()
        self.assertFalse(os.path.exists(path + ".1"))
        os.rename(path, path + ".old")  # what logrotate does
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        from twisted.internet import reactor

        calls: list[Any] = []
        self.patch(reactor, "callFromThread", lambda f, *a: calls.append(f(*a)))
        handler(signal.SIGUSR1, None)
        out.write("after\n")
        out.flush()
        with open(path) as f:
            self.assertEqual(f.read(), "after\n")
        self.assertEqual(os.path.getsize(path + ".old"), 1_500_001)


class WorkerLogTests(SynchronousTestCase):
    def test_forwarded_lines_keep_their_fields(self) -> None:
        """A worker's line reaches the parent's log with its fields: logfmt-safe text and JSON
        fields, prefixed with the worker's number; below the level it is not even sent."""
        clock = Clock()
        pool = SimpleNamespace(reactor=clock, processes={}, aggregate=None)
        parent = _WorkerProcess(pool, 2)  # type: ignore[arg-type]
        worker_channel = Channel(parent.channel.data_received, clock)
        forwarded = _ForwardedLog(SimpleNamespace(channel=worker_channel))  # type: ignore[arg-type]
        forwarded.current = lambda: configmod.LogSpec(level="info")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        log = Logger(namespace="wsgate.dataplane.gateway.Gateway", observer=forwarded)
        log.debug("worker_debug {x}", x=1)
        log.info(
            "session_closed session_id={session_id} closed_by={closed_by} tls={tls}",
            session_id=5,
            closed_by="console (ops)",
            tls=False,
        )
        log.info("odd {thing.attr}", thing=SimpleNamespace(attr="v w"))
        mine = [e for e in events if e.get("worker") == 2]
        self.assertEqual(len(mine), 2)
        line = text_line(mine[0])
        assert line is not None
        self.assertIn("] worker 2: session_closed ", line)
        pairs = parse_logfmt(line.rstrip("\n").split("worker 2: ", 1)[1])
        self.assertEqual(
            pairs,
            [
                ("session_closed", None),
                ("session_id", "5"),
                ("closed_by", "console (ops)"),
                ("tls", "false"),
            ],
        )
        record = json.loads(json_line(mine[0]))
        self.assertEqual(
            (record["event"], record["worker"], record["session_id"], record["level"]),
            ("session_closed", 2, 5, "info"),
        )
        self.assertIn("worker 2: odd v w", text_line(mine[1]) or "")


class RedirectLogTests(SynchronousTestCase):
    def test_redirect_line_redacted(self) -> None:
        """The https redirect listener logs one http_redirect line per request, query redacted
        (Twisted's combined-log line would carry the query string and the referrer)."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from wsgate.net.tls import redirect_site

        spec = configmod.LogSpec()
        site = redirect_site(8443, lambda target: redact_target(target, spec))
        site.reactor = Clock()  # the channel's timeouts, not on the global reactor
        captured = Captured(self, lambda: spec)
        site.doStart()
        self.addCleanup(site.doStop)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.9", 5555))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.9", 5555))
        channel.makeConnection(transport)
        channel.dataReceived(
            f"GET /chat?token={TOKEN} HTTP/1.1\r\nHost: gate.test\r\n"
            f"Referer: https://app.test/?token={TOKEN}\r\n\r\n".encode()
        )
        self.assertIn(b"301 Moved Permanently", transport.value())
        [line] = [li for li in captured.lines() if "http_redirect" in li]
        name, fields = text_fields(line)
        self.assertEqual(name, "http_redirect")
        self.assertEqual(
            fields,
            {
                "client": "127.0.0.9",
                "method": "GET",
                "path": "/chat?token=REDACTED",
                "status": "301",
            },
        )
        self.assertNotIn("S3CRET", captured.out.getvalue())

"""
The console in memory: the ``gate`` commands typed into a :class:`ConsoleManhole` over an insults
terminal on a ``StringTransport``, against a gate with in-memory backends and clients; the key and
password files; the console's config and its refusal to start without a way in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bcrypt
from twisted.conch.ssh import keys
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import BackendFactory, Network, Terminal, assert_tapped_hello, make_config
from wsgate import config as configmod
from wsgate.config import ConfigError
from wsgate.dataplane.tap import TAP_QUEUE
from wsgate.ops import preflight
from wsgate.ops.console import (
    Console,
    ConsoleError,
    console_service,
    load_authorized_keys,
    load_host_key,
    load_users,
    table,
)
from wsgate.ops.console.ssh import _ConsoleSession
from wsgate.ops.status import Sampler
from wsgate.ops.view import LocalView

A = "ws://a.test:1"
B = "ws://b.test:2"
PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjLz3p0fv2+Xy9ZZBZhC3gRq8qzS3j0GmH2vLz2aZ0d ops@laptop"
)


def output(screen: str) -> list[str]:
    """The lines a command printed: the screen without the echoed input line and the prompt."""
    lines = screen.replace("\r", "").split("\n")
    return [line for line in lines[1:] if line and line != ">>> "]


class ConsoleCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.net = Network(make_config([A, B]), {A: BackendFactory(), B: BackendFactory()})
        self.view = LocalView(self.net.gateway, self._reload)
        self.sampler = Sampler(self.view, self.net.clock)
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.reloads: list[str] = []
        self.console = Console(self.view, self.net.clock, self.sampler)
        self.term = Terminal(self.console)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def _reload(self) -> list[str]:
        self.reloads.append("called")
        return ["upstream u: server ws://c.test:3 added"]

    def logged(self, name: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_format", "").startswith("console_") and e.get("verb") == name
        ]


class ReadingTests(ConsoleCase):
    def test_sessions_table(self) -> None:
        """gate.sessions() lists each live session with its client address, server and counts."""
        client = self.net.client("/chat")
        client.proto.sendMessage(b"hi")
        self.net.flush()
        screen = self.term.type("gate.sessions()")
        self.assertIn("127.0.0.5:40000", screen)
        self.assertIn(A, screen)
        header = next(line for line in screen.splitlines() if line.startswith("ID"))
        self.assertEqual(
            header.split(),
            "ID CLIENT ROUTE SERVER AGE IDLE MSGS UP BYTES UP MSGS DOWN BYTES DOWN SUBPROTOCOL TLS".split(),
        )
        self.assertIn("(1 session)", screen)

    def test_sessions_filter(self) -> None:
        """A filter keeps the sessions whose server, route or client contains it."""
        self.net.client("/")
        self.net.client("/")
        screen = self.term.type('gate.sessions("b.test")')
        self.assertIn(B, screen)
        self.assertNotIn(A, screen.split("gate.sessions")[-1])
        self.assertIn("(1 of 2 sessions)", screen)

    def test_session_detail(self) -> None:
        """gate.session(id) shows path, forwarded headers and ping state."""
        self.net.client("/room/7?user=ann")
        sid = next(iter(self.net.gateway.sessions))
        screen = self.term.type(f"gate.session({sid})")
        self.assertIn("/room/7?user=REDACTED", screen)
        self.assertIn("X-Forwarded-For: 127.0.0.5", screen)
        self.assertIn("ping rtt", screen)
        self.assertIn("pings off", screen)

    def test_unknown_session(self) -> None:
        """An unknown id is one readable line, not a traceback."""
        screen = self.term.type("gate.session(99)")
        self.assertEqual(output(screen), ["no live session 99"])
        self.assertTrue(screen.endswith(">>> "))

    def test_upstreams_and_stats(self) -> None:
        """gate.upstreams() shows every server's state; gate.stats() totals and handshakes."""
        client = self.net.client("/")
        client.proto.sendMessage(b"12345")
        self.net.flush()
        self.net.advance(1)
        screen = self.term.type("gate.upstreams()")
        self.assertRegex(screen, r"u\s+ws://a\.test:1\s+up\s+1\s+1\s+1\s+0\s+never")
        screen = self.term.type("gate.stats()")
        self.assertIn("1 active, 1 opened, 0 closed", screen)
        self.assertIn("ok 1", screen)
        self.assertIn("client->backend  1 messages, 5 B", screen)

    def test_help(self) -> None:
        """gate.help() lists every command."""
        screen = self.term.type("gate.help()")
        for command in (
            "sessions",
            "session(id)",
            "kick",
            "upstreams",
            "drain",
            "undrain",
            "weight",
            "reload",
            "stats",
            "tap",
            "top",
        ):
            self.assertIn(f"gate.{command}", screen)

    def test_table_alignment(self) -> None:
        """Columns line up; the right-aligned ones end together."""
        text = table(["ID", "NAME"], [(1, "a"), (100, "long")], right="0")
        self.assertEqual(text.splitlines(), [" ID  NAME", "  1  a", "100  long"])


class ActingTests(ConsoleCase):
    def test_kick(self) -> None:
        """gate.kick() closes the session with the code and reason, and logs who did it."""
        client = self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        self.term.type(f'gate.kick({sid}, 4000, "maintenance")')
        self.net.flush()
        self.assertEqual(client.close, (4000, "maintenance"))
        self.assertEqual(self.net.gateway.sessions, {})
        [event] = self.logged("kick")
        self.assertEqual(event["user"], "alice")
        self.assertIn(f"session={sid}", event["detail"])

    def test_kick_refuses_reserved_code(self) -> None:
        """Codes that cannot go on the wire (1005, 1006) are refused and the session stays."""
        self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        screen = self.term.type(f"gate.kick({sid}, 1006)")
        self.assertIn("1006 cannot be sent", screen)
        self.assertIn(sid, self.net.gateway.sessions)

    def test_drain_undrain_weight_call_the_gateway(self) -> None:
        """drain/undrain/weight resolve a server from part of its URL and call the Gateway."""
        calls: list[tuple[Any, ...]] = []
        gateway: Any = self.net.gateway
        gateway.drain = lambda url, deadline=None, window=10.0, upstream=None: calls.append(
            ("drain", url, deadline, upstream)
        )
        gateway.undrain = lambda url, upstream=None: calls.append(("undrain", url, upstream))
        gateway.set_weight = lambda url, w, upstream=None: calls.append(
            ("weight", url, w, upstream)
        )
        self.term.type('gate.drain("b.test", "30s")')
        self.term.type('gate.undrain("ws://b.test:2")')
        self.term.type('gate.weight("a.test", 5)')
        self.assertEqual(
            calls, [("drain", B, 30.0, "u"), ("undrain", B, "u"), ("weight", A, 5, "u")]
        )
        self.assertEqual([e["user"] for e in self.logged("drain")], ["alice"])
        self.assertEqual(len(self.logged("undrain")), 1)
        self.assertEqual(len(self.logged("weight")), 1)

    def test_drain_ambiguous_server(self) -> None:
        """A server text matching several servers names them and changes nothing."""
        screen = self.term.type('gate.drain("test")')
        self.assertIn("names 2 servers", screen)
        self.assertEqual(self.logged("drain"), [])

    def test_reload(self) -> None:
        """gate.reload() calls the service's reload and prints the changes; a refused config
        prints its problems."""
        screen = self.term.type("gate.reload()")
        self.assertIn("server ws://c.test:3 added", screen)
        self.assertEqual(self.reloads, ["called"])

        def refused() -> list[str]:
            raise ConfigError(["etc/x.toml: listen: at least one [[listen]] table is required"])

        self.view._reload = refused
        screen = self.term.type("gate.reload()")
        self.assertIn("new config refused", screen)
        self.assertIn("at least one [[listen]]", screen)
        self.assertEqual(len(self.logged("reload")), 2)


class LiveViewTests(ConsoleCase):
    def test_tap_shows_messages_until_ctrl_c(self) -> None:
        """gate.tap(id) streams both directions with type, size and preview; Ctrl-C ends it."""
        client = self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        screen = self.term.type(f"gate.tap({sid})")
        self.assertIn("Ctrl-C to stop", screen)
        self.assertNotIn(">>> ", screen.split("Ctrl-C to stop")[-1])
        client.proto.sendMessage(b"hello tap")
        client.proto.sendMessage(b"\x00\x01\x02", isBinary=True)
        self.net.flush()
        self.net.advance(0.1)
        screen = self.term.screen()
        assert_tapped_hello(self, screen)
        screen = self.term.key(b"\x03")
        self.assertIn("tap of session", screen)
        self.assertIn("4 shown, 0 dropped", screen)
        self.assertTrue(screen.rstrip().endswith(">>>"))
        relay: Any = self.net.gateway.sessions[sid].up
        self.assertIsNone(relay.tap)

    def test_tap_drops_and_counts(self) -> None:
        """A tap that cannot keep up drops messages and counts them; the session is not slowed."""
        client = self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        self.term.type(f"gate.tap({sid})")
        count = TAP_QUEUE + 5
        for i in range(count):
            client.proto.sendMessage(str(i).encode())
        self.net.flush()
        self.assertEqual(len(client.received), count)
        for _ in range(20):
            self.net.advance(0.1)
        self.assertIn("messages not shown", self.term.screen())
        screen = self.term.key(b"\x03")
        self.assertIn(f"{TAP_QUEUE} shown, {2 * count - TAP_QUEUE} dropped", screen)

    def test_tap_ends_with_the_session(self) -> None:
        """The tap of a session that closes ends by itself and says how it closed."""
        client = self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        self.term.type(f"gate.tap({sid})")
        client.proto.sendClose(1000, "done")
        self.net.flush()
        self.net.advance(0.1)
        screen = self.term.screen()
        self.assertIn(f"session {sid} closed: client 1000 'done'", screen)
        self.assertIsNone(self.term.manhole.live)

    def test_top(self) -> None:
        """gate.top() redraws the busiest sessions and the servers every second until Ctrl-C."""
        client = self.net.client("/")
        screen = self.term.type("gate.top()")
        self.assertIn("wsgate top", screen)
        self.assertIn("127.0.0.5:40000", screen)
        self.assertIn("UPSTREAM", screen)
        client.proto.sendMessage(b"x")
        self.net.flush()
        self.term.transport.clear()
        self.net.advance(1)
        self.assertIn("wsgate top", self.term.screen())
        self.assertIn("top stopped", self.term.key(b"q"))
        self.term.transport.clear()
        self.net.advance(2)
        self.assertEqual(self.term.screen(), "")

    def test_connection_lost_stops_live_view(self) -> None:
        """A console that disconnects during a tap removes the tap from the relay."""
        self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        self.term.type(f"gate.tap({sid})")
        relay: Any = self.net.gateway.sessions[sid].up
        self.assertIsNotNone(relay.tap)
        self.term.protocol.connectionLost(None)
        self.assertIsNone(relay.tap)


class KeyFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def test_authorized_keys(self) -> None:
        """Keys and their comments are read; blank and # lines are skipped."""
        found = load_authorized_keys(self.write(f"# ops\n\n{PUBLIC_KEY}\n"))
        self.assertEqual([c for _, c in found], ["ops@laptop"])
        self.assertEqual(found[0][0].sshType(), b"ssh-ed25519")

    def test_authorized_keys_options_refused(self) -> None:
        """A key line with options is refused rather than its restriction silently ignored."""
        path = self.write(f'from="10.0.0.1" {PUBLIC_KEY}\n')
        e = self.assertRaises(ConsoleError, load_authorized_keys, path)
        self.assertIn(f"{path}:1: not a public key line", str(e))

    def test_users_bcrypt_only(self) -> None:
        """The users file takes bcrypt hashes (htpasswd -B) and refuses plain passwords."""
        hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
        self.assertEqual(load_users(self.write(f"ann:{hashed}\n")), {b"ann": hashed.encode()})
        path = self.write("bob:secret\n")
        e = self.assertRaises(ConsoleError, load_users, path)
        self.assertIn("not a bcrypt hash", str(e))

    def test_host_key_made_once(self) -> None:
        """The host key is made on first start (mode 0600) and the same key is read afterwards."""
        path = self.mktemp()
        first = load_host_key(path)
        self.assertEqual(Path(path).stat().st_mode & 0o777, 0o600)
        second = load_host_key(path)
        self.assertEqual(first.fingerprint(), second.fingerprint())
        self.assertFalse(second.isPublic())

    def test_host_key_public_refused(self) -> None:
        """A public key where the host key should be is refused."""
        path = self.write(PUBLIC_KEY)
        self.assertRaises(ConsoleError, load_host_key, path)

    def test_no_way_in(self) -> None:
        """The console refuses to start when its files hold no key and no user."""
        spec = configmod.ConsoleSpec(
            endpoint="tcp:0", host_key=self.mktemp(), authorized_keys=self.write("# none\n")
        )
        console = Console(LocalView(Network(make_config([A]), {}).gateway), MemoryReactorClock())
        e = self.assertRaises(ConsoleError, console_service, spec, console, MemoryReactorClock())
        self.assertIn("holds no public key, so it lets no one in", str(e))

    def test_service(self) -> None:
        """With a key, the console is a strports service on its endpoint."""
        spec = configmod.ConsoleSpec(
            endpoint="tcp:0:interface=127.0.0.1",
            host_key=self.mktemp(),
            authorized_keys=self.write(PUBLIC_KEY + "\n"),
        )
        console = Console(LocalView(Network(make_config([A]), {}).gateway), MemoryReactorClock())
        svc: Any = console_service(spec, console, MemoryReactorClock())
        self.assertEqual(svc.endpoint._interface, "127.0.0.1")
        self.assertTrue(Path(spec.host_key).exists())
        self.assertEqual(keys.Key.fromFile(spec.host_key).sshType(), b"ssh-ed25519")


class ConsoleConfigTests(SynchronousTestCase):
    def parse(self, console: dict[str, Any]) -> configmod.Config:
        base = self.mktemp()
        Path(base).mkdir()
        Path(base, "keys").write_text(PUBLIC_KEY + "\n")
        return configmod.parse(
            {
                "listen": [{"endpoint": "tcp:0"}],
                "route": [{"upstream": "u"}],
                "upstream": {"u": {"servers": [{"url": A}]}},
                "console": console,
                "admin": {"endpoint": "tcp:9020:interface=127.0.0.1"},
            },
            str(Path(base, "gate.toml")),
        )

    def test_parsed(self) -> None:
        """[console] paths are made absolute, relative to the config file; [admin] is read."""
        config = self.parse(
            {"endpoint": "tcp:2222", "authorized_keys": "keys", "host_key": "host_key"}
        )
        assert config.console is not None and config.admin is not None
        self.assertTrue(config.console.authorized_keys.endswith("/keys"))  # type: ignore[union-attr]
        self.assertTrue(Path(config.console.host_key).is_absolute())
        self.assertEqual(config.admin.endpoint, "tcp:9020:interface=127.0.0.1")

    def test_no_way_to_log_in(self) -> None:
        """A [console] without authorized_keys and users is refused."""
        e = self.assertRaises(
            ConfigError, self.parse, {"endpoint": "tcp:2222", "host_key": "host_key"}
        )
        self.assertIn("console: give authorized_keys or users", str(e))

    def test_problems(self) -> None:
        """Missing files, a directory as host key and unknown keys are named."""
        e = self.assertRaises(
            ConfigError,
            self.parse,
            {
                "endpoint": "tcp:2222",
                "authorized_keys": "nope",
                "host_key": ".",
                "password": "x",
            },
        )
        text = str(e)
        self.assertIn("console.authorized_keys: ", text)
        self.assertIn("console.host_key: ", text)
        self.assertIn("a directory, not a key file", text)
        self.assertIn("console.password: unknown key", text)


class FriendlyErrorTests(ConsoleCase):
    """Every mistake at the prompt is one line, never a traceback (table of typed lines)."""

    def test_errors_are_one_line(self) -> None:
        """Typos, wrong argument counts, unknown ids and servers, bad values: one clear line."""
        self.net.client("/")
        cases = [
            ("gate.sesions()", "no such command gate.sesions; did you mean gate.sessions?"),
            ("gate.frobnicate()", "no such command gate.frobnicate; see gate.help()"),
            ("gat.sessions()", "no such name gat; did you mean gate?"),
            ("gate.session(99)", "no live session 99"),
            ("gate.kick(99)", "no live session 99"),
            (
                "gate.kick()",
                "gate.kick() missing 1 required positional argument: 'id'; "
                "usage: gate.kick(id, code=1001, reason='')",
            ),
            (
                "gate.upstreams(1)",
                "gate.upstreams() takes 1 positional argument but 2 were given; "
                "usage: gate.upstreams()",
            ),
            ('gate.drain("nope")', "'nope' names no server"),
            ('gate.drain("a.test", "soon")', "'soon' is not a duration such as 30s, 250ms, 2m"),
            ('gate.weight("a.test", 0)', "a weight is a whole number of at least 1"),
            ("gate.sessions(", None),  # incomplete: the prompt waits for more
            (")", None),
            ("1/0", "ZeroDivisionError: division by zero"),
            ("gate.sessions()) ", "syntax error: unmatched ')' (column 16)"),
            ("exit()", "exit() does not end the console: press Ctrl-D"),
        ]
        for typed, expected in cases:
            screen = self.term.type(typed)
            self.assertNotIn("Traceback", screen, typed)
            if expected is not None:
                self.assertEqual(output(screen), [expected], typed)
        self.assertFalse(self.term.transport.disconnecting)

    def test_error_inside_a_command(self) -> None:
        """An error raised inside a command (not a typo) is its type and message on one line."""

        def broken() -> None:
            raise RuntimeError("backend table corrupt")

        self.term.manhole.namespace["broken"] = broken
        screen = self.term.type("broken()")
        self.assertEqual(output(screen), ["RuntimeError: backend table corrupt"])


class LineEditingTests(ConsoleCase):
    """The editing keys of a shell prompt, checked by what Enter then runs."""

    def run_keys(self, *keys: bytes) -> list[str]:
        ran: list[bytes] = []
        manhole = self.term.manhole
        manhole.lineReceived = ran.append  # type: ignore[method-assign]
        self.term.key(b"".join(keys) + b"\r")
        return [line.decode() for line in ran]

    def test_keys(self) -> None:
        """Ctrl-A/E, Home/End, Ctrl-B/F, Ctrl-U/W/K, Ctrl-D on text, Backspace edit the line."""
        cases = [
            ((b"abc", b"\x01", b"X", b"\x05", b"Y"), "XabcY"),  # Ctrl-A, Ctrl-E
            ((b"abc", b"\x1b[H", b"X", b"\x1b[F", b"Y"), "XabcY"),  # Home, End
            ((b"abc", b"\x1b[1~", b"X", b"\x1b[4~", b"Y"), "XabcY"),  # Home, End (vt220)
            ((b"abc", b"\x02\x02", b"X", b"\x06", b"Y"), "aXbYc"),  # Ctrl-B, Ctrl-F
            ((b"gate.sessions()", b"\x15", b"1"), "1"),  # Ctrl-U
            ((b"abc def", b"\x02\x02\x02", b"\x15"), "def"),  # Ctrl-U keeps what follows
            ((b"gate.kick(1, 4000)", b"\x17", b"1001)"), "gate.kick(1, 1001)"),  # Ctrl-W
            ((b"one two  ", b"\x17"), "one "),  # Ctrl-W takes the blanks after the word too
            ((b"abc def", b"\x01\x06\x06\x06", b"\x0b"), "abc"),  # Ctrl-K
            ((b"abc", b"\x01", b"\x04"), "bc"),  # Ctrl-D deletes on a non-empty line
            ((b"abc", b"\x7f"), "ab"),  # Backspace
        ]
        for pressed, expected in cases:
            self.assertEqual(self.run_keys(*pressed), [expected], pressed)

    def test_no_warnings_logged(self) -> None:
        """No key writes to the gate's log (Ctrl-U/W/K used to log a warning each)."""
        self.run_keys(b"abc", b"\x15\x17\x0b\x0e\x10\x07\x1bOP\x1b[15~\xc3\xa9")
        warnings = [e for e in self.events if e.get("log_level") and e["log_level"].name != "info"]
        self.assertEqual(warnings, [])

    def test_ctrl_l_redraws(self) -> None:
        """Ctrl-L clears the screen and redraws the prompt with the line typed so far."""
        self.term.key(b"gate.st")
        screen = self.term.transport.value()
        self.term.transport.clear()
        self.term.protocol.dataReceived(b"\x0c")
        screen = self.term.transport.value()
        self.assertIn(b"\x1b[2J", screen)
        self.assertTrue(screen.endswith(b">>> gate.st"), screen)

    def test_ctrl_d_on_empty_line_leaves(self) -> None:
        """Ctrl-D on an empty line ends the session."""
        self.term.key(b"\x04")
        self.assertTrue(self.term.transport.disconnecting)

    def test_history(self) -> None:
        """Ctrl-P and the up arrow bring back the previous line."""
        self.term.type("gate.stats()")
        self.assertEqual(self.run_keys(b"\x10"), ["gate.stats()"])


class CompletionTests(ConsoleCase):
    def line(self) -> str:
        return b"".join(self.term.manhole.lineBuffer).decode()

    def test_completes_gate_commands(self) -> None:
        """Tab completes a unique command, up to the common part of several, and lists them."""
        self.term.key(b"gate.upst\t")
        self.assertEqual(self.line(), "gate.upstreams()")  # no arguments: the call is whole
        self.term.key(b"\x15gate.kic\t")
        self.assertEqual(self.line(), "gate.kick(")
        self.term.key(b"\x15gate.se\t")
        self.assertEqual(self.line(), "gate.session")
        screen = self.term.key(b"\t")
        self.assertIn("gate.session  gate.sessions", screen)
        self.assertEqual(self.line(), "gate.session")
        self.term.key(b"\x15ga\t")
        self.assertEqual(self.line(), "gate")

    def test_hides_private_names(self) -> None:
        """gate.<Tab> lists the commands, not the private attributes."""
        screen = self.term.key(b"gate.\t")
        self.assertIn("gate.sessions", screen)
        self.assertIn("gate.drain", screen)
        self.assertNotIn("gate._", screen)

    def test_tab_indents_and_inside_strings(self) -> None:
        """At the start of a line Tab indents; inside a string it completes nothing."""
        self.term.key(b"\t")
        self.assertEqual(self.line(), "    ")
        self.term.key(b'\x15gate.drain("ws\t')
        self.assertEqual(self.line(), 'gate.drain("ws')


class FakeProcess:
    """The process side of an SSH channel: what a command printed and how it ended."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.status: int | None = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        assert self.status is None, "ended twice"
        self.status = reason.value.exitCode


class CommandTests(ConsoleCase):
    """``ssh host 'cmd'`` and piped input, through the session object the SSH channel uses."""

    def session(self) -> _ConsoleSession:
        session = _ConsoleSession(None)
        session.console = self.console
        session.user = "robot"
        return session

    def test_exec(self) -> None:
        """An exec request runs the command, prints its output and exits 0."""
        self.net.client("/")
        process = FakeProcess()
        self.session().execCommand(process, b"gate.sessions()")
        self.assertIn(b"(1 session)", process.out)
        self.assertEqual(process.err, b"")
        self.assertEqual(process.status, 0)

    def test_exec_error(self) -> None:
        """A failing command prints one error line on stderr and exits 1."""
        process = FakeProcess()
        self.session().execCommand(process, b"gate.sesions()")
        self.assertEqual(process.out, b"")
        self.assertEqual(
            process.err, b"no such command gate.sesions; did you mean gate.sessions?\n"
        )
        self.assertEqual(process.status, 1)

    def test_exec_verb_logged(self) -> None:
        """A verb run by exec is logged with the user's name like one typed at the prompt."""
        process = FakeProcess()
        self.session().execCommand(process, b'gate.weight("a.test", 4)')
        self.assertEqual(process.status, 0, process.err)
        self.assertEqual([e["user"] for e in self.logged("weight")], ["robot"])

    def test_piped_lines(self) -> None:
        """A shell without a pty runs each line as it comes, a block at EOF, and exits at EOF
        with 1 when any line failed."""
        process = FakeProcess()
        session = self.session()
        session.openShell(process)
        process.transport.write(b"x = 2\r\nprint(x * 21)\n")
        self.assertEqual(process.out, b"42\n")
        process.transport.write(b"gate.session(7)\nfor i in range(2):\n    print(i)\n")
        self.assertEqual(process.err, b"no live session 7\n")
        self.assertIsNone(process.status)
        session.eofReceived()
        self.assertEqual(process.out, b"42\n0\n1\n")
        self.assertEqual(process.status, 1)

    def test_piped_waits_for_deferred(self) -> None:
        """A command answered later (a Deferred, as with workers) is printed before the next
        line runs, and the run ends after it."""
        from twisted.internet.defer import Deferred

        answer: Deferred[str] = Deferred()
        process = FakeProcess()
        session = self.session()
        session.openShell(process)
        session._commands.interpreter.locals["later"] = lambda: answer  # type: ignore[union-attr]
        process.transport.write(b"later()\nprint('after')\n")
        session.eofReceived()
        self.assertEqual((process.out, process.status), (b"", None))
        answer.callback("first")
        self.assertEqual(process.out, b"'first'\nafter\n")
        self.assertEqual(process.status, 0)

    def test_piped_input_bounded(self) -> None:
        """More than 1 MiB waiting to run (a line without an end) is refused with status 1."""
        process = FakeProcess()
        session = self.session()
        session.openShell(process)
        for _ in range(20):
            process.transport.write(b"#" * 65536)
        self.assertIn(b"input refused", process.err)
        self.assertEqual(process.status, 1)

    def test_exec_tap_until_session_ends(self) -> None:
        """gate.tap(id) by exec streams until the session closes, then exits 0."""
        client = self.net.client("/")
        sid = next(iter(self.net.gateway.sessions))
        process = FakeProcess()
        self.session().execCommand(process, f"gate.tap({sid})".encode())
        client.proto.sendMessage(b"hello tap")
        self.net.flush()
        self.net.advance(0.1)
        self.assertIsNone(process.status)
        client.proto.sendClose(1000)
        self.net.flush()
        self.net.advance(0.1)
        self.assertIn(b"'hello tap'", process.out)
        self.assertIn(b"closed: client 1000", process.out)
        self.assertEqual(process.status, 0)


class StartAndCheckAgreeTests(SynchronousTestCase):
    """``wsgate check`` refuses exactly the console files that the start refuses."""

    def test_table(self) -> None:
        """Each case: whether check finds a problem equals whether the console fails to start."""
        good_key = PUBLIC_KEY + "\n"
        good_user = "ann:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() + "\n"
        cases = [
            ("one key", good_key, None, None, True),
            ("one empty keys file", "", None, None, False),
            ("empty keys file and a user", "", good_user, None, False),
            ("a key and an empty users file", good_key, "# nobody\n", None, False),
            ("a key and a user", good_key, good_user, None, True),
            ("a garbage host key", good_key, None, "not a key", False),
            ("a public key as host key", good_key, None, PUBLIC_KEY, False),
        ]
        for name, keys_text, users_text, host_key_text, starts in cases:
            base = Path(self.mktemp())
            base.mkdir()
            table: dict[str, Any] = {"endpoint": "tcp:0:interface=127.0.0.1", "host_key": "hk"}
            if keys_text is not None:
                (base / "keys").write_text(keys_text)
                table["authorized_keys"] = "keys"
            if users_text is not None:
                (base / "users").write_text(users_text)
                table["users"] = "users"
            if host_key_text is not None:
                (base / "hk").write_text(host_key_text)
            config = configmod.parse(
                {
                    "listen": [{"endpoint": "tcp:0"}],
                    "route": [{"upstream": "u"}],
                    "upstream": {"u": {"servers": [{"url": A}]}},
                    "console": table,
                },
                str(base / "gate.toml"),
            )
            problems = preflight.problems(config)
            console = Console(Network(make_config([A]), {}).gateway, MemoryReactorClock())
            assert config.console is not None
            try:
                console_service(config.console, console, MemoryReactorClock())
                started = True
            except ConsoleError:
                started = False
            self.assertEqual(started, starts, name)
            self.assertEqual(not problems, starts, (name, problems))

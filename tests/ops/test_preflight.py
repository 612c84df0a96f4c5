"""
``wsgate check``: beyond the schema, what would fail at start (endpoints Twisted cannot parse,
listeners that collide, console files that let no one in or cannot be read) is an error naming
file, key and reason; an admin listener beyond loopback is a ``warning:`` with exit status 0.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.trial.unittest import SynchronousTestCase

from tests.procs import REPO
from wsgate import cli
from wsgate import config as configmod

EXAMPLES = sorted(glob.glob(str(REPO / "etc" / "*.toml")))

ROUTE = """
[[route]]
upstream = "u"
[upstream.u]
servers = [{ url = "ws://127.0.0.1:9" }]
"""


def _public_key_line() -> str:
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return key.public().toString("openssh").decode() + " ops@test\n"


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "gate.toml")

    def check(self, text: str) -> tuple[int, list[str]]:
        Path(self.path).write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = cli.check(self.path)
        return status, out.getvalue().splitlines()

    def listen(self, *endpoints: str, extra: str = "") -> str:
        tables = "".join(f'[[listen]]\nendpoint = "{e}"\n' for e in endpoints)
        return tables + ROUTE + extra

    def assert_problem(self, text: str, key: str, reason: str) -> None:
        status, lines = self.check(text)
        self.assertEqual(status, 1, lines)
        self.assertTrue(
            any(
                re.fullmatch(
                    rf"{re.escape(self.path)}: {re.escape(key)}: .*{re.escape(reason)}.*", line
                )
                for line in lines
            ),
            lines,
        )

    def test_examples_pass(self) -> None:
        """Every shipped etc/*.toml passes check: ok, exit 0, no warning."""
        self.assertTrue(EXAMPLES)
        for example in EXAMPLES:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = cli.check(example)
            self.assertEqual((status, out.getvalue()), (0, "ok\n"), example)

    def test_console_example_with_a_key(self) -> None:
        """etc/wsgate-console.toml with its [console] table uncommented and a key added passes."""
        text = (REPO / "etc" / "wsgate-console.toml").read_text()
        for line in ("[console]", 'endpoint = "tcp:2222', 'authorized_keys = "', 'host_key = "'):
            self.assertIn(f"# {line}", text)
            text = text.replace(f"# {line}", line, 1)
        Path(self.dir, "console_keys").write_text("# ops\n" + _public_key_line())
        text = text.replace('host_key = "../var/console_host_key"', 'host_key = "var/host_key"')
        self.assertEqual(self.check(text), (0, ["ok"]))

    def test_same_endpoint_twice(self) -> None:
        """One endpoint in two [[listen]] tables is an error on the second."""
        self.assert_problem(
            self.listen("tcp:8020", "tcp:8020"),
            "listen[1].endpoint",
            "the same endpoint as listen[0]",
        )

    def test_overlapping_interfaces(self) -> None:
        """One port on a wildcard and a specific address, or on tcp6 :: and IPv4, collides;
        different ports, distinct addresses or port 0 do not."""
        for first, second in [
            ("tcp:8020", "tcp:8020:interface=127.0.0.1"),
            ("tcp:8020:interface=127.0.0.1", "tcp:8020:interface=0.0.0.0"),
            ("tcp6:8020", "tcp:8020:interface=127.0.0.1"),
            ("tcp6:8020:interface=\\\\:\\\\:1", "tcp6:8020"),
            ("tcp:8020", "haproxy:tcp:8020"),
        ]:
            self.assert_problem(self.listen(first, second), "listen[1].endpoint", "overlaps")
        for first, second in [
            ("tcp:8020", "tcp:8021"),
            ("tcp:8020:interface=127.0.0.1", "tcp:8020:interface=127.0.0.2"),
            ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
            ("tcp6:8020:interface=\\\\:\\\\:1", "tcp:8020:interface=127.0.0.1"),
        ]:
            self.assertEqual(self.check(self.listen(first, second)), (0, ["ok"]), (first, second))

    def test_listener_against_admin_and_redirect(self) -> None:
        """The admin, console and redirect listeners count: the same port twice is an error."""
        extra = '[admin]\nendpoint = "tcp:8020:interface=127.0.0.1"\n'
        self.assert_problem(self.listen("tcp:8020", extra=extra), "admin.endpoint", "overlaps")
        extra = '[[redirect]]\nendpoint = "tcp:8020"\n'
        self.assert_problem(self.listen("tcp:8020", extra=extra), "redirect[0].endpoint", "same")

    def test_unparsable_endpoint(self) -> None:
        """An endpoint string Twisted's parser refuses (unknown argument, bad backlog)."""
        self.assert_problem(
            self.listen("tcp:8020:interfac=127.0.0.1"), "listen[0].endpoint", "interfac"
        )
        self.assert_problem(
            self.listen("tcp:8020:backlog=many"), "listen[0].endpoint", "not a valid endpoint"
        )

    def console(self, keys_text: str | None, users_text: str | None = None) -> str:
        lines = ["[console]", 'endpoint = "tcp:0:interface=127.0.0.1"', 'host_key = "var/hk"']
        if keys_text is not None:
            Path(self.dir, "keys").write_text(keys_text)
            lines.append('authorized_keys = "keys"')
        if users_text is not None:
            Path(self.dir, "users").write_text(users_text)
            lines.append('users = "users"')
        return self.listen("tcp:0", extra="\n".join(lines) + "\n")

    def test_console_files(self) -> None:
        """An empty (or comments-only) authorized_keys or users file is an error, and so is a
        line the console would refuse; a file with a key passes."""
        self.assertEqual(self.check(self.console(_public_key_line())), (0, ["ok"]))
        self.assert_problem(
            self.console("# nobody\n"), "console.authorized_keys", "holds no public key"
        )
        self.assert_problem(self.console(_public_key_line(), ""), "console.users", "holds no user")
        self.assert_problem(
            self.console("not a key\n"), "console.authorized_keys", "not a public key"
        )
        self.assert_problem(
            self.console(None, "ops:secret\n"), "console.users", "not a bcrypt hash"
        )

    def test_unreadable_files(self) -> None:
        """A console file or certificate that does not exist is an error naming its key."""
        text = self.console(_public_key_line()).replace('"keys"', '"missing_keys"')
        self.assert_problem(text, "console.authorized_keys", "No such file")
        if os.geteuid() != 0:  # root reads any file
            Path(self.dir, "keys").chmod(0)
            self.assert_problem(
                self.console(None).replace(
                    'host_key = "var/hk"', 'host_key = "var/hk"\nauthorized_keys = "keys"'
                ),
                "console.authorized_keys",
                "Permission denied",
            )

    def test_admin_beyond_loopback_warns(self) -> None:
        """An admin listener on every address or a non-loopback address: a warning line naming
        admin.endpoint, still exit 0 and ok; on loopback or a unix socket: no warning."""
        for endpoint in ("tcp:9020", "tcp6:9020", "tcp:9020:interface=192.0.2.1"):
            status, lines = self.check(
                self.listen("tcp:0", extra=f'[admin]\nendpoint = "{endpoint}"\n')
            )
            self.assertEqual(status, 0, lines)
            self.assertEqual(len(lines), 2, lines)
            self.assertTrue(lines[0].startswith(f"warning: {self.path}: admin.endpoint: "), lines)
            self.assertIn("no authentication", lines[0])
            self.assertEqual(lines[1], "ok")
        for endpoint in (
            "tcp:9020:interface=127.0.0.1",
            "tcp6:9020:interface=\\\\:\\\\:1",
            f"unix:{self.dir}/admin.sock",
        ):
            text = self.listen("tcp:0", extra=f'[admin]\nendpoint = "{endpoint}"\n')
            self.assertEqual(self.check(text), (0, ["ok"]), endpoint)
        # With a token, beyond loopback is no warning; an empty token file is refused.
        token = Path(self.dir, "admin.token")
        token.write_text("s3cret\n")
        extra = f'[admin]\nendpoint = "tcp:9020"\ntoken_file = "{token}"\n'
        self.assertEqual(self.check(self.listen("tcp:0", extra=extra)), (0, ["ok"]))
        token.write_text("")
        self.assert_problem(self.listen("tcp:0", extra=extra), "admin.token_file", "empty")

    def test_control(self) -> None:
        """[control]: a Unix socket (mode 0600 added) or loopback TCP with a token file pass; TCP
        without a token, with an empty token file, or beyond loopback are refused, named."""
        token = Path(self.dir, "token")
        token.write_text("t0ken\n")
        for endpoint in (f"unix:{self.dir}/c.sock", "tcp:9091:interface=127.0.0.1"):
            extra = f'[control]\nendpoint = "{endpoint}"\ntoken_file = "{token}"\n'
            self.assertEqual(self.check(self.listen("tcp:0", extra=extra)), (0, ["ok"]), endpoint)
        config = load_text(self.listen("tcp:0", extra="[control]\n"), self.path)
        assert config.control is not None
        self.assertTrue(config.control.endpoint.endswith("control.sock:mode=600"))
        self.assert_problem(
            self.listen("tcp:0", extra='[control]\nendpoint = "tcp:9091:interface=127.0.0.1"\n'),
            "control.token_file",
            "required with a tcp: endpoint",
        )
        with_token = f'token_file = "{token}"\n'
        self.assert_problem(
            self.listen("tcp:0", extra=f'[control]\nendpoint = "tcp:9091"\n{with_token}'),
            "control.endpoint",
            "loopback only",
        )
        self.assert_problem(
            self.listen("tcp:0", extra='[control]\nendpoint = "ssl:9091"\n'),
            "control.endpoint",
            "a unix: socket or a loopback tcp: port",
        )
        token.write_text("  \n")
        self.assert_problem(
            self.listen("tcp:0", extra=f"[control]\n{with_token}"), "control.token_file", "empty"
        )


def load_text(text: str, path: str) -> configmod.Config:
    Path(path).write_text(text)
    return configmod.load(path)

"""
Config parsing: the shipped examples, units, and errors that name file, key path and reason.
"""

from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.procs import REPO
from wsgate import config


class ExampleTests(SynchronousTestCase):
    def test_every_etc_file_parses(self) -> None:
        """Every TOML file in etc/ is a valid config."""
        files = glob.glob(str(REPO / "etc" / "*.toml"))
        self.assertTrue(files)
        for path in files:
            config.load(path)

    def test_default_is_the_seed_scenario(self) -> None:
        """etc/wsgate.toml listens on 8020 and sends everything to 127.0.0.1:8010."""
        c = config.load(str(REPO / "etc" / "wsgate.toml"))
        self.assertEqual([li.endpoint for li in c.listeners], ["tcp:8020"])
        self.assertEqual(c.routes[0].path, "/")
        self.assertEqual(c.upstreams[c.routes[0].upstream].servers[0].url, "ws://127.0.0.1:8010")
        self.assertEqual(c.routes[0].idle_timeout, 0.0)
        self.assertEqual(c.routes[0].max_message_size, 16 * 1024 * 1024)


class UnitTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """Durations convert to seconds."""
        for text, seconds in [
            ("30s", 30.0),
            ("250ms", 0.25),
            ("2m", 120.0),
            ("1h", 3600.0),
            (5, 5.0),
        ]:
            self.assertEqual(config.parse_duration(text), seconds)
        for bad in ["soon", "-1s", True, "1 d"]:
            self.assertRaises(ValueError, config.parse_duration, bad)

    def test_sizes(self) -> None:
        """Sizes convert to bytes."""
        for text, size in [
            ("16MiB", 16 * 1024**2),
            ("64KiB", 65536),
            ("100", 100),
            (7, 7),
            ("1GB", 10**9),
        ]:
            self.assertEqual(config.parse_size(text), size)
        for bad in ["big", "1.5MiB", False]:
            self.assertRaises(ValueError, config.parse_size, bad)


BAD = """
log_session_opened = "yes"
[[listen]]
endpoint = "tcpx:80"
[[route]]
upstream = "nope"
idle_timeout = "soon"
colour = "blue"
[upstream.api]
servers = [ { url = "ws://a:1" }, { url = "http://b" } ]
tries = 0
[limits]
close_timeout = "0s"
"""


class ErrorTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def test_every_problem_named(self) -> None:
        """All problems are listed, each as FILE: key.path: reason."""
        path = self.write(BAD)
        e = self.assertRaises(config.ConfigError, config.load, path)
        self.assertEqual(
            sorted(p.split(": ")[1] for p in e.problems),
            sorted(
                [
                    "log_session_opened",
                    "listen[0].endpoint",
                    "upstream.api.servers[1].url",
                    "upstream.api.tries",
                    "route[0].upstream",
                    "route[0].idle_timeout",
                    "route[0].colour",
                    "limits.close_timeout",
                ]
            ),
        )
        self.assertTrue(all(p.startswith(f"{path}: ") for p in e.problems))
        self.assertIn(f"{path}: route[0].colour: unknown key", e.problems)

    def test_missing_file_and_bad_toml(self) -> None:
        """A missing file and a TOML syntax error are reported with the file name."""
        e = self.assertRaises(config.ConfigError, config.load, "/nonexistent/wsgate.toml")
        self.assertIn("/nonexistent/wsgate.toml: ", e.problems[0])
        path = self.write("[[listen]\n")
        e = self.assertRaises(config.ConfigError, config.load, path)
        self.assertIn("not valid TOML", e.problems[0])

    def test_required_tables(self) -> None:
        """A config with no listener, route or upstream says so."""
        e = self.assertRaises(config.ConfigError, config.parse, {}, "x.toml")
        self.assertEqual(
            e.problems,
            [
                "x.toml: listen: at least one [[listen]] table is required",
                "x.toml: route: at least one [[route]] table is required",
            ],
        )

    def test_command_line_names_flags(self) -> None:
        """Problems in --listen/--backend are reported against those flags."""
        e = self.assertRaises(config.ConfigError, config.from_arguments, ["tcp:x"], ["http://a"])
        self.assertEqual(len(e.problems), 2)
        self.assertTrue(e.problems[0].startswith("command line: --listen: "))
        self.assertTrue(e.problems[1].startswith("command line: --backend[0].url: "))

    def test_check_command(self) -> None:
        """`python -m wsgate check` prints ok / the problems with exit status 0 / 1."""
        good = subprocess.run(
            [sys.executable, "-m", "wsgate", "check", str(REPO / "etc" / "wsgate.toml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((good.returncode, good.stdout), (0, "ok\n"))
        path = self.write(BAD)
        bad = subprocess.run(
            [sys.executable, "-m", "wsgate", "check", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(len(bad.stdout.splitlines()), 8)
        self.assertIn(f"{path}: upstream.api.tries: ", bad.stdout)


class RouteMatchTests(SynchronousTestCase):
    def test_prefix_and_host(self) -> None:
        """Prefixes match at segment boundaries; a host, when given, must match."""
        route = config.Route(path="/chat", upstream="u", host="Chat.Example.com")
        self.assertTrue(route.matches("chat.example.com", "/chat"))
        self.assertTrue(route.matches("chat.example.com", "/chat/room"))
        self.assertFalse(route.matches("chat.example.com", "/chatter"))
        self.assertFalse(route.matches("other.example.com", "/chat"))
        self.assertTrue(config.Route(path="/", upstream="u").matches("any", "/x"))


class LimitsConfigTests(SynchronousTestCase):
    def test_limits_and_route_limits(self) -> None:
        """[limits] and the per-route limit keys convert their units; bad values are named."""
        base = {
            "listen": [{"endpoint": "tcp:1", "proxy_protocol": True}],
            "route": [
                {
                    "upstream": "u",
                    "max_frame_size": "1KiB",
                    "allowed_origins": ["https://a"],
                    "compression": "off",
                }
            ],
            "upstream": {"u": {"servers": [{"url": "ws://a:1"}]}},
        }
        c = config.parse(
            {
                **base,
                "log_session_opened": True,
                "limits": {
                    "shutdown_grace": "2m",
                    "max_header_size": "8KiB",
                    "trusted_proxies": ["10.0.0.0/8"],
                    "close_timeout": "250ms",
                    "send_timeout": "30s",
                },
            },
            "x.toml",
        )
        self.assertEqual((c.limits.shutdown_grace, c.limits.max_header_size), (120.0, 8192))
        self.assertEqual((c.limits.close_timeout, c.log_session_opened), (0.25, True))
        defaults = config.parse({**base, "route": [{"upstream": "u"}]}, "x.toml")
        self.assertEqual((defaults.limits.close_timeout, defaults.log_session_opened), (5.0, False))
        self.assertEqual((c.limits.send_timeout, c.routes[0].compression), (30.0, "off"))
        self.assertEqual(
            (defaults.limits.send_timeout, defaults.routes[0].compression), (60.0, "pass")
        )
        self.assertEqual(str(c.limits.trusted_proxies[0]), "10.0.0.0/8")
        self.assertEqual(
            (c.routes[0].max_frame_size, c.routes[0].allowed_origins), (1024, ("https://a",))
        )
        self.assertTrue(c.listeners[0].proxy_protocol)
        e = self.assertRaises(
            config.ConfigError,
            config.parse,
            {
                **base,
                "route": [{"upstream": "u", "compression": "gzip"}],
                "limits": {
                    "trusted_proxies": ["nonsense"],
                    "max_sessions": -1,
                    "shutdown": 1,
                    "send_timeout": "soon",
                },
            },
            "x.toml",
        )
        self.assertEqual(
            sorted(p.split(": ")[1] for p in e.problems),
            [
                "limits.max_sessions",
                "limits.send_timeout",
                "limits.shutdown",
                "limits.trusted_proxies",
                "route[0].compression",
            ],
        )


class ListenerEndpointTests(SynchronousTestCase):
    def test_socket_endpoint(self) -> None:
        """TCP listeners bind with backlog=1024 unless set; haproxy: wrappers are peeled off."""
        cases = {
            "tcp:8020": "tcp:8020:backlog=1024",
            "tcp:8020:interface=127.0.0.1": "tcp:8020:interface=127.0.0.1:backlog=1024",
            "tcp6:8020:backlog=64": "tcp6:8020:backlog=64",
            "haproxy:tcp:8020": "tcp:8020:backlog=1024",
            "unix:/run/wsgate.sock": "unix:/run/wsgate.sock",
        }
        for endpoint, expected in cases.items():
            self.assertEqual(config.Listener(endpoint).socket_endpoint, expected)
        self.assertTrue(config.Listener("haproxy:tcp:1").behind_proxy)
        self.assertTrue(config.Listener("tcp:1", proxy_protocol=True).behind_proxy)
        self.assertFalse(config.Listener("tcp:1").behind_proxy)

"""
``twistd wsgate`` options and the service tree, inspected without starting it.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wsgate.dataplane.bridge import ClientLegFactory
from wsgate.demo import EchoBackendFactory
from wsgate.service import Options, makeService

ROOT = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_listen_backend(self) -> None:
        """--listen and repeated --backend make one round-robin upstream."""
        options = parse("--listen", "tcp:8020", "--backend", "ws://a:1", "--backend", "wss://b:2")
        config = options["gate_config"]
        self.assertEqual([li.endpoint for li in config.listeners], ["tcp:8020"])
        self.assertEqual(
            [s.url for s in config.upstreams["default"].servers], ["ws://a:1", "wss://b:2"]
        )

    def test_modes_exclusive(self) -> None:
        """Exactly one of --config, --backend, --demo."""
        self.assertRaises(usage.UsageError, parse)
        self.assertRaises(
            usage.UsageError, parse, "--demo", "--backend", "ws://a:1", "--listen", "tcp:1"
        )
        self.assertRaises(usage.UsageError, parse, "--backend", "ws://a:1")

    def test_bad_config_names_problems(self) -> None:
        """A bad --config fails option parsing with the file, key and reason."""
        path = self.mktemp()
        Path(path).write_text('[[listen]]\nendpoint = "tcp:99999"\n')
        e = self.assertRaises(usage.UsageError, parse, "--config", path)
        self.assertIn(f"{path}: listen[0].endpoint: ", str(e))

    def test_demo_defaults(self) -> None:
        """--demo listens on tcp:8020 and sends to the echo backend on 127.0.0.1:8010."""
        config = parse("--demo")["gate_config"]
        self.assertEqual(config.listeners[0].endpoint, "tcp:8020")
        self.assertEqual(config.upstreams["default"].servers[0].url, "ws://127.0.0.1:8010")


class MakeServiceTests(SynchronousTestCase):
    def test_tree(self) -> None:
        """Each listener is an endpoint service with the client-leg factory."""
        top = makeService(
            parse("--config", str(ROOT / "etc" / "wsgate.toml")), MemoryReactorClock()
        )
        listeners = [s for s in top if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 1)
        self.assertIsInstance(listeners[0].factory, ClientLegFactory)
        self.assertIs(listeners[0].factory.gateway, top.gateway)

    def test_demo_tree(self) -> None:
        """--demo adds the echo backend before the gate's listener."""
        top = makeService(parse("--demo", "--demo-port", "18010"), MemoryReactorClock())
        factories = [type(s.factory) for s in top if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(factories, [EchoBackendFactory, ClientLegFactory])

    def test_ready_marker(self) -> None:
        """
        The Listening marker comes after every listener (started last, stopped first), the admin
        listener's /ready reads it, a SIGHUP reload is wrapped by it, and a gate built on a given
        reactor (a test's) never reads NOTIFY_SOCKET.
        """
        environ = {**os.environ, "NOTIFY_SOCKET": "/run/systemd/notify"}
        self.patch(os, "environ", environ)
        path = Path(self.mktemp())
        text = (ROOT / "etc" / "wsgate.toml").read_text()
        path.write_text(text + '\n[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\n')
        for extra in ("", "workers = 2\n"):
            path.write_text(extra + path.read_text().removeprefix("workers = 2\n"))
            top = makeService(parse("--config", str(path)), MemoryReactorClock())
            children = list(top)
            self.assertIs(children[-1], top.listening)
            self.assertIsNone(top.listening.notify.address)
            self.assertEqual(environ["NOTIFY_SOCKET"], "/run/systemd/notify")
            admin = [
                s for s in children if type(getattr(s, "factory", None)).__name__ == "AdminSite"
            ]
            [site] = [s.factory for s in admin]
            self.assertIs(site.resource.children[b"ready"].listening, top.listening)
            if not extra:
                [reloader] = [s for s in children if type(s).__name__ == "_Reload"]
                self.assertIs(reloader.listening, top.listening)
                listeners = [s for s in children if isinstance(s, StreamServerEndpointService)]
                self.assertLess(children.index(listeners[-1]), children.index(top.listening))

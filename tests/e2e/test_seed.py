"""
The reference scenario of SCENARIO.md, for real: the Node.js echo backend, the gate run by twistd
and the npm ``wscat`` client typing into a terminal, all on loopback.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.procs import (
    LOOPBACK,
    free_ports,
    spawn_wscat,
    start_gate,
    start_node_backend,
    wait_for_port,
)

_ANSWER = "< Server received from client: {}"


class SeedScenarioTests(SynchronousTestCase):
    """
    ``wscat --connect`` to the gate, which proxies to ``node server.js``: what NGINX users do today.
    """

    def setUp(self) -> None:
        self.backend = start_node_backend(self)
        self.gate = start_gate(self, "--backend", f"ws://{LOOPBACK}:{self.backend.port}")
        self.wscat = spawn_wscat(self, f"ws://{LOOPBACK}:{self.gate.port}")

    def test_hello(self) -> None:
        """
        Typing ``Hello`` in wscat shows the backend's answer on the client, and the backend prints
        what it received.
        """
        self.wscat.sendline("Hello")
        self.wscat.expect_exact(_ANSWER.format("Hello"))
        self.backend.wait_for_output("Received from client: Hello")

    def test_messages_keep_flowing(self) -> None:
        """
        Several messages on the same session each get their own answer, in order.
        """
        for message in ["Hello", "second message", "third"]:
            self.wscat.sendline(message)
            self.wscat.expect_exact(_ANSWER.format(message))
        output = self.backend.wait_for_output("Received from client: third")
        self.assertEqual(output.count("Received from client: "), 3)

    def test_backend_close_reaches_wscat(self) -> None:
        """
        When the backend closes with code 4001 and reason "bye", wscat reports exactly that.
        """
        self.wscat.sendline("__close__ 4001 bye")
        self.wscat.expect_exact('Disconnected (code: 4001, reason: "bye")')


class DemoTests(SynchronousTestCase):
    """
    ``wsgate --demo`` runs the scenario without Node.js: the gate plus a built-in echo backend.
    """

    def test_hello(self) -> None:
        """
        wscat through a ``--demo`` gate gets the built-in backend's answer to ``Hello``.
        """
        gate_port, demo_port = free_ports(2)
        gate = start_gate(
            self,
            "--demo",
            "--listen",
            f"tcp:{gate_port}:interface={LOOPBACK}",
            "--demo-port",
            str(demo_port),
        )
        wait_for_port(LOOPBACK, demo_port, 10.0, gate)
        wscat = spawn_wscat(self, f"ws://{LOOPBACK}:{gate_port}")
        wscat.sendline("Hello")
        wscat.expect_exact(_ANSWER.format("Hello"))

"""
The gate between two independent WebSocket implementations: Python's ``websockets`` client and the
Node.js ``ws`` backend (tests/fixtures/node/server.js), over loopback, plus plain HTTP clients.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.procs import (
    LOOPBACK,
    free_port,
    start_configured_gate,
    start_gate,
    start_node_backend,
)

_PREFIX = "Server received from client: "
_TIMEOUT = 5.0
_MiB = 1024 * 1024


def _connect(url: str, **kwargs: Any) -> ClientConnection:
    """A websockets client with every wait bounded and room for answers a bit over 1 MiB."""
    return connect(
        url,
        open_timeout=_TIMEOUT,
        close_timeout=_TIMEOUT,
        max_size=4 * _MiB,
        **kwargs,
    )


class _GateToNodeCase(SynchronousTestCase):
    """A gate in front of one node backend, both started for each test, in ``mode``."""

    mode = "message"

    def setUp(self) -> None:
        self.backend = start_node_backend(self)
        backend = f"ws://{LOOPBACK}:{self.backend.port}"
        if self.mode == "message":
            self.gate = start_gate(self, "--backend", backend)
        else:
            port = free_port()
            config = Path(self.mktemp())
            config.write_text(
                f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n'
                f'[[route]]\nupstream = "u"\nmode = "{self.mode}"\n'
                f'[upstream.u]\nservers = [{{ url = "{backend}" }}]\n'
            )
            self.gate = start_configured_gate(self, config, port)
            self.gate.port = port
        self.url = f"ws://{LOOPBACK}:{self.gate.port}"

    def connect(self, path: str = "/", **kwargs: Any) -> ClientConnection:
        """Open a client session through the gate; cleanup closes it."""
        client = _connect(self.url + path, **kwargs)
        self.addCleanup(client.close)
        return client

    def handshake(self, client: ClientConnection) -> dict[str, Any]:
        """What the backend saw of this session's upgrade request."""
        client.send("__headers__")
        answer = client.recv(timeout=_TIMEOUT)
        self.assertIsInstance(answer, str)
        return json.loads(answer)


class MessageTests(_GateToNodeCase):
    """
    Messages cross the gate both ways unchanged, keeping their frame type.
    """

    def test_text_stays_text(self) -> None:
        """
        A text message reaches the backend as text and its text answer reaches the client as text.
        """
        client = self.connect()
        client.send("Hello")
        self.assertEqual(client.recv(timeout=_TIMEOUT), _PREFIX + "Hello")
        self.backend.wait_for_output("Received from client: Hello")

    def test_binary_stays_binary(self) -> None:
        """
        A binary message reaches the backend as binary and its binary answer reaches the client as
        bytes, including bytes that are not valid UTF-8.
        """
        client = self.connect()
        payload = b"\x00\xff\xfe binary \x80"
        client.send(payload)
        self.assertEqual(client.recv(timeout=_TIMEOUT), _PREFIX.encode() + payload)
        self.backend.wait_for_output(f"Received from client: <{len(payload)} bytes>")

    def test_one_mebibyte_message(self) -> None:
        """
        A 1 MiB binary message of random bytes reaches the backend intact, and so does the answer
        that carries it back.
        """
        client = self.connect()
        payload = os.urandom(_MiB)
        client.send(payload)
        answer = client.recv(timeout=_TIMEOUT)
        self.assertIsInstance(answer, bytes)
        self.assertEqual(len(answer), len(_PREFIX) + _MiB)
        self.assertTrue(answer == _PREFIX.encode() + payload, "1 MiB answer differs")
        self.backend.wait_for_output(f"Received from client: <{_MiB} bytes>")

    def test_one_mebibyte_text_message(self) -> None:
        """
        A 1 MiB text message (multi-byte UTF-8 included) reaches the backend and comes back intact.
        """
        client = self.connect()
        text = ("wsgate \u00e9\u4e2d\U0001f600 " * (_MiB // 16))[: _MiB // 2]
        client.send(text)
        self.assertTrue(client.recv(timeout=_TIMEOUT) == _PREFIX + text, "text answer differs")


class HandshakeTests(_GateToNodeCase):
    """
    What the client asks for in its upgrade request reaches the backend, and the backend's choices
    reach the client.
    """

    def test_subprotocol_chosen_by_backend(self) -> None:
        """
        The client's subprotocols are offered to the backend in order, and the one it picks (the
        first) is the one the client's handshake ends with.
        """
        client = self.connect(subprotocols=["chat.v2", "chat.v1"])
        self.assertEqual(client.subprotocol, "chat.v2")
        seen = self.handshake(client)
        self.assertEqual(seen["protocol"], "chat.v2")
        offered = [p.strip() for p in seen["headers"]["sec-websocket-protocol"].split(",")]
        self.assertEqual(offered, ["chat.v2", "chat.v1"])

    def test_no_subprotocol(self) -> None:
        """
        Without subprotocols offered, none is negotiated on either leg.
        """
        client = self.connect()
        self.assertIsNone(client.subprotocol)
        seen = self.handshake(client)
        self.assertEqual(seen["protocol"], "")
        self.assertNotIn("sec-websocket-protocol", seen["headers"])

    def test_path_and_query(self) -> None:
        """
        The client's path and query string reach the backend unchanged.
        """
        client = self.connect("/chat/room%201?user=ann&lang=fr")
        self.assertEqual(self.handshake(client)["url"], "/chat/room%201?user=ann&lang=fr")

    def test_forwarded_headers(self) -> None:
        """
        The backend sees its own address as Host, the client's address in X-Forwarded-For and
        X-Real-IP, the gate's address in X-Forwarded-Host, and the client's Origin, Cookie,
        Authorization and User-Agent.
        """
        client = self.connect(
            "/",
            origin="http://app.test",
            user_agent_header="wsgate-e2e/1.0",
            additional_headers={"Cookie": "session=abc123", "Authorization": "Bearer t0ken"},
        )
        headers = self.handshake(client)["headers"]
        self.assertEqual(headers["host"], f"{LOOPBACK}:{self.backend.port}")
        self.assertIn(LOOPBACK, [a.strip() for a in headers["x-forwarded-for"].split(",")])
        self.assertEqual(headers["x-real-ip"], LOOPBACK)
        self.assertEqual(headers["x-forwarded-host"], f"{LOOPBACK}:{self.gate.port}")
        self.assertIn(headers["x-forwarded-proto"], ["http", "ws"])
        self.assertEqual(headers["origin"], "http://app.test")
        self.assertEqual(headers["cookie"], "session=abc123")
        self.assertEqual(headers["authorization"], "Bearer t0ken")
        self.assertEqual(headers["user-agent"], "wsgate-e2e/1.0")


class CloseTests(_GateToNodeCase):
    """
    Close codes and reasons travel across the gate in both directions.
    """

    def test_backend_close_reaches_client(self) -> None:
        """
        The backend closing with 4001 "bye" closes the client with 4001 "bye".
        """
        client = self.connect()
        client.send("__close__ 4001 bye")
        with self.assertRaises(ConnectionClosed) as raised:
            client.recv(timeout=_TIMEOUT)
        received = raised.exception.rcvd
        self.assertIsNotNone(received)
        assert received is not None
        self.assertEqual((received.code, received.reason), (4001, "bye"))

    def test_client_close_reaches_backend(self) -> None:
        """
        The client closing with 4002 "see you" closes the backend's connection with the same.
        """
        client = self.connect()
        client.send("Hello")
        client.recv(timeout=_TIMEOUT)
        client.close(4002, "see you")
        self.backend.wait_for_output("Client disconnected: 4002 see you")

    def test_backend_process_ends(self) -> None:
        """
        When the backend process goes away mid-session, the client's session ends at once: in
        message mode with a close frame of the gate's own (1011), in tunnel mode as on a direct
        connection (its TCP closed too, no Close frame made up).
        """
        client = self.connect()
        client.send("Hello")
        client.recv(timeout=_TIMEOUT)
        self.backend.stop()
        with self.assertRaises(ConnectionClosed) as raised:
            client.recv(timeout=_TIMEOUT)
        if self.mode == "tunnel":  # a byte tunnel: the client sees what a direct client would
            self.assertIsNone(raised.exception.rcvd, "the gate made up a Close")
        else:
            self.assertIsNotNone(raised.exception.rcvd, "the gate sent no close frame")


class HTTPTests(_GateToNodeCase):
    """
    Requests that are not WebSocket upgrades get plain HTTP answers.
    """

    def test_plain_get_gets_426(self) -> None:
        """
        A GET without Upgrade on a routed path is answered 426 Upgrade Required with
        ``Upgrade: websocket``.
        """
        connection = http.client.HTTPConnection(LOOPBACK, self.gate.port, timeout=_TIMEOUT)
        self.addCleanup(connection.close)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        self.assertEqual(response.status, 426)
        self.assertEqual((response.getheader("Upgrade") or "").lower(), "websocket")


class TunnelMessageTests(MessageTests):
    """The same messages, through a route in tunnel mode."""

    mode = "tunnel"


class TunnelHandshakeTests(HandshakeTests):
    """The same handshakes, through a route in tunnel mode."""

    mode = "tunnel"


class TunnelCloseTests(CloseTests):
    """The same closes, through a route in tunnel mode."""

    mode = "tunnel"


class BackendDownTests(SynchronousTestCase):
    """
    A gate whose backend does not answer refuses the upgrade instead of accepting and dropping it.
    """

    def test_upgrade_gets_502(self) -> None:
        """
        With its only backend on a closed port, the gate answers the upgrade with HTTP 502, and
        keeps doing so for the next client.
        """
        gate = start_gate(self, "--backend", f"ws://{LOOPBACK}:{free_port()}")
        for _ in range(2):
            with self.assertRaises(InvalidStatus) as raised:
                _connect(f"ws://{LOOPBACK}:{gate.port}/")
            self.assertEqual(raised.exception.response.status_code, 502)


class BalancingTests(SynchronousTestCase):
    """
    Sessions are spread round robin over several backends.
    """

    def test_round_robin(self) -> None:
        """
        With two backends, consecutive sessions alternate between them.
        """
        first = start_node_backend(self, name="first")
        second = start_node_backend(self, name="second")
        gate = start_gate(
            self,
            "--backend",
            f"ws://{LOOPBACK}:{first.port}",
            "--backend",
            f"ws://{LOOPBACK}:{second.port}",
        )
        names = []
        for _ in range(4):
            with _connect(f"ws://{LOOPBACK}:{gate.port}/") as client:
                client.send("__name__")
                names.append(client.recv(timeout=_TIMEOUT))
        self.assertEqual(set(names), {"first", "second"})
        self.assertEqual(names[0::2], [names[0]] * 2, names)
        self.assertEqual(names[1::2], [names[1]] * 2, names)

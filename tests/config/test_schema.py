"""
Each config default is declared once, in the schema (``wsgate/config/schema.py``): a file that
leaves a key out gets the dataclass field's default, and no reader call writes a second copy.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.certs import CA
from wsgate import config
from wsgate.config import schema
from wsgate.config.table import Table, default_of

PACKAGE = Path(config.__file__).parent
SCHEMA_CLASSES = {
    obj for obj in vars(schema).values() if inspect.isclass(obj) and dataclasses.is_dataclass(obj)
}

# The fields the minimal file below sets, or that are not keys of a table (the records the reader
# builds from tables, the source, a default computed from the environment, values from the URL).
GIVEN = {
    "Config": {"source", "listeners", "routes", "upstreams", "redirects", "limits", "console"}
    | {"admin", "control", "log", "cluster"},
    "Listener": {"endpoint", "tls"},
    "ListenerTLS": {"default"},
    "CertificateFiles": {"cert", "key"},
    "Redirect": {"endpoint"},
    "UpstreamSpec": {"name", "servers", "health"},
    "ServerSpec": {"url"},
    "HealthSpec": set(),
    "Route": {"upstream", "on_connect", "on_disconnect", "auth"},
    "ConnectHook": {"url"},
    "DisconnectHook": {"url"},
    "AuthSpec": {"type", "jwks_url", "url"},
    "Limits": set(),
    "LogSpec": set(),
    "ConsoleSpec": {"endpoint", "host_key", "authorized_keys"},
    "AdminSpec": {"endpoint"},
    "ControlSpec": {"endpoint"},
    "ClusterSpec": {"host"},
}


def differences(record: object, given: Mapping[str, set[str]], seen: set[type]) -> list[str]:
    """
    Every field of ``record`` and the records inside it that differs from its dataclass default,
    except the fields ``given`` names per class; the classes met are added to ``seen``.
    """
    found: list[str] = []
    kind = type(record)
    seen.add(kind)
    for f in dataclasses.fields(kind):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        if f.name not in given.get(kind.__name__, set()):
            try:
                default = default_of(kind, f.name)
            except TypeError:
                found.append(f"{kind.__name__}.{f.name}: has no default, not given")
                continue
            if value != default or type(value) is not type(default):
                found.append(f"{kind.__name__}.{f.name}: {value!r}, default {default!r}")
        if isinstance(value, Mapping):
            items = list(value.values())
        else:
            items = list(value) if isinstance(value, tuple) else [value]
        for item in items:
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                found.extend(differences(item, given, seen))
    return found


def repeated_defaults(source: str) -> list[str]:
    """
    Reader calls in ``source`` that write a default instead of taking it from the schema: a
    look-up ``x.get("key", default, convert, ...)``, or ``x.field(Spec, "key", ...)`` naming a
    class that is not a schema record or a field without a default.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        args = node.args
        if node.func.attr == "get" and len(args) >= 3 and isinstance(args[0], ast.Constant):
            found.append(f"line {node.lineno}: {args[0].value!r} with a written default")
        elif node.func.attr == "field" and len(args) == 3:
            spec, name = args[0], args[1]
            if not (isinstance(spec, ast.Name) and isinstance(name, ast.Constant)):
                found.append(f"line {node.lineno}: field() needs a schema class and a key name")
                continue
            classes = {c.__name__: c for c in SCHEMA_CLASSES}
            if spec.id not in classes:
                found.append(f"line {node.lineno}: {spec.id} is not a schema record")
                continue
            try:
                default_of(classes[spec.id], name.value)
            except TypeError as e:
                found.append(f"line {node.lineno}: {e}")
    return found


class DefaultsTests(SynchronousTestCase):
    def minimal(self) -> dict[str, Any]:
        """A document with every table present and only its required keys set."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        cert, key = CA().issue("localhost").write(tmp, "server")
        (tmp / "authorized_keys").write_text("")
        return {
            "listen": [{"endpoint": "tcp:8020", "tls": {"cert": cert, "key": key}}],
            "redirect": [{"endpoint": "tcp:8080"}],
            "upstream": {"a": {"servers": [{"url": "ws://127.0.0.1:9000"}], "health": {}}},
            "route": [
                {
                    "upstream": "a",
                    "on_connect": {"url": "http://127.0.0.1:9001/connect"},
                    "on_disconnect": {"url": "http://127.0.0.1:9001/disconnect"},
                    "auth": {"type": "jwt", "jwks_url": "http://127.0.0.1:9001/jwks"},
                },
                {"upstream": "a", "auth": {"type": "forward", "url": "http://127.0.0.1:9001/"}},
            ],
            "limits": {},
            "log": {},
            "console": {
                "endpoint": "tcp:2222:interface=127.0.0.1",
                "host_key": str(tmp / "host_key"),
                "authorized_keys": str(tmp / "authorized_keys"),
            },
            "admin": {"endpoint": "tcp:9090:interface=127.0.0.1"},
            "control": {},
            "cluster": {"redis": "redis://127.0.0.1"},
        }

    def test_a_key_left_out_gets_the_schema_default(self) -> None:
        """Every field of every record the file leaves out equals its dataclass default."""
        parsed = config.parse(self.minimal(), "minimal.toml")
        seen: set[type] = set()
        self.assertEqual(differences(parsed, GIVEN, seen), [])
        self.assertEqual({c.__name__ for c in seen}, {c.__name__ for c in SCHEMA_CLASSES})

    def test_a_differing_default_is_found(self) -> None:
        """The comparison sees a value that differs from the default, or a float given as int."""
        limits = dataclasses.replace(config.Limits(), close_timeout=6.0, handshake_timeout=10)
        self.assertEqual(
            differences(limits, {}, set()),
            [
                "Limits.handshake_timeout: 10, default 10.0",
                "Limits.close_timeout: 6.0, default 5.0",
            ],
        )

    def test_no_reader_call_repeats_a_default(self) -> None:
        """No module of wsgate/config writes a default where it reads a key."""
        for path in sorted(PACKAGE.glob("*.py")):
            self.assertEqual(repeated_defaults(path.read_text()), [], path.name)

    def test_the_check_sees_a_repeated_default(self) -> None:
        """The source check finds a written default and a field() call the schema cannot serve."""
        source = (
            'a = table.get("connect_timeout", 5.0, parse_duration)\n'
            'b = table.field(Route, "upstream", str)\n'
            'c = table.field(Nothing, "x", str)\n'
            'd = table.field(Route, "ping_timeout", parse_duration)\n'
            'e = env.get("HOME", "")\n'
        )
        self.assertEqual(
            repeated_defaults(source),
            [
                "line 1: 'connect_timeout' with a written default",
                "line 2: Route.upstream has no default",
                "line 3: Nothing is not a schema record",
            ],
        )

    def test_table_takes_no_default(self) -> None:
        """A table's public look-ups take the default from the schema, never as an argument."""
        for name, method in inspect.getmembers(Table, inspect.isfunction):
            if not name.startswith("_"):
                self.assertNotIn("default", inspect.signature(method).parameters, name)

    def test_default_of(self) -> None:
        """default_of gives a field's default or factory's value; TypeError without one."""
        self.assertEqual(default_of(config.UpstreamSpec, "connect_timeout"), 5.0)
        self.assertEqual(default_of(config.Config, "limits"), config.Limits())
        self.assertRaises(TypeError, default_of, config.Route, "upstream")
        self.assertRaises(TypeError, default_of, config.Route, "nothing")

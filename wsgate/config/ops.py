"""
The tables of how the gate is operated: ``[console]`` (SSH), ``[admin]`` (metrics and status),
``[control]`` (the control API, and where its socket is by default) and ``[log]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from wsgate.config.files import host_key_path, readable_file, token_file
from wsgate.config.schema import (
    LOG_FORMATS,
    LOG_LEVELS,
    AdminSpec,
    ConsoleSpec,
    ControlSpec,
    LogSpec,
)
from wsgate.config.syntax import check_endpoint
from wsgate.config.table import Table
from wsgate.config.units import choice, strings, typed

__all__ = ["default_control_endpoint", "read_admin", "read_console", "read_control", "read_log"]


def default_control_endpoint(env: Mapping[str, str] | None = None) -> str:
    """
    Where the control socket is when ``[control]`` names no endpoint: ``control.sock`` in
    systemd's ``RuntimeDirectory`` (``$RUNTIME_DIRECTORY``, or ``/run/wsgate`` when it exists, so
    an operator's shell finds it too), else in ``$XDG_RUNTIME_DIR/wsgate/``, else in
    ``/tmp/wsgate-UID/``.  Mode 0600: only the gate's user (and root) may connect.
    """
    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not runtime and os.path.isdir("/run/wsgate"):
        runtime = "/run/wsgate"
    if not runtime:
        xdg = env.get("XDG_RUNTIME_DIR")
        runtime = os.path.join(xdg, "wsgate") if xdg else f"/tmp/wsgate-{os.getuid()}"
    return f"unix:{os.path.join(runtime, 'control.sock')}:mode=600"


def read_console(table: Table) -> ConsoleSpec:
    """The ``[console]`` table."""
    path = readable_file(table.reader)
    spec = ConsoleSpec(
        endpoint=table.required("endpoint", check_endpoint, ""),
        host_key=table.required("host_key", host_key_path(table.reader), ""),
        authorized_keys=table.field(ConsoleSpec, "authorized_keys", path),
        users=table.field(ConsoleSpec, "users", path),
    )
    if not table.given("authorized_keys") and not table.given("users"):
        table.reader.problem(
            table.path, "give authorized_keys or users (or both): no way to log in otherwise"
        )
    table.done()
    return spec


def read_admin(table: Table) -> AdminSpec:
    """The ``[admin]`` table."""
    spec = AdminSpec(
        endpoint=table.required("endpoint", check_endpoint, ""),
        token_file=table.field(AdminSpec, "token_file", token_file(table.reader)),
    )
    table.done()
    return spec


def read_control(table: Table) -> ControlSpec:
    """The ``[control]`` table (a Unix socket is made mode 0600 unless it says a mode)."""
    spec = ControlSpec(
        endpoint=table.optional("endpoint", check_endpoint) or default_control_endpoint(),
        token_file=table.field(ControlSpec, "token_file", token_file(table.reader)),
    )
    kind = spec.endpoint.split(":", 1)[0].lower()
    if kind == "unix" and ":mode=" not in spec.endpoint:
        # Twisted makes Unix sockets 0666: only the gate's user (and root) may act on it.
        spec = replace(spec, endpoint=spec.endpoint + ":mode=600")
    if kind not in ("unix", "tcp", "tcp6"):
        table.reader.problem(table.key("endpoint"), "a unix: socket or a loopback tcp: port")
    elif kind != "unix" and spec.token_file is None:
        table.reader.problem(
            table.key("token_file"),
            "required with a tcp: endpoint (anyone who can connect could act on the gate)",
        )
    table.done()
    return spec


def read_log(table: Table) -> LogSpec:
    """The ``[log]`` table."""
    spec = LogSpec(
        level=table.field(LogSpec, "level", choice(*LOG_LEVELS)),
        format=table.field(LogSpec, "format", choice(*LOG_FORMATS)),
        redact_query=table.field(LogSpec, "redact_query", typed(bool, "true or false")),
        redact_query_keep=table.field(LogSpec, "redact_query_keep", strings),
    )
    table.done()
    return spec

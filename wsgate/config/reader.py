"""
A whole config document: :func:`load` reads a TOML file, :func:`parse` checks a parsed document
table by table (each section's reader lives in its own module) and either returns a
:class:`~wsgate.config.schema.Config` or raises :class:`~wsgate.config.table.ConfigError` with
every problem; :func:`from_arguments` makes the config of ``--listen``/``--backend``.  Checks that
span tables (workers and listeners, workers and cluster, token parameters hidden in logs) are here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from wsgate.config.cluster import read_cluster
from wsgate.config.limits import read_limits
from wsgate.config.listeners import read_listener, read_redirect
from wsgate.config.ops import read_admin, read_console, read_control, read_log
from wsgate.config.routes import read_route
from wsgate.config.schema import Config, Limits, LogSpec, Route
from wsgate.config.table import ConfigError, Reader, Table
from wsgate.config.units import positive_int, typed
from wsgate.config.upstreams import read_upstream

__all__ = ["from_arguments", "load", "parse"]


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str):
        raise ValueError('expected a whole number of at least 1 or "auto"')
    return positive_int(value)


# Endpoint kinds a parent can bind and hand to its workers (``workers`` > 1).
_SHAREABLE = ("tcp", "tcp6", "unix")


def parse(data: Mapping[str, Any], source: str, base_dir: str | None = None) -> Config:
    """
    Validate a parsed TOML document.  Raises :class:`ConfigError` listing every problem.
    Relative file paths (certificates, keys) are relative to ``base_dir``, by default the
    directory of ``source``.
    """
    reader = Reader(source, base_dir)
    top = Table(reader, "", dict(data))
    listeners = [read_listener(t) for t in top.tables("listen")]
    redirects = tuple(read_redirect(t) for t in top.tables("redirect"))
    if not listeners:
        reader.problem("listen", "at least one [[listen]] table is required")
    upstreams = {name: read_upstream(name, t) for name, t in top.subtables("upstream")}
    routes = tuple(read_route(t, upstreams) for t in top.tables("route"))
    if not routes:
        reader.problem("route", "at least one [[route]] table is required")
    limits_table = top.subtable("limits")
    limits = read_limits(limits_table) if limits_table is not None else Limits()
    console_table = top.subtable("console")
    console = read_console(console_table) if console_table is not None else None
    admin_table = top.subtable("admin")
    admin = read_admin(admin_table) if admin_table is not None else None
    control_table = top.subtable("control")
    control = read_control(control_table) if control_table is not None else None
    log_table = top.subtable("log")
    log = read_log(log_table) if log_table is not None else LogSpec()
    cluster_table = top.subtable("cluster")
    cluster = read_cluster(cluster_table) if cluster_table is not None else None
    log = _with_token_parameters(log, routes)
    workers = top.field(Config, "workers", _workers)
    log_session_opened = top.field(Config, "log_session_opened", typed(bool, "true or false"))
    if workers > 1 and cluster is not None:
        reader.problem(
            "cluster",
            "not available with workers > 1 yet: run several single-process gates in the fleet",
        )
    if workers > 1:
        for i, listener in enumerate(listeners):
            kind = listener.endpoint.lower().removeprefix("haproxy:").split(":", 1)[0]
            if kind not in _SHAREABLE:
                reader.problem(
                    f"listen[{i}].endpoint",
                    f"with workers > 1 a listener is tcp:, tcp6: or unix: ({kind}: cannot be shared)",
                )
    top.done()
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        source=source,
        listeners=tuple(listeners),
        routes=routes,
        upstreams=upstreams,
        redirects=redirects,
        limits=limits,
        console=console,
        admin=admin,
        control=control,
        workers=workers,
        log_session_opened=log_session_opened,
        log=log,
        cluster=cluster,
    )


def _with_token_parameters(log: LogSpec, routes: tuple[Route, ...]) -> LogSpec:
    """``log`` hiding every query parameter a route takes its credential from."""
    names = sorted(
        {
            source.partition(":")[2]
            for route in routes
            if route.auth is not None
            for source in route.auth.token
            if source.startswith("query:")
        }
    )
    return dataclasses.replace(log, redact_always=tuple(names)) if names else log


def load(path: str) -> Config:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse(data, path)


def from_arguments(listen: list[str], backends: list[str]) -> Config:
    """
    The config for ``--listen ENDPOINT --backend URL ...``: one route ``/`` to one round-robin
    upstream named ``default``.  Problems are reported against ``--listen`` and ``--backend``.
    """
    data = {
        "listen": [{"endpoint": e} for e in listen],
        "route": [{"path": "/", "upstream": "default"}],
        "upstream": {"default": {"servers": [{"url": u} for u in backends]}},
    }
    try:
        return parse(data, "command line")
    except ConfigError as e:
        renamed = [
            re.sub(r"listen\[\d+\]\.endpoint", "--listen", p).replace(
                "upstream.default.servers", "--backend"
            )
            for p in e.problems
        ]
        raise ConfigError(renamed) from None

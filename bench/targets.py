"""The proxies measured side by side, and how each one is configured and started.

A target is one entry in ``TARGETS``.  wsgate variants are either a command line
(``wsgate_argv``) or a TOML config (``wsgate_config``, see :func:`wsgate_toml`); placeholders such
as ``@LISTEN@``, ``@TLS_LISTEN@`` and ``@BACKEND@`` are filled in at start.  Every target listens on 127.0.0.1 only,
on a plain port (W1-W5) and a TLS port (W6) with the same self-signed certificate, and proxies to
the one echo backend of the run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, free_port, wait_port
from bench.tools import find_program

__all__ = ["LOAD_CPUS", "PROXY_CPUS", "TARGETS", "Env", "Running", "Target", "start", "wsgate_toml"]

LOAD_CPUS = "0"  # load generator and echo backend
PROXY_CPUS = "1"  # a single-process proxy
BOTH_CPUS = "0,1"  # a proxy with two worker processes (shares core 0 with the load side)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # direct | nginx | haproxy | wsgate
    description: str
    cpus: str = PROXY_CPUS
    nginx_workers: int = 1
    nginx_location_extra: str = ""
    wsgate_argv: tuple[str, ...] = ()
    wsgate_config: str = ""
    wsgate_workers: int = 1  # worker processes (``workers`` in wsgate_config)
    goal: str = ""  # issue 8's column that applies to this wsgate row: "message" or "tunnel"
    base: str = ""  # a multi-worker variant: the one-process target it is compared with
    skip: tuple[str, ...] = ()  # workloads not run against this target


def wsgate_toml(top: str = "", route: str = "") -> str:
    """A wsgate config for the benchmark: top-level keys in ``top``, route keys in ``route``."""
    return f"""{top}
[[listen]]
endpoint = "@LISTEN@"

[[listen]]
endpoint = "@TLS_TCP_LISTEN@"
tls = {{ cert = "@CERT@", key = "@KEY@" }}

[[route]]
path = "/"
upstream = "echo"
{route}

[upstream.echo]
servers = [ {{ url = "@BACKEND@" }} ]
"""


WSGATE_CLI = ("--listen", "@LISTEN@", "--listen", "@TLS_LISTEN@", "--backend", "@BACKEND@")

TARGETS: tuple[Target, ...] = (
    Target(
        "direct",
        "direct",
        "no proxy: load generator straight to the echo backend (the limit)",
        cpus=LOAD_CPUS,
    ),
    Target("nginx", "nginx", "NGINX, seed config, worker_processes 1"),
    Target(
        "nginx-2w",
        "nginx",
        "NGINX, seed config, worker_processes 2 (cores 0+1)",
        nginx_workers=2,
        cpus=BOTH_CPUS,
        base="nginx",
        skip=("W6",),
    ),
    Target(
        "nginx-64k",
        "nginx",
        "NGINX, seed config + proxy_buffer_size 64k (and proxy_buffers 4 64k, which NGINX then requires)",
        nginx_location_extra="proxy_buffer_size 64k;\n            proxy_buffers 4 64k;",
        skip=("W6",),
    ),
    Target("haproxy", "haproxy", "HAProxy, mode http, timeout tunnel 1h, 1 thread"),
    Target(
        "wsgate",
        "wsgate",
        "wsgate, 1 process, message mode (--listen/--backend)",
        wsgate_argv=WSGATE_CLI,
        goal="message",
    ),
    Target(
        "wsgate-tunnel",
        "wsgate",
        'wsgate, 1 process, tunnel mode (route mode = "tunnel")',
        wsgate_config=wsgate_toml(route='mode = "tunnel"'),
        goal="tunnel",
    ),
    Target(
        "wsgate-2w",
        "wsgate",
        "wsgate, workers = 2, message mode (cores 0+1)",
        wsgate_config=wsgate_toml(top="workers = 2"),
        wsgate_workers=2,
        cpus=BOTH_CPUS,
        base="wsgate",
        goal="message",
        skip=("W6",),
    ),
    Target(
        "wsgate-tunnel-2w",
        "wsgate",
        "wsgate, workers = 2, tunnel mode (cores 0+1)",
        wsgate_config=wsgate_toml(top="workers = 2", route='mode = "tunnel"'),
        wsgate_workers=2,
        cpus=BOTH_CPUS,
        base="wsgate-tunnel",
        goal="tunnel",
        skip=("W6",),
    ),
)


@dataclass
class Env:
    """What every target of a run shares."""

    run_dir: Path
    backend_port: int
    backend_tls_port: int
    cert: Path
    key: Path
    cert_and_key: Path
    nofile: int
    python: Path = Path(sys.executable)  # the venv whose twistd starts wsgate (A/B: a revision's)


@dataclass
class Running:
    """A started target: where to connect, and which processes to watch and stop."""

    target: Target
    port: int
    tls_port: int
    proc: Proc | None = None
    notes: list[str] = field(default_factory=list)

    def watch_pids(self) -> list[int]:
        return self.proc.pids() if self.proc else []

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    return text


def _nginx_conf(t: Target, env: Env, d: Path, port: int, tls_port: int) -> str:
    tmp = d / "tmp"
    tmp.mkdir(exist_ok=True)
    temps = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# generated by bench: the seed's WebSocket proxy configuration
daemon off;
worker_processes {t.nginx_workers};
worker_rlimit_nofile {env.nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    # NGINX starts closing fresh (not yet upgraded) connections once fewer than 1/16 of
    # worker_connections are free, so the count is set above the descriptor limit it really needs.
    worker_connections {env.nofile * 5 // 4};
}}

http {{
    access_log {d}/access.log;
{temps}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream websocket {{
        server 127.0.0.1:{env.backend_port};
    }}

    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {env.cert};
        ssl_certificate_key {env.key};

        location / {{
            proxy_pass http://websocket;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            {t.nginx_location_extra}
        }}
    }}
}}
"""


def _haproxy_conf(env: Env, port: int, tls_port: int) -> str:
    # HAProxy needs about two descriptors per proxied connection plus a few of its own.
    maxconn = (env.nofile - 100) // 2
    return f"""# generated by bench
global
    maxconn {maxconn}
    nbthread 1

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h

frontend ws
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {env.cert_and_key}
    default_backend echo

backend echo
    server echo1 127.0.0.1:{env.backend_port}
"""


def _twistd(python: Path) -> list[str]:
    twistd = python.with_name("twistd")
    return [str(twistd)] if twistd.exists() else [str(python), "-m", "twisted"]


def start(t: Target, env: Env) -> Running:
    """Start a target and wait until both its ports accept connections."""
    if t.kind == "direct":
        return Running(t, env.backend_port, env.backend_tls_port)
    d = env.run_dir / t.name
    d.mkdir(parents=True, exist_ok=True)
    port, tls_port = free_port(), free_port()
    log = d / "output.log"
    if t.kind == "nginx":
        conf = d / "nginx.conf"
        conf.write_text(_nginx_conf(t, env, d, port, tls_port))
        argv = [find_program("nginx") or "nginx", "-p", str(d), "-c", str(conf)]
    elif t.kind == "haproxy":
        conf = d / "haproxy.cfg"
        conf.write_text(_haproxy_conf(env, port, tls_port))
        argv = [find_program("haproxy") or "haproxy", "-db", "-f", str(conf)]
    elif t.kind == "wsgate":
        values = {
            "LISTEN": f"tcp:{port}:interface=127.0.0.1",
            "TLS_LISTEN": f"ssl:{tls_port}:interface=127.0.0.1:privateKey={env.key}"
            f":certKey={env.cert}",
            "TLS_TCP_LISTEN": f"tcp:{tls_port}:interface=127.0.0.1",
            "CERT": str(env.cert),
            "KEY": str(env.key),
            "BACKEND": f"ws://127.0.0.1:{env.backend_port}",
        }
        if t.wsgate_config:
            conf = d / "wsgate.toml"
            conf.write_text(_fill(t.wsgate_config, values))
            args = ["--config", str(conf)]
        else:
            args = [_fill(a, values) for a in t.wsgate_argv]
        argv = [*_twistd(env.python), "-n", "--pidfile=", "wsgate", *args]
    else:
        raise ValueError(f"unknown target kind {t.kind!r}")
    proc = Proc(t.name, argv, t.cpus, log, cwd=d)
    running = Running(t, port, tls_port, proc)
    try:
        wait_port(port, proc)
        wait_port(tls_port, proc)
        if t.wsgate_workers > 1:
            _wait_workers(proc, port, t.wsgate_workers)
    except Exception:
        running.stop()
        raise
    return running


def _wait_workers(proc: Proc, port: int, count: int, timeout: float = 20.0) -> None:
    """
    Wait until ``count`` wsgate workers listen on ``port``.  The parent binds the port before it
    starts them, so the port accepts before they do, and the first worker up would take every
    connection of the first workload.
    """
    needle = f"ClientLegFactory starting on {port}"
    deadline = time.monotonic() + timeout
    while proc.log.read_text(errors="replace").count(needle) < count:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {count} workers not listening on {port}")
        time.sleep(0.05)

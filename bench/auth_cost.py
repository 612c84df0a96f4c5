"""
What a handshake with authentication costs: one gate process, the benchmark's C echo backend
and C load generator (``bench/build/wsecho``, ``bench/build/wsload``), and routes of the same
upstream: ``/open`` (no auth), ``/jwt`` (``[route.auth] type = "jwt"``, an RS256 or ES256 token
in the ``access_token`` query parameter, stripped before the backend), ``/forward`` and
``/forward-cached`` (``type = "forward"`` to a local auth service answering 204, without and
with ``cache``).  Rounds alternate between the routes against the same gate, so all see the same
build, machine and warm-up.  The auth service runs in this process (a threaded ``http.server``),
so for forward auth the gate's CPU per handshake is the figure to read, not the rate.

    python -m bench.auth_cost [--build bench/build] [--sessions 2000] [--rounds 3]

Prints one line per round and the medians.  Bounded: every wsload run has its own time limits.
Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.procs import free_ports

REPO = Path(__file__).resolve().parent.parent


def _jwks(keys: dict[str, object]) -> str:
    items = []
    for kid, key in keys.items():
        algorithm = jwt.algorithms.RSAAlgorithm if kid == "rs" else jwt.algorithms.ECAlgorithm
        item = algorithm.to_jwk(key.public_key(), as_dict=True)  # type: ignore[attr-defined]
        item["kid"] = kid
        items.append(item)
    return json.dumps({"keys": items})


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def _auth_service(port: int) -> Any:
    """An auth service that allows everyone (204), served from a thread until the run ends."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Allow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Allow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", default=str(REPO / "bench" / "build"))
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    build = Path(args.build)
    directory = Path(tempfile.mkdtemp(prefix="wsgate-authcost-"))
    keys = {
        "rs": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "es": ec.generate_private_key(ec.SECP256R1()),
    }
    (directory / "jwks.json").write_text(_jwks(keys))
    exp = int(time.time()) + 3600
    tokens = {
        "rs": jwt.encode({"sub": "bench", "exp": exp}, keys["rs"], "RS256", {"kid": "rs"}),
        "es": jwt.encode({"sub": "bench", "exp": exp}, keys["es"], "ES256", {"kid": "es"}),
    }
    gate_port, echo_port, auth_port = free_ports(3)
    auth = _auth_service(auth_port)
    (directory / "wsgate.toml").write_text(
        f'[[listen]]\nendpoint = "tcp:{gate_port}:interface=127.0.0.1"\n\n'
        '[[route]]\npath = "/open"\nupstream = "u"\n\n'
        '[[route]]\npath = "/jwt"\nupstream = "u"\n[route.auth]\ntype = "jwt"\n'
        f'keys = "{directory / "jwks.json"}"\nalgorithms = ["RS256", "ES256"]\n'
        'token = ["query:access_token"]\nforward_token = false\n\n'
        '[[route]]\npath = "/forward"\nupstream = "u"\n[route.auth]\ntype = "forward"\n'
        f'url = "http://127.0.0.1:{auth_port}/auth"\n\n'
        '[[route]]\npath = "/forward-cached"\nupstream = "u"\n[route.auth]\ntype = "forward"\n'
        f'url = "http://127.0.0.1:{auth_port}/auth"\ncache = "60s"\n\n'
        f'[upstream.u]\nservers = [{{ url = "ws://127.0.0.1:{echo_port}" }}]\n'
    )
    twistd = str(Path(sys.executable).with_name("twistd"))
    config = str(directory / "wsgate.toml")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    echo = subprocess.Popen([str(build / "wsecho"), "--port", str(echo_port)], **quiet)  # type: ignore[call-overload]
    gate = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "wsgate", "--config", config], cwd=REPO, **quiet
    )  # type: ignore[call-overload]
    try:
        _wait_port(echo_port)
        _wait_port(gate_port)
        paths = {
            "none": "/open",
            "jwt RS256": f"/jwt?access_token={tokens['rs']}",
            "jwt ES256": f"/jwt?access_token={tokens['es']}",
            "forward": "/forward",
            "forward cached": "/forward-cached",
        }
        results: dict[str, list[float]] = {name: [] for name in paths}
        cpu: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(args.rounds):
            for name, path in paths.items():
                out = subprocess.run(
                    [
                        str(build / "wsload"),
                        "--port",
                        str(gate_port),
                        "--path",
                        path,
                        "--mode",
                        "handshake",
                        "--sessions",
                        str(args.sessions),
                        "--hs-inflight",
                        str(args.inflight),
                        "--hold",
                        "0",
                        "--watch",
                        str(gate.pid),
                    ],  # fmt: skip
                    capture_output=True,
                    timeout=120,
                    check=True,
                ).stdout
                report = json.loads(out)
                rate = float(report["handshakes_per_s"])
                opened = int(report["opened"])
                per = float(report["proxy_cpu_s"]) * 1000 / max(opened, 1)
                results[name].append(rate)
                cpu[name].append(per)
                print(
                    f"round {round_ + 1} {name:10} {rate:8.0f} handshakes/s"
                    f"  opened={opened} errors={report['errors']} gate CPU {per:.3f} ms/handshake"
                )
        for name in paths:
            print(
                f"median {name:10} {statistics.median(results[name]):8.0f} handshakes/s"
                f"  gate CPU {statistics.median(cpu[name]):.3f} ms/handshake"
            )
    finally:
        for process in (gate, echo):
            process.terminate()
            process.wait(10)
        auth.shutdown()


if __name__ == "__main__":
    main()

"""
The operations families of ``/metrics`` in memory: reload results, backend attempt failures by
reason (the classification table and the sessions that produce each), certificate expiry (front
door and backends, one process and workers) and the ``process_*`` families of one process and of a
parent with workers, all parsed with Prometheus's own text parser.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.certs import make_ca
from tests.helpers import BackendFactory, Network, get, make_config, upgrade_request
from wsgate import config as configmod
from wsgate.core import metrics
from wsgate.dataplane.backend_failures import connect_failure_reason, handshake_failure_reason
from wsgate.net.tls import BackendConnector, ServerTLS, TLSHandshakeError, certificate_rows
from wsgate.ops.admin import admin_resource
from wsgate.ops.process_metrics import gate_processes, process_text
from wsgate.ops.view import LocalView
from wsgate.process.aggregate import Aggregate
from wsgate.process.pool import WorkerPool

A = "ws://a.test:1"
B = "ws://b.test:2"


def gate_config(servers: list[dict[str, Any]], **upstream: Any) -> configmod.Config:
    """One listener, one route ``/`` and the upstream ``u`` of ``servers`` (with ``upstream``
    options)."""
    return configmod.parse(
        {
            "listen": [{"endpoint": "tcp:0"}],
            "route": [{"path": "/", "upstream": "u"}],
            "upstream": {"u": {"servers": servers, **upstream}},
        },
        "test.toml",
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def families(text: str) -> dict[str, str]:
    """Family name -> type."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


class RenderOperationsTests(SynchronousTestCase):
    def test_reloads(self) -> None:
        """Both results are always present; the gauge follows the last result, the timestamp
        the last success (the start until one)."""
        reloads = metrics.Reloads(100.0)
        text = metrics.render_operations(reloads, [], [])
        m = samples(text)
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "ok")}))], 0)
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "failed")}))], 0)
        self.assertEqual(m[("wsgate_config_last_reload_successful", frozenset())], 1)
        self.assertEqual(
            m[("wsgate_config_last_reload_success_timestamp_seconds", frozenset())], 100
        )
        reloads.record(True, 150.0)
        reloads.record(False, 160.0)
        m = samples(metrics.render_operations(reloads, [], []))
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "ok")}))], 1)
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "failed")}))], 1)
        self.assertEqual(m[("wsgate_config_last_reload_successful", frozenset())], 0)
        self.assertEqual(
            m[("wsgate_config_last_reload_success_timestamp_seconds", frozenset())], 150
        )
        types = families(text)
        self.assertEqual(types["wsgate_reloads"], "counter")
        self.assertEqual(types["wsgate_config_last_reload_successful"], "gauge")

    def test_backend_failures_and_certificates(self) -> None:
        """Failures carry upstream, server and reason; certificates use, endpoint, sni and file,
        label values escaped."""
        failures = [(("u", A, "connect_refused"), 3), (("u", 'ws://"odd"\\', "tls"), 1)]
        rows = [
            {
                "use": "listener",
                "endpoint": "ssl:443",
                "sni": "default",
                "file": "/etc/a\nb.pem",
                "not_after": 1.5e9,
            }
        ]
        text = metrics.render_operations(metrics.Reloads(0.0), failures, rows)
        m = samples(text)
        key = frozenset({("upstream", "u"), ("server", A), ("reason", "connect_refused")})
        self.assertEqual(m[("wsgate_backend_failures_total", key)], 3)
        odd = frozenset({("upstream", "u"), ("server", 'ws://"odd"\\'), ("reason", "tls")})
        self.assertEqual(m[("wsgate_backend_failures_total", odd)], 1)
        cert = frozenset(
            {
                ("use", "listener"),
                ("endpoint", "ssl:443"),
                ("sni", "default"),
                ("file", "/etc/a\nb.pem"),
            }
        )
        self.assertEqual(m[("wsgate_certificate_expiration_timestamp_seconds", cert)], 1.5e9)
        self.assertEqual(families(text)["wsgate_backend_failures"], "counter")


class FailureReasonTests(SynchronousTestCase):
    def test_connect_failures(self) -> None:
        """Each connect failure maps to its reason; anything else is connect_error."""
        table = [
            (error.ConnectionRefusedError(), "connect_refused"),
            (error.TCPTimedOutError(), "connect_timeout"),
            (error.TimeoutError(), "connect_timeout"),
            (error.DNSLookupError(), "dns"),
            (TLSHandshakeError("untrusted"), "tls"),
            (error.NoRouteError(), "connect_error"),
            (error.ConnectionLost(), "connect_error"),
        ]
        for exception, reason in table:
            self.assertEqual(connect_failure_reason(Failure(exception)), reason, exception)
            self.assertIn(reason, metrics.BACKEND_FAILURE_REASONS)

    def test_handshake_failures(self) -> None:
        """Timed out, lost, refused with a status, or refused on a bad 101."""
        table = [
            ((True, None, None), "handshake_timeout"),
            ((True, "x", "HTTP/1.1 403 Forbidden"), "handshake_timeout"),
            ((False, None, None), "handshake_lost"),
            ((False, "upgrade failed", "HTTP/1.1 403 Forbidden"), "http_status"),
            ((False, "upgrade failed", "HTTP/1.1 500"), "http_status"),
            (
                (False, "Sec-WebSocket-Accept wrong", "HTTP/1.1 101 Switching Protocols"),
                "handshake_invalid",
            ),
            ((False, "Bad HTTP response status line", "garbage"), "handshake_invalid"),
            ((False, "parse error", None), "handshake_invalid"),
        ]
        for args, reason in table:
            self.assertEqual(handshake_failure_reason(*args), reason, args)
            self.assertIn(reason, metrics.BACKEND_FAILURE_REASONS)


class SessionFailureTests(SynchronousTestCase):
    """Sessions over in-memory backends count their failed attempts on /metrics."""

    def scrape(self, net: Network) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        _, body = get(admin_resource(LocalView(net.gateway), None), "/metrics")
        return samples(body.decode())

    def failures(self, net: Network, server: str, reason: str) -> float:
        key = frozenset({("upstream", "u"), ("server", server), ("reason", reason)})
        return self.scrape(net).get(("wsgate_backend_failures_total", key), 0)

    def test_refused_then_next_server(self) -> None:
        """A refused connect is counted against its server; the session goes on to the next."""
        net = Network(make_config([A, B]), {A: "refuse", B: BackendFactory()})
        for _ in range(2):
            net.client("/")
        self.assertEqual(self.failures(net, A, "connect_refused"), 1)
        self.assertEqual(self.failures(net, B, "connect_refused"), 0)

    def test_http_status(self) -> None:
        """A backend that answers 403 is an http_status failure, and the client gets 502."""
        net = Network(gate_config([{"url": A}], tries=1), {A: BackendFactory(deny=403)})
        self.assertEqual(net.raw(upgrade_request()).status, 502)
        self.assertEqual(self.failures(net, A, "http_status"), 1)

    def test_try_timeout(self) -> None:
        """An attempt still under way when try_timeout passes counts as try_timeout."""
        net = Network(gate_config([{"url": A}], try_timeout="2s"), {A: "hang"})
        raw = net.raw(upgrade_request())
        net.advance(3)
        self.assertEqual(raw.status, 504)
        self.assertEqual(self.failures(net, A, "try_timeout"), 1)


class CertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-certs-"))
        self.ca = make_ca()
        self.now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

    def days(self, days: int) -> float:
        return (self.now + datetime.timedelta(days=days)).timestamp()

    def issue(self, name: str, days: int) -> tuple[str, str]:
        end = self.now + datetime.timedelta(days=days)
        return self.ca.issue(name, not_after=end).write(self.dir, f"{name}-{days}")

    def listener(self, default: tuple[str, str], **sni: tuple[str, str]) -> configmod.ListenerTLS:
        def files(pair: tuple[str, str]) -> configmod.CertificateFiles:
            return configmod.CertificateFiles(cert=pair[0], key=pair[1], chain=None)

        return configmod.ListenerTLS(
            default=files(default), sni={name: files(p) for name, p in sni.items()}
        )

    def test_listener_and_reload(self) -> None:
        """A listener reports its default and SNI certificates; a reload reports the new ones."""
        default, other = self.issue("gate.test", 30), self.issue("other.test", 5)
        tls = ServerTLS(self.listener(default, **{"other.test": other}))
        expiries = {name: (path, when) for name, path, when in tls.expiries}
        self.assertEqual(
            expiries,
            {"default": (default[0], self.days(30)), "other.test": (other[0], self.days(5))},
        )
        renewed = self.issue("gate.test", 90)
        tls.reload(self.listener(renewed))
        [(name, path, when)] = tls.expiries
        self.assertEqual((name, path), ("default", renewed[0]))
        self.assertEqual(when, self.days(90))

    def test_backend_ca_and_client_certificate(self) -> None:
        """A wss:// server's CA bundle and client certificate are reported once per server (the
        CA bundle: its first certificate to expire); ws:// servers report nothing."""
        ca_file = self.ca.write(self.dir)
        client = self.issue("client.test", 20)
        server = {"url": "wss://backend.test:9443", "ca": ca_file}
        config = gate_config(
            [
                {**server, "client_cert": client[0], "client_key": client[1]},
                {"url": "wss://backend.test:9444", "verify": False},
                {"url": A},
            ]
        )
        tls = ServerTLS(self.listener(self.issue("gate.test", 60)))
        rows = certificate_rows({"ssl:8443": tls}, BackendConnector(MemoryReactorClock()), config)
        by_use = {row["use"]: row for row in rows}
        self.assertEqual(sorted(by_use), ["backend_ca", "backend_client", "listener"])
        self.assertEqual(by_use["backend_client"]["file"], client[0])
        self.assertEqual(by_use["backend_client"]["sni"], "backend.test")
        self.assertEqual(by_use["backend_ca"]["endpoint"], "wss://backend.test:9443")
        ca_end = self.ca.cert.not_valid_after_utc.timestamp()
        self.assertEqual(by_use["backend_ca"]["not_after"], ca_end)
        self.assertEqual(by_use["listener"]["endpoint"], "ssl:8443")

    def test_aggregate_keeps_earliest(self) -> None:
        """With workers, each certificate is listed once with the earliest expiry any has."""
        aggregate = Aggregate(make_config([A]), MemoryReactorClock(), _no_call, _no_call)
        row = {"use": "listener", "endpoint": "ssl:1", "sni": "default", "file": "/c.pem"}
        for worker, when in ((1, 200.0), (2, 100.0)):
            aggregate.update(worker, _snapshot(certificates=[{**row, "not_after": when}]))
        self.assertEqual(aggregate.certificates(), [{**row, "not_after": 100.0}])


def _no_call(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("no call expected")


def _snapshot(**extra: Any) -> dict[str, Any]:
    """A worker's snapshot with nothing in it but ``extra``."""
    return {
        "pid": 1,
        "time": 0.0,
        "counters": {},
        "closed": [],
        "connect_time": {"counts": [], "sum": 0.0, "count": 0},
        "session_duration": {"counts": [], "sum": 0.0, "count": 0},
        "totals": dict.fromkeys(("messages_up", "bytes_up", "messages_down", "bytes_down"), 0),
        "servers": [],
        "session_count": 0,
        "sessions": [],
        **extra,
    }


class WorkersTests(SynchronousTestCase):
    def test_backend_failures_summed(self) -> None:
        """The parent's /metrics sums the workers' backend failures."""
        aggregate = Aggregate(make_config([A]), MemoryReactorClock(), _no_call, _no_call)
        for worker in (1, 2):
            failures = [[["u", A, "connect_refused"], worker]]
            aggregate.update(worker, _snapshot(backend_failures=failures))
        self.assertEqual(aggregate.backend_failures[("u", A, "connect_refused")], 3)

    def test_pool_reload_counted_once(self) -> None:
        """The parent counts its reloads itself: a refused file is failed, a good one ok."""
        directory = Path(tempfile.mkdtemp(prefix="wsgate-reload-"))
        path = directory / "wsgate.toml"
        good = (
            '[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n[[route]]\nupstream = "u"\n'
            '[upstream.u]\nservers = [{ url = "ws://127.0.0.1:1" }]\n'
        )
        path.write_text(good)
        config = configmod.load(str(path))
        clock = MemoryReactorClock()
        pool = WorkerPool(config, str(path), clock)
        path.write_text("[[listen]]\nendpoint = 3\n")
        self.assertRaises(configmod.ConfigError, pool.reload)
        clock.advance(5)
        path.write_text(good)
        pool.reload()
        text = metrics.render_operations(pool.aggregate.reloads, [], [])
        m = samples(text)
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "failed")}))], 1)
        self.assertEqual(m[("wsgate_reloads_total", frozenset({("result", "ok")}))], 1)
        self.assertEqual(m[("wsgate_config_last_reload_success_timestamp_seconds", frozenset())], 5)


class ProcessMetricsTests(SynchronousTestCase):
    NAMES = {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    }

    def test_one_process(self) -> None:
        """One process: the standard families, without labels, of this process."""
        m = samples(process_text(gate_processes(None)))
        self.assertEqual({name for name, labels in m if not labels}, self.NAMES)
        self.assertTrue(all(not labels for _, labels in m))
        self.assertGreater(m[("process_resident_memory_bytes", frozenset())], 1 << 20)
        self.assertEqual(m[("process_open_fds", frozenset())], len(os.listdir("/proc/self/fd")))

    def test_parent_and_workers(self) -> None:
        """With workers, each family has one sample per process, labelled worker=parent or N,
        read from that process (its own start time); a gone worker has none."""
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"], stdin=subprocess.DEVNULL
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        gone = subprocess.Popen([sys.executable, "-c", ""])
        gone.wait()
        rows = [{"worker": 1, "pid": child.pid}, {"worker": 2, "pid": gone.pid}]
        text = process_text(gate_processes(lambda: rows))
        m = samples(text)
        by_name: dict[str, set[str]] = {}
        for name, labels in m:
            by_name.setdefault(name, set()).add(dict(labels)["worker"])
        self.assertEqual(set(by_name), self.NAMES)
        self.assertTrue(all(workers == {"parent", "1"} for workers in by_name.values()), by_name)
        start = "process_start_time_seconds"
        parent = m[(start, frozenset({("worker", "parent")}))]
        self.assertGreater(m[(start, frozenset({("worker", "1")}))], parent)
        self.assertEqual(text.count("# TYPE process_resident_memory_bytes gauge"), 1)

"""
``/metrics`` of a real gate (twistd) on loopback, scraped over HTTP and parsed with Prometheus's
own text parser: reloads refused and accepted (SIGHUP), a backend that refuses connections, a
handshake refused, certificate expiry before and after a renewal, and ``process_*`` of one process
and of a parent with two workers.  Then the shipped ``etc/grafana-dashboard.json`` and
``etc/prometheus-alerts.yml``: every metric their PromQL names is one such a scrape holds (names
by ``promql-parser``), ``promtool check rules`` accepts the rules (and the dashboard's queries,
wrapped as recording rules), and ``promtool test rules`` shows the alerts fire when they should.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from websockets.sync.client import connect

from tests.certs import make_ca
from tests.procs import (
    LOOPBACK,
    REPO,
    free_port,
    start_configured_gate,
    start_node_backend,
)

DASHBOARD = REPO / "etc" / "grafana-dashboard.json"
ALERTS = REPO / "etc" / "prometheus-alerts.yml"
# Series Prometheus makes itself for every target, not the gate.
PROMETHEUS_SERIES = {"up"}
# Grafana's own variables, replaced by something PromQL accepts before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
WAIT = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def exported_names(text: str) -> set[str]:
    """Every series name a scrape holds (``x_total``, ``x_bucket``, ... as queried)."""
    return {name for name, _ in parse(text)}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise AssertionError("promtool is missing: run scripts/install-test-deps.sh as root")
    return found


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables' queries."""
    data = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in data["panels"]
        for target in panel.get("targets", ())
        if "expr" in target
    ]
    for variable in data["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def promql(query: str) -> str:
    """A dashboard query as PromQL: Grafana's variables replaced, ``label_values(M, l)`` as M."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", query)


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects (every selector must name one)."""
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                unnamed.append(str(node))

    promql_parser.walk(promql_parser.parse(expression), visit)
    if unnamed:
        raise AssertionError(f"{expression}: selectors without a metric name: {unnamed}")
    return names


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


class GateMetricsCase(SynchronousTestCase):
    """A gate with a TLS listener, an admin listener, a route to a real (Node ws) echo backend
    and a route to a server that refuses connections."""

    workers = 1

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-e2e-metrics-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = make_ca()
        self.ca_file = self.ca.write(self.dir)
        self.now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self.cert = self.issue(20)
        self.port, self.admin_port, self.dead_port = free_port(), free_port(), free_port()
        self.backend = start_node_backend(self)
        self.config = self.dir / "wsgate.toml"
        self.config.write_text(self.config_text())
        self.gate = start_configured_gate(self, self.config, self.port)

    def issue(self, days: int) -> tuple[str, str]:
        end = self.now + datetime.timedelta(days=days)
        return self.ca.issue("localhost", "127.0.0.1", not_after=end).write(self.dir, f"gate{days}")

    def config_text(self) -> str:
        cert, key = self.cert
        return (
            f"workers = {self.workers}\n\n"
            f'[[listen]]\nendpoint = "tcp:{self.port}:interface={LOOPBACK}"\n\n'
            f'[listen.tls]\ncert = "{cert}"\nkey = "{key}"\n\n'
            f'[admin]\nendpoint = "tcp:{self.admin_port}:interface={LOOPBACK}"\n\n'
            '[[route]]\npath = "/dead"\nupstream = "dead"\n\n'
            '[[route]]\npath = "/"\nupstream = "echo"\n\n'
            f'[upstream.echo]\nservers = [{{ url = "ws://{LOOPBACK}:{self.backend.port}" }}]\n\n'
            f'[upstream.dead]\ntries = 1\nservers = [{{ url = "ws://{LOOPBACK}:{self.dead_port}" }}]\n'
        )

    def scrape(self) -> str:
        url = f"http://{LOOPBACK}:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def scrape_until(self, done: Callable[[Samples], bool]) -> Samples:
        """Scrape until ``done`` holds (workers report once a second), within WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while True:
            samples = parse(self.scrape())
            if done(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"/metrics never got there:\n{self.scrape()}")
            time.sleep(0.1)

    def tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        return context

    def session(self) -> None:
        """One session through the gate to the echo backend, closed by the client."""
        with connect(f"wss://localhost:{self.port}/", ssl=self.tls(), open_timeout=5) as ws:
            ws.send("hello")
            self.assertEqual(ws.recv(timeout=5), "Server received from client: hello")

    def refused_backend(self) -> None:
        """A session to the refusing server: the client gets 502."""
        with self.assertRaises(Exception) as caught:
            connect(f"wss://localhost:{self.port}/dead", ssl=self.tls(), open_timeout=5)
        self.assertIn("502", str(caught.exception))

    def refused_handshake(self) -> None:
        """A plain GET (no upgrade) is refused with 426."""
        request = urllib.request.Request(f"https://localhost:{self.port}/")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5, context=self.tls())
        self.assertEqual(caught.exception.code, 426)

    def reload(self) -> None:
        os.kill(self.gate.pid, signal.SIGHUP)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class OneProcessTests(GateMetricsCase):
    def test_scenario(self) -> None:
        """Failures, refusals, reloads and certificates show on /metrics as they happen."""
        self.session()
        self.refused_backend()
        self.refused_handshake()
        samples = parse(self.scrape())
        dead = f"ws://{LOOPBACK}:{self.dead_port}"
        failures = dict(upstream="dead", server=dead, reason="connect_refused")
        self.assertEqual(value(samples, "wsgate_backend_failures_total", **failures), 1)
        # Refused handshakes by status are wsgate_handshakes_total's results (no second family).
        self.assertEqual(value(samples, "wsgate_handshakes_total", result="502"), 1)
        self.assertEqual(value(samples, "wsgate_handshakes_total", result="426"), 1)
        self.assertEqual(value(samples, "wsgate_handshakes_total", result="ok"), 1)
        cert = dict(use="listener", endpoint=f"tcp:{self.port}:interface={LOOPBACK}")
        cert.update(sni="default", file=self.cert[0])
        expiry = "wsgate_certificate_expiration_timestamp_seconds"
        twenty_days = (self.now + datetime.timedelta(days=20)).timestamp()
        self.assertEqual(value(samples, expiry, **cert), twenty_days)
        for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
            self.assertGreater(value(samples, name), 0, name)
        self.assertEqual(value(samples, "wsgate_config_last_reload_successful"), 1)

        # A refused reload: counted, the gauge drops, the certificate stays.
        good = self.config.read_text()
        self.config.write_text(good + "\n[upstream.broken]\nservers = 3\n")
        self.reload()
        samples = self.scrape_until(
            lambda s: value(s, "wsgate_reloads_total", result="failed") == 1
        )
        self.assertEqual(value(samples, "wsgate_reloads_total", result="ok"), 0)
        self.assertEqual(value(samples, "wsgate_config_last_reload_successful"), 0)
        self.gate.wait_for_output("config_reload_refused")

        # A renewed certificate and a good file: counted, and the new expiry is the one shown.
        self.cert = self.issue(90)
        self.config.write_text(self.config_text())
        before = time.time()
        self.reload()
        samples = self.scrape_until(lambda s: value(s, "wsgate_reloads_total", result="ok") == 1)
        self.assertEqual(value(samples, "wsgate_reloads_total", result="failed"), 1)
        self.assertEqual(value(samples, "wsgate_config_last_reload_successful"), 1)
        loaded = value(samples, "wsgate_config_last_reload_success_timestamp_seconds")
        self.assertGreaterEqual(loaded, before - 1)
        cert["file"] = self.cert[0]
        ninety_days = (self.now + datetime.timedelta(days=90)).timestamp()
        self.assertEqual(value(samples, expiry, **cert), ninety_days)
        self.assertEqual(len([k for k in samples if k[0] == expiry]), 1)

    def test_dashboard_and_alerts_name_exported_metrics(self) -> None:
        """Every metric the dashboard and the alert rules query is on a real scrape."""
        self.session()
        self.refused_backend()
        exported = exported_names(self.scrape()) | PROMETHEUS_SERIES
        queries = [promql(q) for q in dashboard_queries()] + list(alert_expressions().values())
        self.assertGreater(len(queries), 20)
        used: set[str] = set()
        for query in queries:
            names = metric_names(query)
            self.assertEqual(names - exported, set(), query)
            used |= names
        # And the other way round: what an operator most needs is on the dashboard.
        for name in (
            "wsgate_backend_failures_total",
            "wsgate_certificate_expiration_timestamp_seconds",
            "wsgate_reloads_total",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ):
            self.assertIn(name, used)


class WorkersTests(GateMetricsCase):
    workers = 2

    def test_parent_shows_every_process(self) -> None:
        """With workers the parent's /metrics has process_* of itself and of each worker,
        labelled by worker, and the workers' certificates and backend failures."""

        def complete(samples: Samples) -> bool:
            workers = {
                dict(labels).get("worker")
                for name, labels in samples
                if name == "process_resident_memory_bytes"
            }
            return workers == {"parent", "1", "2"}

        samples = self.scrape_until(complete)
        self.assertIsNone(value(samples, "process_resident_memory_bytes"))  # no unlabelled one
        starts = {
            dict(labels)["worker"]: v
            for (name, labels), v in samples.items()
            if name == "process_start_time_seconds"
        }
        self.assertGreaterEqual(min(starts["1"], starts["2"]), starts["parent"])
        cpu = [k for k in samples if k[0] == "process_cpu_seconds_total"]
        self.assertEqual(len(cpu), 3)
        expiry = [k for k in samples if k[0] == "wsgate_certificate_expiration_timestamp_seconds"]
        self.assertEqual(len(expiry), 1)
        self.refused_backend()
        dead = f"ws://{LOOPBACK}:{self.dead_port}"
        failures = dict(upstream="dead", server=dead, reason="connect_refused")
        self.scrape_until(lambda s: value(s, "wsgate_backend_failures_total", **failures) == 1)
        # A reload in the parent is counted once, not once per worker.
        self.reload()
        samples = self.scrape_until(lambda s: value(s, "wsgate_reloads_total", result="ok") == 1)
        time.sleep(1.5)  # a poll of the workers later, still one
        samples = parse(self.scrape())
        self.assertEqual(value(samples, "wsgate_reloads_total", result="ok"), 1)


class RuleFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wsgate-rules-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def promtool(self, *args: str) -> str:
        result = subprocess.run(
            [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=self.dir
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        return output

    def test_check_rules(self) -> None:
        """promtool accepts the alert rules and, as recording rules, the dashboard's queries."""
        self.assertIn("SUCCESS: 7 rules found", self.promtool("check", "rules", str(ALERTS)))
        queries = [promql(q) for q in dashboard_queries()]
        recorded = {
            "groups": [
                {
                    "name": "dashboard",
                    "rules": [
                        {"record": f"wsgate:panel{i}", "expr": q} for i, q in enumerate(queries)
                    ],
                }
            ]
        }
        path = self.dir / "dashboard.yml"
        path.write_text(yaml.safe_dump(recorded))
        self.assertIn(
            f"SUCCESS: {len(queries)} rules found", self.promtool("check", "rules", str(path))
        )

    def test_alerts_fire(self) -> None:
        """promtool test rules: each alert fires on the series that should raise it, and the
        healthy series raise none."""
        day = 86400
        tests = {
            "rule_files": [str(ALERTS)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [
                        {"series": 'up{job="wsgate", instance="g:1"}', "values": "0x10"},
                        {"series": 'up{job="wsgate", instance="g:2"}', "values": "1x10"},
                        {
                            "series": 'wsgate_config_last_reload_successful{instance="g:1"}',
                            "values": "1 0x10",
                        },
                        {
                            "series": 'wsgate_certificate_expiration_timestamp_seconds{instance="g:1", use="listener", endpoint="ssl:443", sni="default", file="/a.pem"}',
                            "values": f"{13 * day}x10",
                        },
                        {
                            "series": 'wsgate_certificate_expiration_timestamp_seconds{instance="g:1", use="backend_ca", endpoint="wss://b:1", sni="b", file="/ca.pem"}',
                            "values": f"{30 * day}x10",
                        },
                        {
                            "series": 'wsgate_server_state{instance="g:1", upstream="u", server="ws://a:1", state="up"}',
                            "values": "1 0x10",
                        },
                        {
                            "series": 'wsgate_server_state{instance="g:1", upstream="v", server="ws://b:1", state="up"}',
                            "values": "1x10",
                        },
                    ],
                    "alert_rule_test": [
                        {
                            "eval_time": "5m",
                            "alertname": "WsgateDown",
                            "exp_alerts": [
                                {
                                    "exp_labels": {
                                        "severity": "critical",
                                        "job": "wsgate",
                                        "instance": "g:1",
                                    },
                                    "exp_annotations": {
                                        "summary": "wsgate on g:1 cannot be scraped",
                                        "description": "Prometheus has not reached the admin listener's /metrics for a minute: the gate is down, or its admin listener is.",
                                    },
                                }
                            ],
                        },
                        {
                            "eval_time": "5m",
                            "alertname": "WsgateReloadFailed",
                            "exp_alerts": [
                                {
                                    "exp_labels": {"severity": "warning", "instance": "g:1"},
                                    "exp_annotations": {
                                        "summary": "wsgate on g:1 refused its last config reload",
                                        "description": "The running config stays; the log says why (config_reload_refused or tls_reload_failed). Fix the file and reload again.",
                                    },
                                }
                            ],
                        },
                        {
                            "eval_time": "1m",
                            "alertname": "WsgateCertificateExpiringSoon",
                            "exp_alerts": [
                                {
                                    "exp_labels": {
                                        "severity": "warning",
                                        "instance": "g:1",
                                        "use": "listener",
                                        "endpoint": "ssl:443",
                                        "sni": "default",
                                        "file": "/a.pem",
                                    },
                                    "exp_annotations": {
                                        # 13 days less the minute evaluated at
                                        "summary": "Certificate /a.pem (listener ssl:443 default) expires in 12d 23h 59m 0s",
                                        "description": "Renew the file and reload wsgate (systemctl reload, or SIGHUP): the gate serves what it loaded at start or at the last reload.",
                                    },
                                }
                            ],
                        },
                        {
                            "eval_time": "5m",
                            "alertname": "WsgateNoUsableServer",
                            "exp_alerts": [
                                {
                                    "exp_labels": {
                                        "severity": "critical",
                                        "instance": "g:1",
                                        "upstream": "u",
                                    },
                                    "exp_annotations": {
                                        "summary": "Upstream u on g:1 has no server up",
                                        "description": "Every server of the upstream is down or draining: new sessions on its routes are refused with 503.",
                                    },
                                }
                            ],
                        },
                    ],
                }
            ],
        }
        path = self.dir / "alerts-test.yml"
        path.write_text(yaml.safe_dump(tests, width=1000))
        self.promtool("test", "rules", str(path))

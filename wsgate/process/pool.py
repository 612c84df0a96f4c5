"""
The parent of a gate with ``workers = N``: :class:`WorkerPool` binds every ``[[listen]]`` socket
itself in ``privilegedStartService`` (so ports still bind before ``twistd --uid`` drops root, and a
busy port fails at startup), stops reading from them, and spawns N children (``python -m
wsgate.worker``) that inherit the sockets as file descriptors; the kernel hands each new
connection to whichever worker accepts it first.

Supervision.  A worker that dies is restarted after a bounded backoff (doubling from
``RESTART_FIRST`` to ``RESTART_MAX``, reset after a worker that lived ``STABLE_AFTER`` seconds)
and the sessions it had are logged as lost.  Each worker's snapshot is polled every
``POLL_INTERVAL`` into the :class:`wsgate.process.aggregate.Aggregate`.  SIGHUP in the parent
validates the file and fans out to every worker; stopping the parent (SIGTERM) asks every worker to
stop (each closes its sessions with 1001 within ``shutdown_grace``) and ends after the last one,
killing those still there ``STOP_MARGIN`` seconds later.  Each worker's log lines come through its
channel into the parent's log, prefixed with the worker's number.

Must not: hold gateway logic (workers run the ordinary Gateway) or wire services together
(``service.py`` does).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from wsgate import config as configmod
from wsgate.control.sighup import reload_on_sighup
from wsgate.dataplane.gateway import config_changes
from wsgate.ops.rows import qualified_id
from wsgate.process.aggregate import Aggregate
from wsgate.process.channel import Channel
from wsgate.process.sdnotify import Listening
from wsgate.process.sockets import RefuseConnections, address_family

__all__ = ["WorkerPool"]

POLL_INTERVAL = 1.0
# Restart delays after a worker dies: doubling from the first to the last, reset after a worker
# that lived STABLE_AFTER seconds.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 30.0
# After stop, how long beyond shutdown_grace the parent waits before it kills workers.
STOP_MARGIN = 5.0
LOST_LOGGED = 100


class _WorkerProcess(protocol.ProcessProtocol):
    """The parent's end of one worker: its channel, its pid, when it started."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.started = pool.reactor.seconds()
        self.channel = Channel(self._write, pool.reactor, on_event=self._event)
        self.ended: defer.Deferred = defer.Deferred()

    def _write(self, data: bytes) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.write(data)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.channel.data_received(data)

    def _event(self, message: dict[str, Any]) -> None:
        if "tapped" in message or "tap_ended" in message:
            if self.pool.processes.get(self.index) is self:
                self.pool.aggregate.tap_event(self.index, message)
            return
        if "log" in message or "format" in message:
            level = LogLevel.levelWithName(message.get("level") or "info")
            log = Logger(namespace=message.get("ns") or "wsgate.worker")
            fields = message.get("fields")
            if isinstance(fields, dict) and isinstance(message.get("format"), str):
                log.emit(
                    level, "worker {worker}: " + message["format"], worker=self.index, **fields
                )
            else:
                log.emit(level, "worker {worker}: {text}", worker=self.index, text=message["log"])

    def processEnded(self, reason: Failure) -> None:
        self.channel.lost()
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Binds the shared sockets, runs and supervises the workers, polls their snapshots into the
    :class:`Aggregate`, fans out SIGHUP (``reload``) and stop.  ``command(index, listeners)``
    is the argv of a worker; the default runs ``python -m wsgate.worker``.
    """

    log = Logger()

    def __init__(
        self,
        config: configmod.Config,
        path: str,
        reactor: Any,
        rows: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.path = path
        self.reactor = reactor
        self.rows = rows
        self.env = env
        self.count = config.workers
        self.aggregate = Aggregate(config, reactor, self.send, self.broadcast, self.reload_all)
        self.ports: list[Any] = []
        self.listeners: list[dict[str, Any]] = []
        self.processes: dict[int, _WorkerProcess] = {}
        self.stopping = False
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._poll: task.LoopingCall | None = None
        self._restore_sighup: Any = None
        self.listening: Listening | None = None  # systemd hears of reloads through it

    # -- start ---------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every listener now (as root, before --uid), and stop the parent reading them."""
        super().privilegedStartService()
        for listener in self.config.listeners:
            endpoint = listener.socket_endpoint
            results: list[Any] = []
            serverFromString(self.reactor, endpoint).listen(RefuseConnections()).addBoth(
                results.append
            )
            result = results[0] if results else None
            if isinstance(result, Failure):
                result.raiseException()
            if result is None:
                raise RuntimeError(f"{endpoint}: did not bind at once")
            result.stopReading()
            self.ports.append(result)
            self.listeners.append(
                {
                    "fd": result.fileno(),
                    "family": address_family(result.getHost()),
                    "endpoint": listener.endpoint,
                }
            )

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._restore_sighup = reload_on_sighup(self.reactor, self.reload, self.log)
        self._poll = task.LoopingCall(self.poll)
        self._poll.clock = self.reactor
        self._poll.start(POLL_INTERVAL, now=False).addErrback(
            lambda failure: self.log.failure("workers_poll_failed", failure)
        )

    def command(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "wsgate.worker",
            str(index),
            self.path,
            json.dumps(self.listeners),
        ]

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        process = _WorkerProcess(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2}
        for listener in self.listeners:
            child_fds[listener["fd"]] = listener["fd"]
        argv = self.command(index)
        self.reactor.spawnProcess(
            process,
            argv[0],
            argv,
            env=self.env,
            childFDs=child_fds,  # type: ignore[arg-type]
        )
        self.processes[index] = process
        self.log.info("worker_started {worker} pid={pid}", worker=index, pid=process.pid)

    # -- supervision ---------------------------------------------------------------------------

    def worker_ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self.processes.get(index) is process:
            del self.processes[index]
        snapshot = self.aggregate.snapshots.get(index)
        self.aggregate.update(index, None)
        exit_code = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        how = f"signal {signal_number}" if signal_number else f"exit {exit_code}"
        if self.stopping:
            self.log.info(
                "worker_stopped {worker} pid={pid} {how}", worker=index, pid=process.pid, how=how
            )
            return
        lost = snapshot["session_count"] if snapshot else 0
        self.log.error(
            "worker_died {worker} pid={pid} {how}: {lost} sessions lost",
            worker=index,
            pid=process.pid,
            how=how,
            lost=lost,
        )
        for row in ((snapshot or {}).get("sessions") or [])[:LOST_LOGGED]:
            self.log.warn(
                "session_lost {session_id} client={client} route={route} server={server}",
                session_id=qualified_id(index, row["id"]),
                client=row["client"],
                route=row["route"],
                server=row["server"],
            )
        lived = self.reactor.seconds() - process.started
        delay = RESTART_FIRST if lived >= STABLE_AFTER else self._delays.get(index, RESTART_FIRST)
        self._delays[index] = min(delay * 2, RESTART_MAX)
        self.log.info("worker_restart {worker} in {delay}s", worker=index, delay=delay)
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def poll(self) -> defer.Deferred:
        """Ask every worker for its snapshot; the Aggregate takes each as it arrives."""
        calls = []
        for index, process in list(self.processes.items()):
            d = process.channel.request("snapshot", rows=self.rows)
            d.addCallbacks(
                lambda snap, index=index, process=process: self._snapshot(index, process, snap),
                lambda failure, index=index: self.log.warn(
                    "worker_snapshot_failed {worker}: {problem}",
                    worker=index,
                    problem=failure.getErrorMessage(),
                ),
            )
            calls.append(d)
        return defer.gatherResults(calls)

    def _snapshot(self, index: int, process: _WorkerProcess, snapshot: dict[str, Any]) -> None:
        if self.processes.get(index) is process:
            self.aggregate.update(index, snapshot)

    # -- fan-out -------------------------------------------------------------------------------

    def send(self, index: int, call: str, **args: Any) -> defer.Deferred:
        process = self.processes.get(index)
        if process is None:
            return defer.fail(LookupError(f"no worker {index} running"))
        return process.channel.request(call, **args)

    def broadcast(self, call: str, **args: Any) -> defer.Deferred:
        calls = [p.channel.request(call, **args) for p in list(self.processes.values())]
        return defer.gatherResults(calls, consumeErrors=True)

    def reload(self) -> list[str]:
        """SIGHUP: validate the file here, then have every worker reload it; returns what
        changed here (each worker logs its own outcome)."""
        return self._reload()[0]

    def reload_all(self) -> defer.Deferred:
        """
        The control API's reload: as :meth:`reload`, firing once every worker has answered with
        what changed, the lines of the workers (run-time changes the file reset) included.  A
        refused file raises ConfigError at once.
        """
        changes, answers = self._reload()

        def merged(results: list[list[str]]) -> list[str]:
            lines = list(changes)
            for result in results:
                lines += [line for line in result if line not in lines]
            if len(lines) > 1 and "nothing changed" in lines:
                lines.remove("nothing changed")
            return lines

        return answers.addCallback(merged)

    def _reload(self) -> tuple[list[str], defer.Deferred]:
        """Validate the file and send it to the workers (announced to systemd as a reload)."""
        if self.listening is None:
            return self._reload_workers()
        return self.listening.reloading(self._reload_workers)()

    def _reload_workers(self) -> tuple[list[str], defer.Deferred]:
        try:
            new = configmod.load(self.path)
        except configmod.ConfigError:
            self.aggregate.reloads.record(False, self.reactor.seconds())
            raise
        self.aggregate.reloads.record(True, self.reactor.seconds())
        changes = config_changes(self.config, new)
        if new.workers != self.config.workers:
            changes.append("workers changed: restart wsgate to apply it (kept as it is)")
        self.config = self.aggregate.config = new
        answers = []
        for index, process in list(self.processes.items()):
            answers.append(
                process.channel.request("reload").addCallbacks(
                    lambda result, index=index: self._reloaded(index, result),
                    lambda failure, index=index: self._reload_failed(index, failure),
                )
            )
        return changes, defer.gatherResults(answers)

    def _reloaded(self, index: int, result: list[str]) -> list[str]:
        self.log.info("worker_reloaded {worker}", worker=index)
        return list(result or [])

    def _reload_failed(self, index: int, failure: Failure) -> list[str]:
        problem = failure.getErrorMessage()
        self.log.error("worker_reload_failed {worker}: {problem}", worker=index, problem=problem)
        return [f"worker {index}: reload failed: {problem}"]

    # -- stop ----------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        """Every worker closes its sessions (1001) within the grace; then the sockets close."""
        super().stopService()
        self.stopping = True
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        processes = list(self.processes.values())
        for process in processes:
            process.channel.request("stop").addErrback(self._terminate, process)
        ended = defer.DeferredList([p.ended for p in processes])
        grace = self.config.limits.shutdown_grace + STOP_MARGIN
        kill = self.reactor.callLater(grace, self._kill, processes)
        ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        ended.addBoth(lambda _: self._close_ports())
        return ended

    def _terminate(self, failure: Failure, process: _WorkerProcess) -> None:
        _signal(process, "TERM")

    def _kill(self, processes: Iterable[_WorkerProcess]) -> None:
        for process in processes:
            if not process.ended.called:
                self.log.warn(
                    "worker_killed {worker} pid={pid}", worker=process.index, pid=process.pid
                )
                _signal(process, "KILL")

    def _close_ports(self) -> defer.Deferred:
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


def _signal(process: _WorkerProcess, name: str) -> None:
    try:
        transport: Any = process.transport
        if transport is not None:
            transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass

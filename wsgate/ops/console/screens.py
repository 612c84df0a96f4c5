"""
Where the ``gate`` commands write: :class:`ConsoleManhole`, the interactive prompt of an SSH
session with a pty (:class:`~wsgate.ops.prompt.EditingManhole` with a ``gate``, a greeting, and
live views: while one runs, Ctrl-C or q ends it and other keys are ignored), and
:class:`_ConsoleCommands`, the lines of an exec request or of a shell without a pty, run one after
the other with output to stdout, errors to stderr and an exit status.

Must not: log users in or speak SSH (:mod:`.ssh` does), or format figures (:mod:`.gate` does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from wsgate.ops.console.gate import Console, Gate
from wsgate.ops.prompt import EditingManhole, LineRunner

if TYPE_CHECKING:
    from wsgate.ops.console.live import _LiveView

__all__ = ["ConsoleManhole"]

_CTRL_C = b"\x03"


class ConsoleManhole(EditingManhole):
    """
    The prompt (:class:`~wsgate.ops.prompt.EditingManhole`), with a ``gate`` in its namespace, a
    greeting, and live views: while one runs, Ctrl-C (or q) ends it and other keys are ignored.
    """

    width = 80
    height = 24

    def __init__(self, console: Console, user: str) -> None:
        self.console = console
        self.user = user
        self.live: _LiveView | None = None
        super().__init__({"gate": Gate(console, user, self)})

    def connectionMade(self) -> None:
        super().connectionMade()
        self.console.log.info("console_session_opened user={user}", user=self.user)

    def initializeScreen(self) -> None:
        self.terminal.reset()
        self.terminal.write(
            f"wsgate console, logged in as {self.user}. gate.help() lists the commands; "
            "Ctrl-D leaves.\n".encode()
        )
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def connectionLost(self, reason: Any) -> None:
        if self.live is not None:
            live, self.live = self.live, None
            live.finish()
        self.console.log.info("console_session_closed user={user}", user=self.user)

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        if self.live is not None:
            if keyID in (_CTRL_C, b"q"):
                self.live.stop()
            return
        super().keystrokeReceived(keyID, modifier)

    def lineReceived(self, line: bytes) -> None:
        more = self.interpreter.push(line)
        self.pn = bool(more)
        if self.live is None:
            self._prompt()

    def _prompt(self) -> None:
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def write_lines(self, lines: Iterable[str]) -> None:
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write("".join(f"{line}\n" for line in lines).encode("utf-8", "replace"))

    def redraw(self, text: str) -> None:
        self.terminal.eraseDisplay()
        self.terminal.cursorHome()
        self.terminal.write(text.encode("utf-8", "replace") + b"\n")

    def end_live(self, summary: str) -> None:
        self.live = None
        self.write_lines([summary])
        self.terminal.write(self.ps[self.pn])


class _ConsoleCommands(LineRunner):
    """
    ``ssh host 'gate.sessions()'`` and ``echo 'gate.stats()' | ssh -T host``: the ``gate``
    commands without a terminal.  Output goes to the client's stdout, errors (one line each) to
    its stderr, and the channel closes with exit status 0, or 1 when a command failed.  A live
    view (``tap``) writes its lines until it ends or the client goes away; ``top`` prints each
    frame in full.
    """

    width = 120
    height = 40

    def __init__(self, console: Console, user: str, process: Any) -> None:
        self.live: _LiveView | None = None
        self.process = process
        console.log.info("console_commands_opened user={user}", user=user)
        self._user = user
        self._console = console
        super().__init__(
            {"gate": Gate(console, user, self)},
            process.write,
            process.errReceived,
            self._exit,
        )

    def busy(self) -> bool:
        return self.live is not None or super().busy()

    def _exit(self, status: int) -> None:
        self._console.log.info(
            "console_commands_closed user={user} status={status}", user=self._user, status=status
        )
        reason = ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status)
        self.process.processEnded(Failure(reason))

    def connection_lost(self) -> None:
        self.stop()
        if self.live is not None:
            live, self.live = self.live, None
            live.finish()

    # -- the screen of the gate commands -------------------------------------------------------

    def write_lines(self, lines: Iterable[str]) -> None:
        self.addOutput("".join(f"{line}\n" for line in lines))

    def redraw(self, text: str) -> None:
        self.addOutput(text + "\n\n")

    def end_live(self, summary: str) -> None:
        self.live = None
        self.write_lines([summary])
        self.resume()


class _Input:
    """The transport an SSH session's process protocol writes the client's input to."""

    def __init__(self, commands: _ConsoleCommands) -> None:
        self.commands = commands

    def write(self, data: bytes) -> None:
        self.commands.data_received(data)

    def loseConnection(self) -> None:
        self.commands.connection_lost()

"""
The console's Python prompt, without the gate: evaluation with one-line errors, tab completion,
line editing, and a runner for lines that come without a terminal (``ssh host 'cmd'``, piped input).

Owns how a line typed at the console is run and how its result or error is shown:

- An error is one line, never a traceback: ``no such command gate.sesions; did you mean
  gate.sessions?``, ``no such name gat; did you mean gate?``, ``gate.kick() missing 1 required
  positional argument: 'id'; usage: gate.kick(id, code=1001, reason='')``, or the message of the
  error a command raised (``no live session 99``).  Errors of other Python the operator types are
  ``TypeName: message``.
- A Deferred result (a command answered by a worker process) is shown when it fires, as its
  text; its failure as one error line.
- Tab completes names and attributes (``gate.se`` -> ``gate.session``), lists the choices when
  there are several, and indents at the start of a line.
- Keys: Ctrl-A/Home, Ctrl-E/End, Ctrl-B/F, Ctrl-U (to the start), Ctrl-W (the word before the
  cursor), Ctrl-K (to the end), Ctrl-L (redraw), Ctrl-D (leave on an empty line, else delete), Ctrl-P/N
  (history); other keys are ignored without a word in the gate's log.

Must not know about the gate: the namespace is given, and so is where output goes.
"""

from __future__ import annotations

import builtins
import difflib
import inspect
import os
import re
import rlcompleter
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.conch import manhole
from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["EditingManhole", "Interpreter", "LineRunner", "completions", "describe_error"]

# Piped input waiting to be run (a line without its end, or lines behind a slow command).
MAX_PENDING = 1 << 20
_QUALIFIED_CALL = re.compile(r"^(\w+)\.(\w+)\(\) ")
_TRAILING_NAME = re.compile(r"[\w.]*$")

# Control keys a shell user expects (the rest of the editing keys are Twisted's or insults').
CTRL_B, CTRL_F, CTRL_K, CTRL_N, CTRL_P = b"\x02", b"\x06", b"\x0b", b"\x0e", b"\x10"
CTRL_U, CTRL_W, CTRL_H = b"\x15", b"\x17", b"\x08"


# -- errors ----------------------------------------------------------------------------------------


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, [c for c in choices if not c.startswith("_")], 1, 0.6)
    return close[0] if close else ""


def _public(obj: object) -> list[str]:
    return [n for n in dir(obj) if not n.startswith("_")]


def _variable(namespace: dict[str, Any], obj: object) -> str | None:
    """The name ``obj`` has in the namespace, if any (``gate``)."""
    return next((k for k, v in namespace.items() if v is obj and not k.startswith("_")), None)


def usage(name: str, function: Callable[..., Any]) -> str:
    """``name(arg, key=default)``: a call's parameters without their annotations."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return f"{name}(...)"
    shown = []
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL:
            shown.append(f"*{p.name}")
        elif p.kind is p.VAR_KEYWORD:
            shown.append(f"**{p.name}")
        elif p.default is p.empty:
            shown.append(p.name)
        else:
            shown.append(f"{p.name}={p.default!r}")
    return f"{name}({', '.join(shown)})"


def describe_error(exc: BaseException, namespace: dict[str, Any], at_prompt: bool) -> str:
    """
    One line about an error raised by a line typed at the prompt.  ``at_prompt`` says whether it
    was raised by the typed line itself (a typo, a call with the wrong arguments) rather than
    inside what it called.
    """
    name = getattr(exc, "name", None)
    if isinstance(exc, NameError) and at_prompt and name:
        hint = _suggest(name, [*namespace, *dir(builtins)])
        return f"no such name {name}" + (f"; did you mean {hint}?" if hint else "")
    if isinstance(exc, AttributeError) and at_prompt and name:
        owner = exc.obj
        variable = _variable(namespace, owner)
        hint = _suggest(name, _public(owner))
        if variable is not None and callable(getattr(owner, "help", None)):
            text = f"no such command {variable}.{name}"
            return text + (
                f"; did you mean {variable}.{hint}?" if hint else f"; see {variable}.help()"
            )
        where = variable or type(owner).__name__
        return f"{where} has no attribute {name}" + (f"; did you mean {hint}?" if hint else "")
    if isinstance(exc, TypeError) and at_prompt and (m := _QUALIFIED_CALL.match(str(exc))):
        for variable, value in namespace.items():
            method = getattr(value, m.group(2), None)
            if type(value).__name__ == m.group(1) and callable(method):
                message = str(exc).replace(f"{m.group(1)}.", f"{variable}.", 1)
                return f"{message}; usage: {usage(f'{variable}.{m.group(2)}', method)}"
    if isinstance(exc, KeyError | LookupError | ValueError | NotImplementedError) and exc.args:
        # The commands' own refusals (no such session, a bad code, ...): their message is the line.
        first = exc.args[0]
        return str(first) if isinstance(first, str) else f"{type(exc).__name__}: {first!r}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Interpreter(manhole.ManholeInterpreter):
    """
    Twisted's manhole interpreter with one-line errors (:func:`describe_error`) and Deferred
    results shown as their value.  The handler gets ``addOutput(text, isAsync)`` and
    ``addError(line)``; ``pending`` counts the Deferreds not fired yet, and ``settled`` (when
    set) is called as each fires.
    """

    def __init__(self, handler: Any, namespace: dict[str, Any]) -> None:
        super().__init__(handler, namespace)
        self.pending = 0
        self.settled: Callable[[], None] | None = None

    def showsyntaxerror(self, filename: str | None = None, **kwargs: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, SyntaxError):
            where = f" (column {exc.offset})" if exc.offset else ""
            self.handler.addError(f"syntax error: {exc.msg}{where}")
        else:
            self.handler.addError(f"syntax error: {exc}")

    def showtraceback(self) -> None:
        _, exc, tb = sys.exc_info()
        assert exc is not None
        # The frames below runcode: the typed line's own, then (if any) what it called.
        frames = []
        while tb is not None:
            frames.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        typed = [f for f in frames if f == self.filename]
        at_prompt = bool(typed) and frames[-1] == self.filename
        self.handler.addError(describe_error(exc, self.locals, at_prompt))

    def runcode(self, code: Any) -> None:
        try:
            super().runcode(code)
        except SystemExit:
            self.handler.addError("exit() does not end the console: press Ctrl-D")

    def displayhook(self, obj: object) -> None:
        if isinstance(obj, defer.Deferred) and not obj.called:
            self.pending += 1
            obj.addCallbacks(self._fired, self._failed)
            return
        if isinstance(obj, defer.Deferred):
            obj.addBoth(self._show_now)
            return
        super().displayhook(obj)

    def _show_now(self, result: object) -> None:
        if isinstance(result, Failure):
            self.handler.addError(describe_error(result.value, self.locals, False))  # type: ignore[arg-type]
        elif result is not None:
            self.write(repr(result))

    def _fired(self, result: object) -> None:
        self.pending -= 1
        if result is not None:
            self.locals["_"] = result
            self.write(repr(result) + "\n", True)
        if self.settled is not None:
            self.settled()

    def _failed(self, failure: Failure) -> None:
        self.pending -= 1
        self.handler.addError(describe_error(failure.value, self.locals, False), True)  # type: ignore[arg-type]
        if self.settled is not None:
            self.settled()


# -- completion ------------------------------------------------------------------------------------


def completions(namespace: dict[str, Any], text: str) -> list[str]:
    """
    What ``text`` (a name or a dotted attribute path) completes to in ``namespace``: callables
    end with ``(``; names starting with ``_`` only when ``text``'s last part does.
    """
    completer = rlcompleter.Completer(namespace)
    found: list[str] = []
    for state in range(500):
        try:
            match = completer.complete(text, state)
        except Exception:  # an attribute that raises when read: no completion
            break
        if match is None:
            break
        if match not in found:
            found.append(match)
    return sorted(found)


# -- the terminal prompt ---------------------------------------------------------------------------


class EditingManhole(manhole.ColoredManhole):
    """
    :class:`~twisted.conch.manhole.ColoredManhole` with :class:`Interpreter`, tab completion
    and the editing keys of the module docstring.  Subclasses give ``namespace``.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.interpreter = Interpreter(self, self.namespace)  # type: ignore[arg-type]
        self.keyHandlers.update(
            {
                CTRL_B: self.handle_LEFT,
                CTRL_F: self.handle_RIGHT,
                CTRL_H: self.handle_BACKSPACE,
                CTRL_P: self.handle_UP,
                CTRL_N: self.handle_DOWN,
                CTRL_U: self.handle_KILL_START,
                CTRL_W: self.handle_KILL_WORD,
                CTRL_K: self.handle_KILL_END,
            }
        )

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        handler = self.keyHandlers.get(keyID)
        if handler is not None:
            handler()
        elif isinstance(keyID, bytes) and keyID in self._printableChars:
            self.characterReceived(keyID, False)
        # Any other key (a function key, Alt-x, an unbound control key) does nothing.

    def addError(self, line: str, isAsync: bool | None = None) -> None:
        self.addOutput(line + "\n", isAsync)

    # -- editing -------------------------------------------------------------------------------

    def _set_line(self, before: bytes, after: bytes) -> None:
        """Replace the input line by ``before`` + ``after``, the cursor between them."""
        self.lineBuffer = [bytes([c]) for c in before + after]
        self.lineBufferIndex = len(before)
        self.terminal.write(b"\r")
        self.terminal.eraseToLineEnd()
        self.terminal.write(self.ps[self.pn] + before + after)
        if after:
            self.terminal.cursorBackward(len(after))

    def handle_KILL_START(self) -> None:
        """Ctrl-U: delete from the start of the line to the cursor."""
        self._set_line(b"", self.currentLineBuffer()[1])

    def handle_KILL_END(self) -> None:
        """Ctrl-K: delete from the cursor to the end of the line."""
        self._set_line(self.currentLineBuffer()[0], b"")

    def handle_KILL_WORD(self) -> None:
        """Ctrl-W: delete the word before the cursor (and the blanks after it), as bash does."""
        before, after = self.currentLineBuffer()
        kept = before.rstrip()
        kept = kept[: len(kept) - len(kept.split()[-1])] if kept.split() else b""
        self._set_line(kept, after)

    def handle_EOF(self) -> None:
        """Ctrl-D: leave on an empty line; otherwise delete the character under the cursor."""
        if self.lineBuffer:
            self.handle_DELETE()
        else:
            self.handle_QUIT()

    def handle_TAB(self) -> None:
        before, after = self.currentLineBuffer()
        text = _TRAILING_NAME.search(before.decode("utf-8", "replace"))
        word = text.group() if text else ""
        if before.count(b'"') % 2 or before.count(b"'") % 2:
            self.terminal.write(b"\a")  # inside a string: nothing to complete
            return
        if not word:
            for _ in range(self.TABSTOP - len(before) % self.TABSTOP):
                self.characterReceived(b" ", False)
            return
        matches = completions(self.namespace, word)  # type: ignore[arg-type]
        common = os.path.commonprefix(matches)
        if len(common) > len(word):
            self._set_line(before + common[len(word) :].encode(), after)
        elif len(matches) > 1:
            self.terminal.nextLine()
            shown = [m.rstrip("(") for m in matches]
            self.terminal.write("  ".join(shown).encode("utf-8", "replace"))
            self.terminal.nextLine()
            self._set_line(before, after)
        else:
            self.terminal.write(b"\a")


# -- lines without a terminal ----------------------------------------------------------------------


class LineRunner:
    """
    Runs lines of Python without a terminal: an SSH exec request (the command, then the end) or
    piped input (each line as it comes, then the end at EOF).  Output goes to ``write``, errors
    (one line each) to ``error``; ``done(status)`` is called once, with 0, or 1 when any line
    failed.  A line waits while the previous one is busy (``busy()``: a Deferred result not
    fired yet, or whatever a subclass adds).  More than :data:`MAX_PENDING` bytes waiting is an
    error that ends the run.
    """

    def __init__(
        self,
        namespace: dict[str, Any],
        write: Callable[[bytes], None],
        error: Callable[[bytes], None],
        done: Callable[[int], None],
    ) -> None:
        self._write = write
        self._error = error
        self._done: Callable[[int], None] | None = done
        self.failed = False
        self._partial = b""
        self._lines: deque[bytes] = deque()
        self._queued = 0
        self._eof = False
        self._more = False
        self._last = b"\n"
        self.interpreter = Interpreter(self, namespace)
        self.interpreter.settled = self.resume

    # -- input ---------------------------------------------------------------------------------

    def run_command(self, command: bytes) -> None:
        """An exec request: run ``command`` (its lines) and end."""
        self.data_received(command + b"\n")
        self.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._done is None:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._lines.append(line.rstrip(b"\r"))
            self._queued += len(line) + 1
        if self._queued + len(self._partial) > MAX_PENDING:
            self._lines.clear()
            self.addError(f"input refused: more than {MAX_PENDING} bytes waiting to run")
            self._finish()
            return
        self.resume()

    def eof_received(self) -> None:
        if self._partial:
            self._lines.append(self._partial.rstrip(b"\r"))
            self._partial = b""
        self._eof = True
        self.resume()

    # -- running -------------------------------------------------------------------------------

    def busy(self) -> bool:
        return self.interpreter.pending > 0

    def resume(self) -> None:
        """Run the waiting lines until one is busy; end after the last at EOF."""
        while self._done is not None and self._lines and not self.busy():
            line = self._lines.popleft()
            self._queued -= len(line) + 1
            self._more = bool(self.interpreter.push(line))
            if self._last != b"\n":
                self._output(b"\n")
        if self._done is None or self.busy() or self._lines or not self._eof:
            return
        if self._more:  # an unfinished block (a for loop) at the end: a blank line runs it
            self._more = False
            self._lines.append(b"")
            self.resume()
            return
        self._finish()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(1 if self.failed else 0)

    def stop(self) -> None:
        """The client went away: run nothing more."""
        self._done = None
        self._lines.clear()

    # -- the interpreter's handler -------------------------------------------------------------

    def addOutput(self, data: str | bytes, isAsync: bool | None = None) -> None:
        self._output(data.encode("utf-8", "replace") if isinstance(data, str) else data)

    def _output(self, data: bytes) -> None:
        if data:
            self._last = data[-1:]
            self._write(data)

    def addError(self, line: str, isAsync: bool | None = None) -> None:
        self.failed = True
        self._error(line.encode("utf-8", "replace") + b"\n")

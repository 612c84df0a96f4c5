"""
The gate's log: the observer wsgate installs, its level filter and its two line formats.

Owns how an event becomes a line.  ``text`` is Twisted's classic line (``TIME [namespace#level]
message``) with every value written after a ``key=`` in the message logfmt-safe: quoted with double
quotes and escaped when it holds a space, a quote, a backslash, an ``=`` or a control character;
None written as nothing (``server=``); booleans as ``true``/``false``; lists comma-separated.  ``json`` is one JSON object
per line: the event's own fields, plus ``time`` (ISO 8601, UTC), ``level``, ``event`` (the first
word of the message, e.g. ``session_closed``; for other libraries' messages the logger's
namespace), ``message`` (the text line's message), ``namespace`` and, for a failure, ``traceback``.
An event field named like one of those is written as ``field_<name>``.

The :class:`GateLog` observer drops events below ``[log] level`` (a ``LogLevelFilterPredicate``)
and follows a reload: it reads the current ``[log]`` settings through a callable on every event
(an identity check) and switches level and format when they change.  Under twistd,
``service.py`` hands it to the application as its ``ILogObserver`` component, which twistd
installs instead of its own observer; :func:`twistd_log_file` opens what twistd would have
written to.

Must not redact: the events' fields are already what may be shown (``wsgate.core.redact``).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import re
import string
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

from wsgate.config import LogSpec
from wsgate.core.redact import logfmt_value

__all__ = [
    "LEVELS",
    "GateLog",
    "event_name",
    "json_line",
    "message",
    "text_line",
    "twistd_log_file",
]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
# The keys every JSON line has; an event field of the same name is renamed field_<name>.
_ENVELOPE = ("time", "level", "event", "message", "namespace", "traceback")
# Keys of events that come from twisted.python.log (legacy) and are not fields of the event.
_LEGACY_KEYS = ("message", "isError", "system", "time", "format", "why", "failure")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_formatter = string.Formatter()


class _Calls(Mapping[str, Any]):
    """The event as a format mapping where ``{name()}`` calls the value, as Twisted's does."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        self._event = event

    def __getitem__(self, key: str) -> Any:
        if key.endswith("()"):
            return self._event[key[:-2]]()
        return self._event[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._event)

    def __len__(self) -> int:
        return len(self._event)


def message(event: dict[str, Any]) -> str:
    """
    The event's message, formatted like Twisted's ``formatEvent`` except that a value right after
    ``=`` is written logfmt-safe (None as nothing, booleans lower-case, quoted when needed).  An
    event that does not format is left to ``formatEvent`` (which says why).
    """
    form = event.get("log_format")
    if not isinstance(form, str):
        return formatEvent(event)
    try:
        mapping = _Calls(event)
        out = []
        for literal, field, spec, conversion, plain in _parsed(form):
            out.append(literal)
            if field is None:
                continue
            value = event[field] if plain else _formatter.get_field(field, (), mapping)[0]
            if conversion:
                value = _formatter.convert_field(value, conversion)
            if spec and "{" in spec:
                spec = _formatter.vformat(spec, (), mapping)
            if not literal.endswith("="):
                out.append(format(value, spec or ""))
            elif value is None:
                pass
            elif isinstance(value, bool):
                out.append("true" if value else "false")
            elif isinstance(value, list | tuple):
                out.append(logfmt_value(",".join(str(v) for v in value)))
            else:
                out.append(logfmt_value(format(value, spec or "")))
        return "".join(out)
    except Exception:  # noqa: BLE001  Twisted's own formatting reports the problem in the line
        return formatEvent(event)


@functools.lru_cache(maxsize=256)
def _parsed(form: str) -> list[tuple[str, str | None, str | None, str | None, bool]]:
    """A format string's pieces, parsed once (log lines reuse a few formats): each with whether
    its field is a plain name, looked up directly rather than through ``Formatter.get_field``."""
    return [
        (literal, field, spec, conversion, field is not None and field.isidentifier())
        for literal, field, spec, conversion in _formatter.parse(form)
    ]


@functools.lru_cache(maxsize=4)
def _second(when: int) -> str:
    return formatTime(when)


def _format_time(when: float | None) -> str:
    """Twisted's ``formatTime``, made once per second (its lines show whole seconds)."""
    return formatTime(when) if when is None else _second(int(when))


def event_name(event: Mapping[str, Any], text: str) -> str:
    """
    The event's name: the first word of its message (``session_closed``), after the ``worker N:``
    of a line from a worker; the logger's namespace when that word is not a lower-case name.
    """
    words = text.split(" ", 3)
    word = words[2] if words[0] == "worker" and "worker" in event and len(words) > 2 else words[0]
    if _NAME.fullmatch(word):
        return word
    return str(event.get("log_namespace") or "-")


def text_line(event: dict[str, Any]) -> str | None:
    """
    The classic Twisted line (``formatEventAsClassicLogText``), with the message of
    :func:`message`.  Events without a failure or a ``log_system`` of their own, which is every
    line the gate itself writes, are put together here: the same text, for a third less
    (the access-log line, written once per session, took 7-9 % of a handshake's CPU in W5: this
    part of it 15.6 -> 10.3 us; the rest is the message itself and Twisted's publishing).
    """
    if "log_failure" in event or "log_system" in event:
        return _classic_line(event)
    text = message(event)
    if not text:
        return None
    level = event.get("log_level")
    system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    line = f"{_format_time(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def _classic_line(event: dict[str, Any]) -> str | None:
    return formatEventAsClassicLogText(
        {**event, "log_format": "{log_wsgate_text}", "log_wsgate_text": message(event)},
        formatTime=_format_time,
    )


def _json_value(value: Any) -> Any:
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """One JSON object: the event's fields and the envelope (see the module docstring)."""
    text = message(event)
    legacy = event.get("log_namespace") == "log_legacy"
    fields = {
        key: _json_value(value)
        for key, value in event.items()
        if not key.startswith("log_") and not (legacy and key in _LEGACY_KEYS)
    }
    for key in _ENVELOPE:
        if key in fields:
            fields[f"field_{key}"] = fields.pop(key)
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": None
        if when is None
        else datetime.datetime.fromtimestamp(when, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": getattr(level, "name", None),
        "event": event_name(event, text),
        "message": text,
        "namespace": event.get("log_namespace"),
        **fields,
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001  a broken failure must not break the log
            record["traceback"] = "(unable to format the traceback)"
    return json.dumps(record, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class GateLog:
    """
    Writes events at or above the current ``[log] level`` to ``out``, as ``text`` or ``json``
    lines.  ``current`` returns the current :class:`~wsgate.config.LogSpec` (the gateway's config
    after any reload).
    """

    def __init__(self, out: IO[Any], current: Callable[[], LogSpec]) -> None:
        self.out = out  # where the lines go
        self._current = current
        self._predicate = LogLevelFilterPredicate(LogLevel.info)
        self._writers = {
            "text": FileLogObserver(out, text_line),
            "json": FileLogObserver(out, json_line),
        }
        self._spec: LogSpec | None = None
        self._observer: Any = None
        self._apply(current())

    def _apply(self, spec: LogSpec) -> None:
        self._spec = spec
        self._predicate.setLogLevelForNamespace("", LEVELS[spec.level])
        writer: Any = self._writers[spec.format]
        predicate: Any = self._predicate
        self._observer = FilteringLogObserver(writer, [predicate])

    def __call__(self, event: dict[str, Any]) -> None:
        spec = self._current()
        if spec is not self._spec:
            self._apply(spec)
        self._observer(event)


def twistd_log_file(options: Mapping[str, Any]) -> IO[Any] | None:
    """
    Where twistd would write its log for its ``options`` (``ServerOptions``): stdout in the
    foreground without ``--logfile`` (or with ``--logfile=-``), else the log file (default
    ``twistd.log``).  The file is never rotated by the gate (twistd's own LogFile rotates every
    megabyte and keeps every file): SIGUSR1 reopens it, for logrotate (or any tool) that has moved
    it away.  None when twistd logs elsewhere (``--syslog``, ``--logger``) or would refuse (a
    daemon logging to stdout): then its own observer stays.
    """
    if options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile") or ""
    if name == "-" or (not name and options.get("nodaemon")):
        return sys.stdout if options.get("nodaemon") else None
    from twisted.python import logfile

    out = logfile.LogFile.fromFullPath(name or "twistd.log", rotateLength=None)
    import signal

    if not signal.getsignal(signal.SIGUSR1):

        def reopen(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.reopen)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, reopen)
    return out

"""
The ops console: an SSH manhole into the running gate, with a ``gate`` object of commands.

Owns SSH login (public keys from an OpenSSH ``authorized_keys`` file, optionally bcrypt-hashed
passwords from an htpasswd-style ``users`` file; both files are re-read at every login, so removing
a key takes effect at once), the persisted host key, and the ``gate`` namespace: readable tables
(``sessions``, ``upstreams``, ``stats``), one session in full, verbs that act (``kick``, ``drain``,
``undrain``, ``weight``, ``reload``; each logged with the console user's name) and two live views
(``tap``, ``top``) that run until Ctrl-C.  Full Python stays available for the rare deep dive.
The prompt itself (one-line errors, completion, editing keys, lines without a terminal) is
:mod:`wsgate.ops.prompt`; here it gets the ``gate``.  An SSH session with a pty is the prompt;
an exec request or a shell without a pty runs the lines it is given and exits 0 or 1.  Logins,
logouts and refused logins are logged with the source address (refusals rate limited).

Must not hold business logic: commands read and act through the gate's operations view
(:mod:`wsgate.ops.view`, the same for one process and for workers, and the same the control API
uses) and format what they get back; the figures come from :mod:`wsgate.ops.status`.

Live views never slow the gate down: a tap records at most :data:`TAP_QUEUE` messages between two
screen refreshes and counts the rest as dropped; the relay pays one call per message while tapped.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import bcrypt
from twisted.application import service, strports
from twisted.conch import error as conch_error
from twisted.conch import manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, threads
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate.config import ConfigError, ConsoleSpec, parse_duration
from wsgate.core.limits import WarningLimiter
from wsgate.dataplane.tap import TAP_QUEUE, TAP_REFRESH, Tapped
from wsgate.ops import status
from wsgate.ops.prompt import EditingManhole, LineRunner
from wsgate.ops.view import check_kick, find_server

if TYPE_CHECKING:
    from wsgate.ops.view import GateView

__all__ = [
    "Console",
    "ConsoleError",
    "Gate",
    "Text",
    "console_problems",
    "console_service",
    "fingerprint",
    "load_authorized_keys",
    "load_host_key",
    "load_users",
    "table",
]

# How many tap lines per refresh at most (TAP_REFRESH: how often a tap's screen is written).
TAP_LINES_PER_REFRESH = 200
TOP_REFRESH = 1.0
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
# Compared against when the user name is unknown, so a wrong name costs as much time as a wrong
# password (made with bcrypt.hashpw(b"-", bcrypt.gensalt(12))).
_DUMMY_HASH = b"$2b$12$jR8X9f6/IgfcX6Hpu7PTH.BXuVns/cwar.rlqYwYJhwtRj0UQbePu"
_CTRL_C = b"\x03"


class ConsoleError(Exception):
    """The console cannot start: a problem with its key files, one line per problem."""


class Text(str):
    """A string the console shows as it is (its repr is itself), so tables print readably."""

    def __repr__(self) -> str:
        return str(self)


class _Screen(Protocol):
    """Where the ``gate`` commands and live views write: a terminal, or the output of an exec."""

    live: _LiveView | None
    width: int
    height: int

    def write_lines(self, lines: Iterable[str]) -> None: ...

    def redraw(self, text: str) -> None: ...

    def end_live(self, summary: str) -> None: ...


# -- formatting ------------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _rate(n: float) -> str:
    return f"{n:.1f}" if n < 100 else f"{n:.0f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], right: str = "") -> str:
    """An aligned text table; ``right`` names the right-aligned columns by index (``"0457"``)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            row[i].rjust(widths[i]) if str(i) in right else row[i].ljust(widths[i])
            for i in range(len(headers))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _preview(is_binary: bool, size: int, first: bytes, width: int) -> str:
    if is_binary:
        shown = first[: max(4, width // 3)]
        text = shown.hex(" ")
        return text + (" ..." if size > len(shown) else "")
    text = first.decode("utf-8", "replace")
    cut = len(text) > width or size > len(first)
    text = text[:width]
    return repr(text)[:-1] + ("...'" if cut else "'")


# -- the gate namespace ----------------------------------------------------------------------------


class Console:
    """
    What every console connection shares: the gate's operations view (one process or workers),
    the sampler for rates, the clock.  One per ``[console]``; built by ``service.py``.
    """

    log = Logger()

    def __init__(self, view: GateView, clock: Any, sampler: status.Sampler | None = None) -> None:
        self.view = view
        self.clock = clock
        self.sampler = sampler
        # Refused logins are logged at most 10 a minute (the rest counted), so that a password
        # guesser cannot flood the log.
        self.refusals = WarningLimiter(clock.seconds)


class _LiveView:
    """A view that owns the screen until Ctrl-C (or its end): a tap or top."""

    def __init__(self, gate: Gate, interval: float) -> None:
        self.gate = gate
        self.interval = interval
        self._call: Any = None

    def start(self) -> None:
        self.gate._terminal.live = self
        self._call = self.gate._console.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        if self.refresh():
            self._call = self.gate._console.clock.callLater(self.interval, self._tick)

    def refresh(self) -> bool:
        """Update the screen; False when the view has ended by itself."""
        raise NotImplementedError

    def stop(self, why: str = "stopped") -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.finish()
        self.gate._terminal.end_live(self.summary(why))

    def finish(self) -> None:
        pass

    def summary(self, why: str) -> str:
        return why


class _Tap(_LiveView):
    """
    Streams one session's messages: time, direction, type, size and a preview.  The view's tap
    hands them over in batches (at most TAP_QUEUE per refresh; the rest are counted as dropped),
    and says once why it ended (the session closed, its worker is gone).
    """

    def __init__(self, gate: Gate, id: object) -> None:
        super().__init__(gate, TAP_REFRESH)
        self.id = id
        self.queue: deque[Tapped] = deque()
        self.shown = 0
        self.dropped = 0
        self._reported_drops = 0
        self.number: int | None = None
        self._ended: str | None = None

    def start(self) -> None:
        """Tap the session (a LookupError when there is none), then own the screen."""
        self.number, answer = self.gate.view.tap(self.id, self)
        answer.addErrback(self._failed)
        super().start()

    def _failed(self, failure: Any) -> None:
        self.tap_ended(f"failed: {failure.getErrorMessage()}")

    def tapped(self, messages: list[Tapped], dropped: int) -> None:
        for message in messages:
            if len(self.queue) >= TAP_QUEUE:
                self.dropped += 1
            else:
                self.queue.append(message)
        self.dropped += dropped

    def tap_ended(self, why: str) -> None:
        self.number = None
        if self._ended is None:
            self._ended = f"session {self.id} {why}"

    def refresh(self) -> bool:
        width = max(20, self.gate._terminal.width - 40)
        out = []
        for _ in range(min(len(self.queue), TAP_LINES_PER_REFRESH)):
            when, direction, is_binary, size, first = self.queue.popleft()
            stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
            arrow = "client->backend" if direction == "up" else "backend->client"
            kind = "binary" if is_binary else "text"
            preview = _preview(is_binary, size, first, width)
            out.append(f"{stamp} {arrow} {kind:<6} {_size(size):>9}  {preview}")
            self.shown += 1
        if self.dropped > self._reported_drops:
            out.append(
                f"... {self.dropped - self._reported_drops} messages not shown "
                "(console too slow; the session was not slowed)"
            )
            self._reported_drops = self.dropped
        if out:
            self.gate._terminal.write_lines(out)
        if self._ended is not None and not self.queue:
            self.stop(self._ended)
            return False
        return True

    def finish(self) -> None:
        number, self.number = self.number, None
        if number is not None:
            self.gate.view.untap(number)

    def summary(self, why: str) -> str:
        return f"tap of session {self.id} {why}: {self.shown} shown, {self.dropped} dropped"


class _Top(_LiveView):
    """A refreshing screen of the busiest sessions (by messages per second) and the servers."""

    def __init__(self, gate: Gate) -> None:
        super().__init__(gate, TOP_REFRESH)
        self._previous: dict[object, tuple[float, int]] = {}
        self.frames = 0

    def start(self) -> None:
        super().start()
        self.refresh()

    def refresh(self) -> bool:
        console = self.gate._console
        view = console.view
        now = console.clock.seconds()
        rows = []
        previous = self._previous
        self._previous = {}
        for row in status.sessions(view):
            messages = row["messages_up"] + row["messages_down"]
            then = previous.get(row["id"])
            rate = (messages - then[1]) / (now - then[0]) if then and now > then[0] else 0.0
            self._previous[row["id"]] = (now, messages)
            rows.append((rate, row))
        rows.sort(key=lambda r: (r[0], r[1]["messages_up"] + r[1]["messages_down"]), reverse=True)
        stats = status.stats(view, console.sampler)
        rates = stats["rates"]
        term = self.gate._terminal
        servers = status.upstreams(view, now)
        room = max(3, term.height - len(servers) - 9)
        lines = [
            f"wsgate top  {time.strftime('%H:%M:%S')}  sessions {stats['sessions_active']} active, "
            f"{stats['sessions_opened']} opened  |  msg/s up {_rate(rates.get('messages_up', 0))} "
            f"down {_rate(rates.get('messages_down', 0))}  |  bytes/s up "
            f"{_size(rates.get('bytes_up', 0))} down {_size(rates.get('bytes_down', 0))}",
            "Ctrl-C to stop",
            "",
            table(
                ["ID", "CLIENT", "SERVER", "AGE", "MSG/S", "MSGS UP", "MSGS DOWN", "BYTES"],
                [
                    (
                        r["id"],
                        r["client"],
                        r["server"],
                        _age(r["age"]),
                        _rate(rate),
                        r["messages_up"],
                        r["messages_down"],
                        _size(r["bytes_up"] + r["bytes_down"]),
                    )
                    for rate, r in rows[:room]
                ],
                right="04567",
            ),
            "",
            _upstream_table(servers),
        ]
        term.redraw("\n".join(lines))
        self.frames += 1
        return True

    def summary(self, why: str) -> str:
        return f"top {why}"


def _upstream_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["UPSTREAM", "SERVER", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "FAILS", "LAST CHECK"],
        [
            (
                r["upstream"],
                r["server"],
                r["state"] + (" (backup)" if r["backup"] else ""),
                r["weight"],
                r["active"],
                r["sessions_total"],
                r["fails"],
                "never" if r["last_check"] is None else _age(r["last_check"]) + " ago",
            )
            for r in rows
        ],
        right="3456",
    )


def _settled(d: defer.Deferred, show: Callable[[Any], Any]) -> Any:
    """
    What the console prints for a verb's Deferred: ``show(result)`` at once when it has fired (a
    failure raises, so the console shows the error), else the Deferred of it (the manhole prints
    it when it fires: with workers, the answer comes from another process).
    """
    box: list[Any] = []

    def take(result: Any) -> Any:
        box.append(result)
        return result

    d.addBoth(take)
    if not box:
        return d.addCallback(show)
    d.addErrback(lambda _: None)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return show(box[0])


class Gate:
    """
    The wsgate console.  Commands (tables print as text; verbs are logged with your name):

      gate.sessions(filter=None)     live sessions; filter by route, server or client substring
      gate.session(id)               everything about one session (headers, ping RTT, ...)
      gate.kick(id, code=1001, reason="")   close a session: code to the client, 1001 to the backend
      gate.upstreams()               servers: state, weight, active sessions, fails, last check
      gate.drain(server, deadline=None, upstream=None)   no new sessions to a server; close its
                                     sessions by deadline
      gate.undrain(server, upstream=None)   take new sessions again
      gate.weight(server, w, upstream=None) change a server's balancing weight
      gate.reload()                  re-read the config file (like SIGHUP); shows what changed
      gate.stats()                   totals and rates: sessions, handshakes, messages and bytes
      gate.tap(id)                   stream one session's messages until Ctrl-C
      gate.top()                     live view of the busiest sessions and the servers until Ctrl-C
      gate.help()                    this text

    A server is its URL or any unique part of it ("8011"); a URL in several upstreams needs
    ``upstream="name"``.  ``gate.view`` is the operations view; ``gate.gateway`` the Gateway
    itself (one process only).

    With [cluster] (a fleet of gates sharing Redis; sessions named "GATE:ID"):

      gate.fleet()                   the fleet's gates: name, host, pid, sessions
      gate.fleet_sessions()          every session of every gate
      gate.fleet_kick("GATE:ID", code=1001, reason="")   close a session on any gate
      gate.fleet_push("GATE:ID", message)  send a session's client a message (str: text, bytes: binary)
      gate.fleet_drain(server, deadline=None, gate=None) drain a server on every gate that has it
    """

    def __init__(self, console: Console, user: str, terminal: _Screen) -> None:
        self._console = console
        self._user = user
        self._terminal = terminal
        self.view = console.view
        self.gateway = getattr(console.view, "gateway", None)

    def __repr__(self) -> str:
        return "<gate: wsgate console; gate.help() lists the commands>"

    def help(self) -> Text:
        """List the commands."""
        return Text(_dedent(Gate.__doc__ or ""))

    # -- reading -------------------------------------------------------------------------------

    def sessions(self, filter: str | None = None) -> Text:
        """Live sessions, oldest first; ``filter`` keeps those whose route, server or client contains it."""
        rows = status.sessions(self.view, filter)
        text = table(
            [
                "ID",
                "CLIENT",
                "ROUTE",
                "SERVER",
                "AGE",
                "IDLE",
                "MSGS UP",
                "BYTES UP",
                "MSGS DOWN",
                "BYTES DOWN",
                "SUBPROTOCOL",
                "TLS",
            ],
            [
                (
                    r["id"],
                    r["client"],
                    r["route"],
                    r["server"],
                    _age(r["age"]),
                    _age(r["idle"]),
                    r["messages_up"],
                    _size(r["bytes_up"]),
                    r["messages_down"],
                    _size(r["bytes_down"]),
                    r["subprotocol"],
                    "yes" if r["tls"] else "no",
                )
                for r in rows
            ],
            right="0456789",
        )
        total = self.view.session_count()
        shown = f"{len(rows)} of {total}" if filter else str(total)
        return Text(f"{text}\n({shown} session{'' if total == 1 else 's'})")

    def session(self, id: int | str) -> Any:
        """Everything known about one live session."""
        return _settled(self.view.session(id), self._session_text)

    def _session_text(self, d: dict[str, Any]) -> Text:
        rtt = (
            "pings off"
            if not d["ping_interval"]
            else f"client {_rtt(d['client_ping_rtt'])}, backend {_rtt(d['backend_ping_rtt'])}"
        )
        lines = [
            ("session", d["id"]),
            ("state", d["state"]),
            ("client", d["client"]),
            ("host", d["host"]),
            ("path", d["path"]),
            ("request id", d.get("request_id") or "-"),
            ("route", f"{d['route']} -> upstream {d['upstream']}"),
            ("server", d["server"]),
            ("subprotocol", d["subprotocol"] or "-"),
            ("tls", "yes" if d["tls"] else "no"),
            ("age", _age(d["age"])),
            ("idle", _age(d["idle"])),
            ("connect time", _ms(None if d["connect_time"] is None else d["connect_time"] * 1000)),
            ("ping rtt", rtt),
            ("auth", d.get("auth") or "-"),
            ("closes", _lifetime(d)),
            ("client->backend", f"{d['messages_up']} messages, {_size(d['bytes_up'])}"),
            ("backend->client", f"{d['messages_down']} messages, {_size(d['bytes_down'])}"),
        ]
        width = max(len(k) for k, _ in lines)
        out = [f"{k.ljust(width)}  {v}" for k, v in lines]
        out.append("forwarded headers:")
        out += [f"  {k}: {v}" for k, v in d["forwarded_headers"].items()]
        out.append("request headers:")
        out += [f"  {k}: {v}" for k, v in d["request_headers"].items()]
        return Text("\n".join(out))

    def upstreams(self) -> Text:
        """Every server of every upstream: state, weight, active sessions, fails, last check."""
        now = self._console.clock.seconds()
        return Text(_upstream_table(status.upstreams(self.view, now)))

    def stats(self) -> Text:
        """Totals since start and current rates."""
        s = status.stats(self.view, self._console.sampler)
        rates = s["rates"]
        handshakes = ", ".join(f"{k} {v}" for k, v in sorted(s["handshakes"].items())) or "none"
        rows = [
            ("uptime", _age(s["uptime"])),
            (
                "sessions",
                f"{s['sessions_active']} active, {s['sessions_opened']} opened, "
                f"{s['sessions_closed']} closed",
            ),
            ("handshakes", handshakes),
            (
                "client->backend",
                f"{s['messages_up']} messages, {_size(s['bytes_up'])}; now "
                f"{_rate(rates.get('messages_up', 0.0))} msg/s, "
                f"{_size(rates.get('bytes_up', 0.0))}/s",
            ),
            (
                "backend->client",
                f"{s['messages_down']} messages, {_size(s['bytes_down'])}; now "
                f"{_rate(rates.get('messages_down', 0.0))} msg/s, "
                f"{_size(rates.get('bytes_down', 0.0))}/s",
            ),
            ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items())),
        ]
        webhooks = ", ".join(f"{k} {v}" for k, v in sorted(s["webhooks"].items()))
        if webhooks:  # e.g. "connect.allow 12, disconnect.sent 11"
            rows.insert(-1, ("webhooks", webhooks))
        width = max(len(k) for k, _ in rows)
        return Text("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))

    # -- acting --------------------------------------------------------------------------------

    def kick(self, id: int | str, code: int = 1001, reason: str = "") -> Any:
        """Close one session: ``code`` and ``reason`` to the client, 1001 to the backend."""
        check_kick(code, reason)

        def kicked(row: dict[str, Any]) -> Text:
            self._logged("kick", f"session={id} client={row['client']} code={code}")
            return Text(f"closing session {id} with {code}" + (f" {reason!r}" if reason else ""))

        return _settled(self.view.kick(id, code, reason, f"console ({self._user})"), kicked)

    def drain(
        self, server: str, deadline: float | str | None = None, upstream: str | None = None
    ) -> Any:
        """Send no new sessions to ``server``; with ``deadline`` (seconds or "30s"), close its
        sessions within that time."""
        name, url = find_server(self.view, str(server), upstream)
        seconds = None if deadline is None else parse_duration(deadline)
        self._logged("drain", f"server={url} upstream={name} deadline={seconds}")

        def drained(count: int) -> Text:
            text = f"draining {url} of {name}: no new sessions"
            text += f"; {count} live session{'' if count == 1 else 's'} on it"
            return Text(text + (" stay" if seconds is None else f" close within {_age(seconds)}"))

        return _settled(self.view.drain(name, url, deadline=seconds), drained)

    def undrain(self, server: str, upstream: str | None = None) -> Any:
        """Let ``server`` take new sessions again."""
        name, url = find_server(self.view, str(server), upstream)
        self._logged("undrain", f"server={url} upstream={name}")
        done = self.view.undrain(name, url)
        return _settled(done, lambda _: Text(f"{url} of {name} takes new sessions again"))

    def weight(self, server: str, w: int, upstream: str | None = None) -> Any:
        """Set the balancing weight of ``server``."""
        name, url = find_server(self.view, str(server), upstream)
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise ValueError("a weight is a whole number of at least 1")
        self._logged("weight", f"server={url} upstream={name} weight={w}")
        return _settled(self.view.set_weight(name, url, w), lambda _: Text(f"{url} weight {w}"))

    def reload(self) -> Any:
        """Re-read the config file, as SIGHUP does; show what changed or why it was refused."""
        self._logged("reload", "")
        d = self.view.reload()

        def refused(failure: Failure) -> Text:
            failure.trap(ConfigError)
            problems = failure.value.problems  # type: ignore[union-attr]
            return Text("new config refused; the current one stays:\n" + "\n".join(problems))

        d.addCallbacks(lambda lines: Text("reloaded: " + "\n".join(lines)), refused)
        return _settled(d, lambda text: text)

    # -- the fleet ([cluster]): thin commands over wsgate.control.cluster.Cluster -----------------

    def fleet(self) -> defer.Deferred:
        """The gates of the fleet (a Deferred of the table)."""
        return self._fleet().gates().addCallback(self._fleet_table)

    def _fleet_table(self, gates: list[dict[str, Any]]) -> Text:
        rows = [(g["name"], g["host"], g["pid"], g["sessions"], g["version"]) for g in gates]
        text = table(["GATE", "HOST", "PID", "SESSIONS", "VERSION"], rows, right="23")
        return Text(text + self._fleet_note())

    def fleet_sessions(self) -> defer.Deferred:
        """Every live session of every gate of the fleet (a Deferred of the table)."""
        return self._fleet().sessions().addCallback(self._fleet_sessions_table)

    def _fleet_sessions_table(self, rows: list[dict[str, Any]]) -> Text:
        now = self._console.clock.seconds()
        text = table(
            ["SESSION", "CLIENT", "ROUTE", "SERVER", "AGE"],
            [
                (
                    f"{r['gate']}:{r['id']}",
                    r["client"],
                    r["route"],
                    r["server"],
                    _age(now - r["started"]),
                )
                for r in rows
            ],
        )
        return Text(f"{text}\n({len(rows)} sessions){self._fleet_note()}")

    def fleet_kick(self, target: str, code: int = 1001, reason: str = "") -> defer.Deferred:
        """Close session ``"GATE:ID"`` on whichever gate of the fleet holds it."""
        check_kick(code, reason)
        self._logged("fleet_kick", f"session={target} code={code}")
        d = self._fleet().kick(target, code, reason)
        return d.addCallback(lambda _: Text(f"closing session {target} with {code}"))

    def fleet_push(self, target: str, message: str | bytes) -> defer.Deferred:
        """Send session ``"GATE:ID"``'s client a message: text for a str, binary for bytes."""
        self._logged("fleet_push", f"session={target} size={len(message)}")
        d = self._fleet().push(target, message)
        return d.addCallback(lambda r: Text(f"pushed {r['bytes']} bytes to session {target}"))

    def fleet_drain(
        self, server: str, deadline: float | str | None = None, gate: str | None = None
    ) -> defer.Deferred:
        """Drain ``server`` on ``gate``, or on every gate of the fleet that has it."""
        seconds = None if deadline is None else parse_duration(deadline)
        self._logged("fleet_drain", f"server={server} deadline={seconds} gate={gate}")
        d = self._fleet().drain(server, seconds, gate=gate)
        return d.addCallback(
            lambda by_gate: Text(
                "\n".join(f"{name}: {result}" for name, result in sorted(by_gate.items()))
                or f"no gate of the fleet has {server}"
            ),
        )

    def _fleet(self) -> Any:
        fleet = self.view.fleet
        if fleet is None:
            raise ValueError("this gate is not in a fleet (no [cluster] in its config)")
        return fleet

    def _fleet_note(self) -> str:
        fleet = self._fleet()
        return "" if fleet.up else "\n(Redis is unreachable: this gate only)"

    def tap(self, id: int | str) -> Text | None:
        """Stream one session's messages (direction, type, size, preview) until Ctrl-C."""
        if self._terminal.live is not None:
            return Text("a live view is already running")
        tap = _Tap(self, id)
        tap.start()
        row = next((r for r in self.view.session_rows() if str(r["id"]) == str(id)), {})
        self._logged("tap", f"session={id} client={row.get('client')}")
        self._terminal.write_lines(
            [f"tapping session {id} ({row.get('client')} <-> {row.get('server')}); Ctrl-C to stop"]
        )
        return None

    def top(self) -> None:
        """A live view of the busiest sessions and the servers until Ctrl-C."""
        if self._terminal.live is not None:
            return
        _Top(self).start()

    # -- helpers -------------------------------------------------------------------------------

    def _logged(self, verb: str, detail: str) -> None:
        self._console.log.info(
            "console_{verb} user={user} {detail}", verb=verb, user=self._user, detail=detail
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _lifetime(d: dict[str, Any]) -> str:
    """When the gate will close a session by itself: credential expiry, max_session_age."""
    parts = []
    if d.get("credential_expires_in") is not None:
        parts.append(f"credential expires in {_age(d['credential_expires_in'])} (1008)")
    if d.get("max_age_close_in") is not None:
        parts.append(f"max session age in {_age(d['max_age_close_in'])} (1001)")
    return ", ".join(parts) or "-"


def _rtt(value: int | None) -> str:
    """Autobahn measures ping round trips in whole milliseconds."""
    return "no pong yet" if value is None else "<1 ms" if value < 1 else f"{value} ms"


def _dedent(text: str) -> str:
    lines = text.strip("\n").splitlines()
    indent = min((len(x) - len(x.lstrip()) for x in lines[1:] if x.strip()), default=0)
    return "\n".join([lines[0].strip()] + [x[indent:] for x in lines[1:]])


# -- the terminal protocol ------------------------------------------------------------------------


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


# -- SSH -------------------------------------------------------------------------------------------


def fingerprint(key: keys.Key) -> str:
    """The key's fingerprint as OpenSSH shows it (``ssh-keygen -lf``): ``SHA256:`` and base64."""
    return "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


def load_host_key(path: str) -> keys.Key:
    """
    The console's SSH host key: read from ``path``, or made (Ed25519) and written there with mode
    0600 when the file does not exist yet, so that clients' ``known_hosts`` stay valid.
    """
    if not os.path.exists(path):
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        data = key.toString("openssh")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        Console.log.info(
            "console_host_key_created {path} {fingerprint}",
            path=path,
            fingerprint=fingerprint(key),
        )
        return key
    try:
        with open(path, "rb") as f:
            key = keys.Key.fromString(f.read())
    except (OSError, keys.BadKeyError, ValueError) as e:
        raise ConsoleError(f"{path}: not a usable SSH private key: {e}") from None
    if key.isPublic():
        raise ConsoleError(f"{path}: a public key; the host key must be a private key")
    return key


def _content_lines(path: str) -> list[tuple[int, bytes]]:
    """The numbered lines of a keys or users file that are not blank or # comments."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConsoleError(f"{path}: {e.strerror or e}") from None
    stripped = ((number, raw.strip()) for number, raw in enumerate(lines, 1))
    return [(number, line) for number, line in stripped if line and not line.startswith(b"#")]


def load_authorized_keys(path: str) -> list[tuple[keys.Key, str]]:
    """
    The public keys of an OpenSSH ``authorized_keys`` file with their comments.  Blank lines and
    ``#`` comments are skipped; a line with options (``from=...``) or that is not a key is an
    error, so that no restriction is silently ignored.
    """
    found = []
    for number, line in _content_lines(path):
        parts = line.split(None, 2)
        try:
            if len(parts) < 2:
                raise ValueError("too short")
            key = keys.Key.fromString(b" ".join(parts[:2]))
        except (keys.BadKeyError, ValueError, IndexError, TypeError):
            raise ConsoleError(
                f"{path}:{number}: not a public key line (key options such as from= are not "
                "supported)"
            ) from None
        comment = parts[2].decode("utf-8", "replace") if len(parts) > 2 else ""
        found.append((key, comment))
    return found


def load_users(path: str) -> dict[bytes, bytes]:
    """
    ``name:hash`` lines (as ``htpasswd -B`` writes them): the bcrypt hash of each user's password.
    Any other hash, or a plain password, is an error.
    """
    users = {}
    for number, line in _content_lines(path):
        name, sep, hashed = line.partition(b":")
        if not sep or not name:
            raise ConsoleError(f"{path}:{number}: expected name:bcrypt-hash")
        if not hashed.startswith(_BCRYPT_PREFIXES) or len(hashed) != 60:
            raise ConsoleError(
                f"{path}:{number}: the password of {name.decode(errors='replace')!r} is not a "
                "bcrypt hash (make one with `htpasswd -nB NAME`); plain passwords are refused"
            )
        users[name] = hashed
    return users


@implementer(IAuthorizedKeysDB)
class _AuthorizedKeys:
    """An ``IAuthorizedKeysDB``: every key of the file, for any user name, read at each login."""

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> list[keys.Key]:
        try:
            return [key for key, _ in load_authorized_keys(self.path)]
        except ConsoleError as e:
            Console.log.error("console_keys_unreadable {problem}", problem=str(e))
            return []


def _key_comment(path: str | None, key: keys.Key) -> str:
    """The comment of ``key`` in the authorized_keys file (who it is), or ``""``."""
    if path is None:
        return ""
    try:
        return next((c for k, c in load_authorized_keys(path) if k == key), "")
    except ConsoleError:
        return ""


@implementer(ICredentialsChecker)
class _PasswordChecker:
    """bcrypt passwords from the users file, checked in a thread (bcrypt is slow on purpose)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self.reactor = reactor

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        try:
            users = load_users(self.path)
        except ConsoleError as e:
            Console.log.error("console_users_unreadable {problem}", problem=str(e))
            users = {}
        hashed = users.get(credentials.username)
        password = credentials.password
        d = threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            bcrypt.checkpw,
            password,
            hashed or _DUMMY_HASH,
        )

        def checked(ok: bool) -> bytes:
            if ok and hashed is not None:
                return credentials.username
            raise cred_error.UnauthorizedLogin()

        return d.addCallback(checked)


class _UserAuth(userauth.SSHUserAuthServer):
    """
    SSH user authentication that logs each login (``console_login``: user, method, the key's
    fingerprint and comment, source address) and its end (``console_logout``, with how long it
    lasted), and each refused attempt (``console_login_refused``, at most 10 a minute).
    """

    _key: keys.Key | None = None

    @property
    def _console(self) -> Console:
        return self.transport.factory.console  # type: ignore[union-attr,attr-defined]

    def _source(self) -> str:
        peer: Any = self.transport.transport.getPeer()  # type: ignore[union-attr,misc]
        host = getattr(peer, "host", None)
        return f"{host}:{peer.port}" if host is not None else str(peer)

    def _described(self) -> dict[str, str]:
        key = self._key
        fields = {
            "user": (self.user or b"").decode("utf-8", "replace"),
            "method": (self.method or b"").decode("ascii", "replace"),
            "source": self._source(),
        }
        if key is not None:
            fields["key"] = fingerprint(key)
        return fields

    def auth_publickey(self, packet: bytes) -> defer.Deferred:
        try:
            self._key = keys.Key.fromString(getNS(packet[1:], 2)[1])
        except (keys.BadKeyError, ValueError):
            self._key = None
        return super().auth_publickey(packet)

    def auth_password(self, packet: bytes) -> defer.Deferred:
        self._key = None
        return super().auth_password(packet)

    def _cbFinishedAuth(self, result: Any) -> None:
        interface, avatar, logout = result
        fields = self._described()
        console = self._console
        if self._key is not None:
            comment = _key_comment(self.transport.factory.authorized_keys, self._key)  # type: ignore[union-attr,attr-defined]
            console.log.info(
                "console_login user={user} method={method} key={key} comment={comment} "
                "source={source}",
                comment=comment or "-",
                **fields,
            )
        else:
            console.log.info("console_login user={user} method={method} source={source}", **fields)
        started = console.clock.seconds()

        def logged_out() -> None:
            console.log.info(
                "console_logout user={user} source={source} duration={duration:.1f}s",
                user=fields["user"],
                source=fields["source"],
                duration=console.clock.seconds() - started,
            )
            logout()

        super()._cbFinishedAuth((interface, avatar, logged_out))

    def _ebBadAuth(self, reason: Failure) -> None:
        quiet = reason.check(conch_error.IgnoreAuthentication, conch_error.ValidPublicKey)
        if not quiet and self.method != b"none":
            fields = self._described()
            text = "user={user} method={method} source={source}"
            if "key" in fields:
                text += " key={key}"
            self._console.refusals.warn("console_login_refused", text, **fields)
        super()._ebBadAuth(reason)


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


class _ConsoleSession(manhole_ssh.TerminalSession):
    """
    A session: with a pty, the interactive console (following window size changes; Ctrl-D
    quits, so EOF is ignored); without one (``ssh -T``, piped input) or for an exec request,
    :class:`_ConsoleCommands`.
    """

    _shell: Any = None
    _commands: _ConsoleCommands | None = None
    _pty = False
    console: Console
    user: str

    def getPty(self, term: bytes, windowSize: Any, attrs: Any) -> None:
        super().getPty(term, windowSize, attrs)
        self._pty = True

    def openShell(self, proto: Any) -> None:
        if not self._pty:
            self._run(proto)
            return
        self._shell = self.transportFactory(
            proto,
            self.chainedProtocolFactory(),
            IConchUser(self.original),
            self.width,
            self.height,
        )

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        self._run(proto).run_command(cmd)

    def _run(self, proto: Any) -> _ConsoleCommands:
        commands = self._commands = _ConsoleCommands(self.console, self.user, proto)
        proto.makeConnection(_Input(commands))
        return commands

    def windowChanged(self, newWindowSize: Any) -> None:
        if self._shell is not None:
            height, width = newWindowSize[:2]
            self._shell.chainedProtocol.terminalProtocol.terminalSize(width, height)

    def eofReceived(self) -> None:
        if self._commands is not None:
            self._commands.eof_received()


@implementer(IRealm)
class _ConsoleRealm(manhole_ssh.TerminalRealm):
    """Gives each logged-in user a terminal running a :class:`ConsoleManhole` in their name."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def _getAvatar(self, avatarId: bytes) -> Any:
        user = avatarId.decode("utf-8", "replace")
        comp = components.Componentized()
        avatar = self.userFactory(comp, avatarId)
        session = _ConsoleSession(comp)
        session.console = self.console
        session.user = user
        session.transportFactory = self.transportFactory
        session.chainedProtocolFactory = lambda: insults.ServerProtocol(  # type: ignore[misc,assignment]
            ConsoleManhole, self.console, user
        )
        comp.setComponent(IConchUser, avatar)
        comp.setComponent(ISession, session)
        return avatar


class _ConchFactory(manhole_ssh.ConchFactory):
    """
    An SSH factory with the console's own host key (not the class-level shared dicts) and
    :class:`_UserAuth`, which logs logins with what :attr:`console` holds.
    """

    def __init__(
        self, portal: Portal, host_key: keys.Key, console: Console, authorized_keys: str | None
    ) -> None:
        super().__init__(portal)
        name = host_key.sshType()
        self.publicKeys = {name: host_key.public()}  # type: ignore[dict-item]
        self.privateKeys = {name: host_key}  # type: ignore[dict-item]
        self.services = {**self.services, b"ssh-userauth": _UserAuth}
        self.console = console
        self.authorized_keys = authorized_keys


def console_problems(spec: ConsoleSpec) -> list[tuple[str, str]]:
    """
    Why the console of ``spec`` cannot start, as (config key, reason) pairs: a keys or users
    file that cannot be read, has a line the console refuses, or holds no key or user (it lets
    no one in: leave it out instead); a host key that exists but is not a usable private key.
    Reads only: a missing host key is not made here.  ``wsgate check`` and the start share it.
    """
    problems = []
    for key, path, load, what in (
        ("console.authorized_keys", spec.authorized_keys, load_authorized_keys, "no public key"),
        ("console.users", spec.users, load_users, "no user"),
    ):
        if path is None:
            continue
        try:
            if not load(path):  # type: ignore[operator]
                problems.append((key, f"{path}: holds {what}, so it lets no one in"))
        except ConsoleError as e:
            problems.append((key, str(e)))
    if os.path.exists(spec.host_key):
        try:
            load_host_key(spec.host_key)
        except ConsoleError as e:
            problems.append(("console.host_key", str(e)))
    return problems


def console_service(spec: ConsoleSpec, console: Console, reactor: Any) -> service.Service:
    """
    The console's listening service.  Raises :class:`ConsoleError` with the problems of
    :func:`console_problems` (or when the host key cannot be made), one per line.
    """
    problems = [reason for _, reason in console_problems(spec)]
    if not problems:
        try:
            host_key = load_host_key(spec.host_key)
        except (ConsoleError, OSError) as e:
            problems.append(str(e))
    if problems:
        raise ConsoleError("\n".join(problems))
    checkers: list[Any] = []
    if spec.authorized_keys is not None:
        checkers.append(SSHPublicKeyChecker(_AuthorizedKeys(spec.authorized_keys)))  # type: ignore[arg-type]
    if spec.users is not None:
        checkers.append(_PasswordChecker(spec.users, reactor))
    realm: Any = _ConsoleRealm(console)
    factory = _ConchFactory(Portal(realm, checkers), host_key, console, spec.authorized_keys)
    return strports.service(spec.endpoint, factory)  # type: ignore[arg-type]

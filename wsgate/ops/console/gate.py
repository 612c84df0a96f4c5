"""
The ``gate`` namespace of the console: :class:`Console` (what every console connection shares:
the gate's operations view, the sampler for rates, the clock) and :class:`Gate`, the commands:
readable tables (``sessions``, ``upstreams``, ``stats``), one session in full, verbs that act
(``kick``, ``drain``, ``undrain``, ``weight``, ``reload``, the fleet's; each logged with the
console user's name) and the two live views (``tap``, ``top``, in :mod:`.live`), written to a
:class:`_Screen` (the interactive terminal or the output of an exec, in :mod:`.screens`; its
interface is :mod:`.live`'s).

Must not hold business logic: commands read and act through the gate's operations view
(:mod:`wsgate.ops.view`, the same for one process and for workers, and the same the control API
uses) and format what they get back; the figures come from :mod:`wsgate.ops.status`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsgate.config import ConfigError, parse_duration
from wsgate.core.limits import WarningLimiter
from wsgate.ops import status
from wsgate.ops.console.live import _Screen, _Tap, _Top
from wsgate.ops.console.text import (
    Text,
    _age,
    _dedent,
    _lifetime,
    _ms,
    _rate,
    _rtt,
    _size,
    _upstream_table,
    table,
)
from wsgate.ops.view import check_kick, find_server

if TYPE_CHECKING:
    from wsgate.ops.view import GateView

__all__ = ["Console", "Gate"]


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
        tap = _Tap(self.view, self._console.clock, self._terminal, id)
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
        _Top(self.view, self._console.clock, self._terminal, self._console.sampler).start()

    # -- helpers -------------------------------------------------------------------------------

    def _logged(self, verb: str, detail: str) -> None:
        self._console.log.info(
            "console_{verb} user={user} {detail}", verb=verb, user=self._user, detail=detail
        )

"""
How the console shows things: :class:`Text` (a string whose repr is itself, so a command's table
prints readably at the prompt), aligned tables, and the short forms of ages, sizes, rates, round
trips and message previews that the ``gate`` commands and the live views share.  The names with a
leading underscore are private to the console package.

Must not: read or act on the gate (it formats what it is given).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Text", "table"]


class Text(str):
    """A string the console shows as it is (its repr is itself), so tables print readably."""

    def __repr__(self) -> str:
        return str(self)


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

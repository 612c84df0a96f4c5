"""
systemd's readiness protocol (``Type=notify``), and the point of the service tree where the gate
accepts sessions.

Owns the ``sd_notify`` datagrams (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=``) sent
to the AF_UNIX socket named by ``NOTIFY_SOCKET`` (a path, or an abstract name when it starts with
``@``), and :class:`Listening`, the service that service.py places after every listener: its
``state`` is what the admin listener's ``/ready`` reports.  It must not read the environment
(service.py takes the address out of it and passes it on) nor block: a datagram that cannot be
sent at once is logged and dropped, and the gate runs the same without systemd.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, MutableMapping
from typing import TypeVar

from twisted.application import service
from twisted.logger import Logger

__all__ = ["Listening", "Notifier", "send", "take_address"]

_T = TypeVar("_T")


def take_address(environ: MutableMapping[str, str]) -> str | None:
    """
    ``NOTIFY_SOCKET``, removed from ``environ`` so that processes the gate starts (workers) do not
    inherit it and speak for the service (as ``sd_notify(unset_environment=1)`` does).
    """
    return environ.pop("NOTIFY_SOCKET", "") or None


def send(address: str, fields: list[str]) -> None:
    """
    Send one datagram of ``KEY=VALUE`` lines to ``address`` without blocking; raises OSError
    (``BlockingIOError`` when the receiver's queue is full).
    """
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        sock.sendto("\n".join(fields).encode("utf-8"), target)


class Notifier:
    """Tells systemd at ``address`` (None: nothing to tell) about the gate's state changes."""

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address

    def __call__(self, *fields: str) -> None:
        if self.address is None:
            return
        try:
            send(self.address, list(fields))
        except OSError as e:
            self.log.warn(
                "sd_notify_failed {fields} to {address}: {error}",
                fields=" ".join(f.partition("\n")[0] for f in fields),
                address=self.address,
                error=e,
            )


class Listening(service.Service):
    """
    Started after every listener has bound and started (service.py adds it to the tree last), and
    stopped first when the gate stops (a ``MultiService`` stops its children in reverse order),
    before the listeners close and sessions get their Close 1001.  ``state`` goes ``starting`` ->
    ``listening`` -> ``stopping``; systemd hears ``READY=1`` and ``STOPPING=1`` at those edges, and
    ``RELOADING=1`` ... ``READY=1`` around a reload wrapped by :meth:`reloading`.
    """

    def __init__(self, notify: Notifier, status: str = "") -> None:
        self.notify = notify
        self.status = status
        self.state = "starting"

    def startService(self) -> None:
        super().startService()
        self.state = "listening"
        self.notify("READY=1", f"STATUS={self.status}" if self.status else "STATUS=ready")

    def stopService(self) -> None:
        self.state = "stopping"
        self.notify("STOPPING=1", "STATUS=stopping: closing sessions")
        super().stopService()

    def reloading(self, reload: Callable[[], _T]) -> Callable[[], _T]:
        """
        ``reload`` between ``RELOADING=1`` and ``READY=1``; ``READY=1`` follows a refused config
        too, since the gate goes on with the running one.
        """

        def notified() -> _T:
            self.notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                "STATUS=reloading the config",
            )
            try:
                return reload()
            finally:
                self.notify("READY=1", f"STATUS={self.status}" if self.status else "STATUS=ready")

        return notified

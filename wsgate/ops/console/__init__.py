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

The parts, from the wire inwards:

- :mod:`.ssh`: the SSH server: login checkers, login logging, the session each user gets, and
  :func:`console_service`.
- :mod:`.keys`: the host key, ``authorized_keys`` and ``users`` files, and what ``wsgate check``
  reports about them.
- :mod:`.screens`: where commands write: the interactive prompt, or an exec's output.
- :mod:`.gate`: the ``gate`` commands, and the :class:`Console` every connection shares.
- :mod:`.live`: the live views, ``tap`` and ``top``.
- :mod:`.text`: tables and the short forms of ages, sizes and rates.

Must not hold business logic: commands read and act through the gate's operations view
(:mod:`wsgate.ops.view`, the same for one process and for workers, and the same the control API
uses) and format what they get back; the figures come from :mod:`wsgate.ops.status`.  This module
only names the console's public surface.
"""

from wsgate.ops.console.gate import Console, Gate
from wsgate.ops.console.keys import (
    ConsoleError,
    console_problems,
    fingerprint,
    load_authorized_keys,
    load_host_key,
    load_users,
)
from wsgate.ops.console.screens import ConsoleManhole
from wsgate.ops.console.ssh import console_service
from wsgate.ops.console.text import Text, table

__all__ = [
    "Console",
    "ConsoleError",
    "ConsoleManhole",
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

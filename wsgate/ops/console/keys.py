"""
The console's key files: its SSH host key (made and persisted on first start), the OpenSSH
``authorized_keys`` file and the htpasswd-style ``users`` file of bcrypt-hashed passwords, read
and checked line by line (a line the console would ignore, such as key options, is an error), and
:func:`console_problems`, what ``wsgate check`` and the start report about them.

Must not: accept connections or log users in (:mod:`.ssh` does).
"""

from __future__ import annotations

import os

from twisted.conch.ssh import keys

from wsgate.config import ConsoleSpec
from wsgate.ops.console.gate import Console

__all__ = [
    "ConsoleError",
    "console_problems",
    "fingerprint",
    "load_authorized_keys",
    "load_host_key",
    "load_users",
]

_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")


class ConsoleError(Exception):
    """The console cannot start: a problem with its key files, one line per problem."""


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

"""
The console's SSH server: public-key logins against the ``authorized_keys`` file and bcrypt
passwords from the ``users`` file (both re-read at every login, so removing a key takes effect at
once), logins, logouts and refused logins logged with the source address (refusals rate limited),
and the session each user gets: with a pty the interactive prompt, without one (``ssh -T``, piped
input) or for an exec request the lines it is given (:mod:`.screens`).  :func:`console_service`
is the listening service ``service.py`` adds.

Must not: hold commands (:mod:`.gate`) or parse key files (:mod:`.keys`).
"""

from __future__ import annotations

from typing import Any

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
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from wsgate.config import ConsoleSpec
from wsgate.ops.console.gate import Console
from wsgate.ops.console.keys import (
    ConsoleError,
    console_problems,
    fingerprint,
    load_authorized_keys,
    load_host_key,
    load_users,
)
from wsgate.ops.console.screens import ConsoleManhole, _ConsoleCommands, _Input

__all__ = ["console_service"]

# Compared against when the user name is unknown, so a wrong name costs as much time as a wrong
# password (made with bcrypt.hashpw(b"-", bcrypt.gensalt(12))).
_DUMMY_HASH = b"$2b$12$jR8X9f6/IgfcX6Hpu7PTH.BXuVns/cwar.rlqYwYJhwtRj0UQbePu"


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

"""
The ``wsgate`` command (and ``python -m wsgate``): ``run``, ``check PATH``, ``version``, and the
control API's clients ``reload`` and ``ctl VERB`` (:mod:`wsgate.ctl`).

Owns what an operator types and reads back: the argument parser, the one-line startup errors and
the exit statuses.  It must not build services or parse the gateway's options itself:

- ``wsgate run ARGS`` is ``twistd -n --pidfile= wsgate ARGS`` run in this process by twistd's own
  runner, so the options (``wsgate.service.Options``), the service tree, logging (to stdout, or
  ``--logfile``), privilege dropping (``--uid``/``--gid``) and signals are exactly twistd's: SIGTERM
  or SIGINT stops the gate gracefully, then the process ends by that signal, as under twistd.
  A failure to start (bad options or config, a busy port, an unreadable file) prints one line
  ``wsgate: <reason>`` on stderr and exits 1, instead of twistd's usage text or a traceback.
- ``wsgate check PATH`` validates a config file like ``nginx -t`` (``wsgate.config.load``, then
  ``wsgate.ops.preflight``: endpoints, colliding listeners, console files), exit 1 on a problem; a
  ``warning:`` line (exit 0) for a risky setting such as an admin listener beyond loopback.
- ``wsgate version`` prints the versions of wsgate and of what it runs on, one per line.
"""

from __future__ import annotations

import argparse
import platform
import pwd
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import wsgate
from wsgate.core import frames
from wsgate.ctl import add_ctl_parsers, ctl
from wsgate.ctl import reload as ctl_reload

__all__ = ["check", "main", "run", "twistd_arguments", "versions"]

# The twistd options ``wsgate run`` passes on, by their twistd names (before the subcommand).
_TWISTD_OPTIONS = (
    ("-l", "--logfile", "FILE", "log to FILE instead of stdout (twistd --logfile)"),
    ("-u", "--uid", "USER", "drop to this user after binding the ports (twistd --uid)"),
    ("-g", "--gid", "GROUP", "drop to this group after binding the ports (twistd --gid)"),
)


def versions() -> list[tuple[str, str]]:
    """(name, version) of wsgate and of what it runs on, the TLS library the gate uses included."""
    import autobahn
    import OpenSSL
    from OpenSSL import SSL

    import twisted

    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return [
        ("wsgate", wsgate.__version__),
        ("Twisted", twisted.__version__),
        ("Autobahn", autobahn.__version__),
        ("pyOpenSSL", OpenSSL.__version__),
        ("OpenSSL", openssl.removeprefix("OpenSSL ")),
        ("Python", platform.python_version()),
        ("UTF-8 check", frames.UTF8_CHECKS[0].__name__),
    ]


def check(path: str) -> int:
    """
    Print ``ok`` (0) or every problem of the config file as ``PATH: key.path: reason`` (1): its
    schema (``wsgate.config.load``), then what would fail at start (``wsgate.ops.preflight``).
    Risky but working settings print ``warning: PATH: key.path: reason`` lines first.
    """
    from wsgate.config import ConfigError, load
    from wsgate.ops import preflight

    try:
        config = load(path)
    except ConfigError as e:
        print("\n".join(e.problems))
        return 1
    for warning in preflight.warnings(config):
        print(f"warning: {warning}")
    problems = preflight.problems(config)
    if problems:
        print("\n".join(problems))
        return 1
    print("ok")
    return 0


def twistd_arguments(
    gate_arguments: Sequence[str], twistd_options: dict[str, str | None]
) -> list[str]:
    """The twistd command line of ``wsgate run``: foreground, no pid file, then ``wsgate ARGS``."""
    options = [f"{name}={value}" for name, value in twistd_options.items() if value is not None]
    return ["--nodaemon", "--pidfile=", *options, "wsgate", *gate_arguments]


def run(gate_arguments: Sequence[str], twistd_options: dict[str, str | None] | None = None) -> int:
    """
    Run the gate in the foreground until it is stopped, as ``twistd -n --pidfile= wsgate ARGS``.
    Returns 1 after printing ``wsgate: <reason>`` when it cannot start; when a signal stopped it,
    the process ends by that signal (twistd's ``runApp``) instead of returning.
    """
    from twisted.internet.error import CannotListenError
    from twisted.python import usage
    from twisted.scripts import twistd

    # twistd sends stderr to the log once logging starts; failures to start go to the real one.
    stderr = sys.stderr
    config = twistd.ServerOptions()
    try:
        twistd_options = _with_numeric_ids(twistd_options or {})
        if not any(command[0] == "wsgate" for command in config.subCommands):
            raise usage.UsageError(
                "twistd finds no wsgate plugin (twisted/plugins/wsgate_plugin.py) on sys.path: "
                f"install wsgate into {sys.prefix} with pip"
            )
        config.parseOptions(twistd_arguments(gate_arguments, twistd_options))
        twistd.runApp(config)
    except (usage.UsageError, CannotListenError, OSError) as e:
        print(f"wsgate: {_one_line(str(e))}", file=stderr, flush=True)
        return 1
    return 0


def _with_numeric_ids(twistd_options: dict[str, str | None]) -> dict[str, str | None]:
    """--uid/--gid names as numbers: twistd's own lookup of an unknown name ends in a traceback."""
    from twisted.python import usage
    from twisted.python.util import gidFromString, uidFromString

    resolved = dict(twistd_options)
    for option, lookup, kind in (
        ("--uid", uidFromString, "user"),
        ("--gid", gidFromString, "group"),
    ):
        name = resolved.get(option)
        if name is not None:
            try:
                resolved[option] = str(lookup(name))
            except KeyError:
                raise usage.UsageError(f"{option}: no {kind} named {name!r}") from None
    uid = resolved.get("--uid")
    if uid is not None and resolved.get("--gid") is None:
        try:  # twistd takes the user's group from the password database
            pwd.getpwuid(int(uid))
        except KeyError:
            raise usage.UsageError(f"--uid: no user with id {uid}: give --gid too") from None
    return resolved


def _one_line(text: str) -> str:
    """``invalid configuration:\\nA\\nB`` -> ``invalid configuration: A; B``."""
    head, *rest = [line.strip() for line in text.strip().splitlines() if line.strip()] or [""]
    return f"{head} {'; '.join(rest)}" if rest else head


class _RunHelp(argparse.Action):
    """``wsgate run --help``: this parser's options, then the gateway's (``twistd wsgate``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        from wsgate.service import Options

        parser.print_help()
        lines = str(Options()).splitlines()
        start = lines.index("Options:") + 1 if "Options:" in lines else 0
        print("\ngateway options (those of `twistd wsgate`):")
        print("\n".join(line for line in lines[start:] if not line.strip().startswith("--help")))
        parser.exit()


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="wsgate, a WebSocket gateway: run it, check a config, reload it, act on it "
        "through its control API, versions.",
    )
    parser.add_argument("--version", action="version", version=f"wsgate {wsgate.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser(
        "run",
        help="run the gateway in the foreground (twistd -n --pidfile= wsgate ...)",
        usage=f"{prog} run [--config PATH | --listen ENDPOINT --backend URL | --demo] "
        "[gateway options] [-l FILE] [-u USER] [-g GROUP]",
        description="Run the gateway in the foreground, as `twistd -n --pidfile= wsgate ...`: "
        "logs go to stdout, SIGTERM or SIGINT stops it gracefully, SIGHUP reloads a --config file. "
        "Every option not listed here is the gateway's (below).",
        add_help=False,
        allow_abbrev=False,
    )
    run_parser.add_argument("-h", "--help", action=_RunHelp)
    for short, long, metavar, text in _TWISTD_OPTIONS:
        run_parser.add_argument(short, long, metavar=metavar, help=text)
    check_parser = commands.add_parser(
        "check", help="validate a config file and print ok or its problems (like nginx -t)"
    )
    check_parser.add_argument("path", help="the TOML config file")
    commands.add_parser("version", help="print the versions of wsgate and what it runs on")
    add_ctl_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "wsgate") -> int:
    """The console script ``wsgate``; returns the exit status."""
    parser = _parser(prog)
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        twistd_options = {long: getattr(args, long[2:]) for _, long, _, _ in _TWISTD_OPTIONS}
        return run(rest, twistd_options)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "check":
        return check(args.path)
    if args.command == "reload":
        return ctl_reload(args)
    if args.command == "ctl":
        return ctl(args)
    for name, version in versions():
        print(f"{name} {version}")
    return 0

"""
``python -m wsgate check PATH``: validate a config file like ``nginx -t``.

Prints ``ok`` and exits 0, or prints every problem as ``PATH: key.path: reason`` and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from wsgate.config import ConfigError, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsgate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config file and print ok or its problems")
    check.add_argument("path", help="the TOML config file")
    args = parser.parse_args(argv)
    try:
        load(args.path)
    except ConfigError as e:
        print("\n".join(e.problems))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

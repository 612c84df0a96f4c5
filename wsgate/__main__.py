"""
``python -m wsgate``: the ``wsgate`` command (:mod:`wsgate.cli`) where the script is not on the
PATH, e.g. ``python -m wsgate check PATH`` to validate a config like ``nginx -t``.
"""

from __future__ import annotations

import sys

from wsgate.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m wsgate"))

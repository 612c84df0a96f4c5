#!/bin/sh
# The whole test suite from a fresh clone: installs what the tests need (Debian packages and the
# Node.js peers via scripts/install-test-deps.sh, a virtualenv in .venv with wsgate[test]), then
# runs ruff, mypy and pytest, then the in-memory tests again with wsgate's fast paths off
# (WSGATE_FAST_PATHS=0: Twisted's and Autobahn's own code paths; wsgate/dataplane/_compat.py).
# Non-interactive; run as root on a fresh machine.
# Extra arguments go to pytest (one run, fast paths as the environment says), e.g.
# scripts/test.sh -k bridge
set -eu
cd "$(dirname "$0")/.."
sh scripts/install-test-deps.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
# A plain editable install puts the checkout on sys.path (setup.cfg's package_dir says why), so
# twistd finds twisted/plugins/wsgate_plugin.py; it also installs the wsgate command.
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check wsgate tests twisted bench
.venv/bin/ruff format --check wsgate tests twisted bench
.venv/bin/mypy wsgate
if [ $# -gt 0 ]; then
    exec .venv/bin/pytest "$@"
fi
.venv/bin/pytest
exec env WSGATE_FAST_PATHS=0 .venv/bin/pytest -m "not e2e"

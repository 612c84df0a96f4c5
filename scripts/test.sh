#!/bin/sh
# The whole test suite from a fresh clone: installs what the tests need (Debian packages and the
# Node.js peers via scripts/install-test-deps.sh, a virtualenv in .venv with wsgate[test]), then
# runs ruff, mypy and pytest.  Non-interactive; run as root on a fresh machine.
# Extra arguments go to pytest, e.g. scripts/test.sh -k bridge
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
exec .venv/bin/pytest "$@"

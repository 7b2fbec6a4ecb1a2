#!/usr/bin/env bash
# Installs the system packages the tests run for real: PostgreSQL (server for the storage
# tests), Chromium and its driver (browser tests), Prometheus and promtool (a real scrape of
# /metrics, the Grafana dashboard's queries), and checks for Node.js/npm (the JS client suite). Idempotent: when everything is present it only asks dpkg, and returns in well under
# a second. Debian 12 packages; as a non-root user it prints the command to run instead.
set -euo pipefail

PACKAGES=(postgresql chromium chromium-driver prometheus)
NODE_MAJOR_MIN=20

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: this script installs Debian packages (apt-get), which this system lacks." >&2
    echo "       Install PostgreSQL (server, with initdb and pg_ctl), Chromium and chromedriver" >&2
    echo "       with your platform's package manager, then run 'make setup' again." >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -gt 0 ]; then
    command="apt-get update && apt-get install -y ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing system packages: ${missing[*]}" >&2
        echo "       run as root:  $command" >&2
        echo "       (or: sudo sh -c '$command'), then 'make setup' again." >&2
        exit 1
    fi
    echo "installing system packages: ${missing[*]}"
    start=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run (an unattended upgrade, a parallel job) holds the lock: wait for it.
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}"
    echo "system packages installed in $((SECONDS - start)) s"
fi

# The packages are there; the binaries the tests use must be too.
bindir="$(pg_config --bindir 2>/dev/null || true)"
if [ ! -x "$bindir/initdb" ]; then
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
fi
for binary in "$bindir/initdb" "$bindir/pg_ctl" /usr/bin/chromium /usr/bin/chromedriver \
              /usr/bin/prometheus /usr/bin/promtool; do
    if [ ! -x "$binary" ]; then
        echo "error: $binary is missing although its package is installed;" >&2
        echo "       reinstall as root: apt-get install -y --reinstall ${PACKAGES[*]}" >&2
        exit 1
    fi
done

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "error: Node.js and npm are required (the kubo-rpc-client tests run in Node)." >&2
    echo "       Install Node.js ${NODE_MAJOR_MIN} or newer with npm, then run 'make setup' again." >&2
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt "$NODE_MAJOR_MIN" ]; then
    echo "error: Node.js $(node --version) is too old; kubo-rpc-client 7 needs ${NODE_MAJOR_MIN} or newer." >&2
    exit 1
fi

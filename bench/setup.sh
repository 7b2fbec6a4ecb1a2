#!/usr/bin/env bash
# Idempotent setup for `make bench`: nginx (the generic-proxy baseline) from Debian's packages,
# and the bench extra (matplotlib, py-spy) into the project venv. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_PY="${VENV_PY:-.venv/bin/python}"

find_nginx() {
    command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

if [ -z "$(find_nginx)" ]; then
    if [ "$(id -u)" != 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    echo "bench/setup.sh: installing nginx from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # nginx-light is the smallest build with the proxy module; fall back to nginx where a
    # release no longer ships it.
    if ! $SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; then
        $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
    fi
    # The Debian package starts a system nginx on port 80 where an init system runs; the
    # benchmark runs its own, so stop that one if it was started (ignore "not running").
    if command -v service >/dev/null 2>&1; then
        $SUDO service nginx stop >/dev/null 2>&1 || true
    fi
fi
echo "bench/setup.sh: nginx: $("$(find_nginx)" -v 2>&1)" >&2

if ! "$VENV_PY" -c 'import matplotlib' >/dev/null 2>&1 || [ ! -x "$(dirname "$VENV_PY")/py-spy" ]; then
    echo "bench/setup.sh: installing the bench extra (matplotlib, py-spy) into the venv" >&2
    # Only the extra's own requirements (read from pyproject.toml), not a reinstall of the project.
    "$VENV_PY" - <<'PY' | xargs -d '\n' "$VENV_PY" -m pip install --quiet
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["bench"]))
PY
fi
echo "bench/setup.sh: matplotlib $("$VENV_PY" -c 'import matplotlib; print(matplotlib.__version__)')" >&2

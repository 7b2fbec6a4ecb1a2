#!/bin/sh
# medicon-entrypoint.sh: create the gateway's keyring on first start, then run the gateway.
#
# The gateway refuses to start without a keyring, and `medicon-gateway keys init` refuses to
# overwrite one (it would lose every key). This script runs `keys init` only when the keyring
# is missing, so it is safe on every start: the image's ENTRYPOINT, a Kubernetes
# initContainer (--init-only) and a systemd ExecStartPre (--init-only).
#
# Usage:
#   medicon-entrypoint.sh                       keyring if missing, then `medicon-gateway serve`
#   medicon-entrypoint.sh medicon-gateway serve ARGS...
#                                               keyring if missing, then exec the command
#   medicon-entrypoint.sh --init-only           keyring if missing, then exit 0
#   medicon-entrypoint.sh OTHER COMMAND...      exec it, without touching the keyring
#                                               (e.g. `medicon-gateway token create ...`)
#
# The keyring path is the one the gateway itself will use: security.keyring, or
# <records.data_dir>/keyring.json, from $MEDICON_CONFIG and the MEDICON_* environment.
# Pass the config file as MEDICON_CONFIG, not only as `serve --config`, so both agree.
#   MEDICON_GATEWAY_BIN   the medicon-gateway executable (default: medicon-gateway on PATH);
#                         the Python next to it resolves the keyring path.
#   MEDICON_GATEWAY_ID    this gateway's name in signatures (site-a, …) for the keyring it makes.
#   MEDICON_KEY_BUNDLE    a site joining a deployment (several sites on one database): the first
#                         site's `keys export` bundle; the keyring is made from it (`keys join`)
#                         instead of `keys init`, and the start fails while the file is empty.

set -eu  # a failed init must stop the start: the gateway would refuse to run anyway

GATEWAY_BIN="${MEDICON_GATEWAY_BIN:-medicon-gateway}"

gateway_path() {
  case "$GATEWAY_BIN" in
    */*) path="$GATEWAY_BIN" ;;
    *) path="$(command -v "$GATEWAY_BIN" || true)" ;;
  esac
  if [ -z "$path" ] || [ ! -x "$path" ]; then
    echo "medicon-entrypoint: medicon-gateway not found (MEDICON_GATEWAY_BIN=$GATEWAY_BIN)" >&2
    exit 127
  fi
  printf '%s\n' "$path"
}

ensure_keyring() {
  gw="$(gateway_path)"
  # The interpreter of the installation that runs the gateway: a virtualenv's bin/python, or
  # /usr/local/bin/python in the image.
  py="${gw%/*}/python"
  [ -x "$py" ] || py="${gw%/*}/python3"
  if [ ! -x "$py" ]; then
    echo "medicon-entrypoint: no python next to $gw" >&2
    exit 127
  fi
  # Ask the gateway's own config loader where the keyring lives (config file + environment).
  keyring="$("$py" -c 'import os, sys
from gateway.config import ConfigError, keyring_path, load_config
try:
    print(keyring_path(load_config(os.environ.get("MEDICON_CONFIG") or None)))
except ConfigError as exc:
    sys.exit(f"medicon-entrypoint: {exc}")')"
  if [ -e "$keyring" ] || [ -L "$keyring" ]; then
    echo "medicon-entrypoint: keyring present: $keyring (left as it is)" >&2
    return 0
  fi
  dir="$(dirname -- "$keyring")"
  mkdir -p -- "$dir" 2>/dev/null || true
  if [ ! -d "$dir" ] || [ ! -w "$dir" ]; then
    echo "medicon-entrypoint: $dir is not a writable directory for uid $(id -u): mount a" \
         "volume there that this user owns (see deploy/README.md)" >&2
    exit 1
  fi
  if [ -n "${MEDICON_KEY_BUNDLE:-}" ]; then
    if [ ! -s "$MEDICON_KEY_BUNDLE" ]; then
      echo "medicon-entrypoint: no keyring at $keyring, and the key bundle $MEDICON_KEY_BUNDLE is empty:" \
           "run \`medicon-gateway keys export\` at the first site and put its bundle there (deploy/README.md)" >&2
      exit 1
    fi
    echo "medicon-entrypoint: no keyring at $keyring; joining the deployment from $MEDICON_KEY_BUNDLE" >&2
    "$gw" keys join "$MEDICON_KEY_BUNDLE" ${MEDICON_GATEWAY_ID:+--gateway-id "$MEDICON_GATEWAY_ID"}
    return 0
  fi
  echo "medicon-entrypoint: no keyring at $keyring; creating one" >&2
  # keys init creates it 0600 and itself refuses to overwrite (e.g. a concurrent start).
  "$gw" keys init ${MEDICON_GATEWAY_ID:+--gateway-id "$MEDICON_GATEWAY_ID"}
}

case "${1:-}" in
  --init-only)
    ensure_keyring
    exit 0
    ;;
  "")
    gw="$(gateway_path)"
    set -- "$gw" serve
    ;;
esac

# Only `medicon-gateway … serve …` needs the keyring; other commands (token create, a shell,
# restoring a keyring backup into an empty volume) must not get a fresh one behind their back.
if [ "${1##*/}" = medicon-gateway ]; then
  for arg in "$@"; do
    if [ "$arg" = serve ]; then
      ensure_keyring
      break
    fi
  done
fi

exec "$@"

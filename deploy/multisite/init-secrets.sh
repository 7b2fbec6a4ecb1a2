#!/bin/sh
# init-secrets.sh: the secrets of a multi-site deployment, made once, on a trusted machine.
#
# Usage:  [IPFS_BIN=ipfs] [DB_HOST=postgres] init-secrets.sh DIR [SITE ...]     (sites: a b)
#
# Writes into DIR (created 0700; every file 0600; an existing file is never overwritten, so a
# second run only adds what is missing):
#   swarm.key                 the private swarm's key: every site's Kubo, and nothing else
#   kubo-identity-SITE        PeerID=… and PrivKey=…: the site's Kubo identity, fixed so that the
#                             other sites can name it in KUBO_PEERS (kubo-harden.sh applies it)
#   kubo-api-secret-SITE      the site's Kubo RPC secret (its Kubo and its gateways)
#   postgres-password         the database user's password (the postgres container's)
#   database-url              postgresql://medicon:…@DB_HOST:5432/medicon (MEDICON_STORAGE_URL_FILE)
#   replicator-token-SITE     empty: the token SITE's gateways present to the other sites'
#                             /pinning/v1; `medicon-gateway token create … --role replicator`
#                             fills it once the database runs (deploy/README.md)
#   key-bundle.json           empty: the first site's `keys export`, for the others to join
#   peers.env                 PEER_ID_SITE=… (not secret): docker compose's .env, the manifests
#
# Needs the `ipfs` binary (Kubo) for the identities; without one installed:
#   docker run --rm -u "$(id -u)" -v "$PWD:/w" -w /w --entrypoint sh ipfs/kubo:v0.42.0 \
#     deploy/multisite/init-secrets.sh deploy/multisite/secrets

set -eu

[ $# -ge 1 ] || { echo "usage: init-secrets.sh DIR [SITE ...]" >&2; exit 2; }
DIR="$1"
shift
[ $# -ge 1 ] || set -- a b
IPFS_BIN="${IPFS_BIN:-ipfs}"
DB_HOST="${DB_HOST:-postgres}"
for site in "$@"; do
  case "$site" in ''|*[!a-z0-9]*) echo "init-secrets: a site is named by lower-case letters and digits, not '$site'" >&2; exit 2 ;; esac
done
command -v "$IPFS_BIN" >/dev/null 2>&1 || { echo "init-secrets: Kubo's ipfs binary not found (IPFS_BIN=$IPFS_BIN)" >&2; exit 127; }

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"

random_hex() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
random_text() { head -c 32 /dev/urandom | base64 | tr -d '=+/\n'; }

create() {  # create FILE CONTENT-COMMAND...: only when FILE does not exist yet
  file="$DIR/$1"
  shift
  if [ -e "$file" ]; then
    echo "init-secrets: $file exists (left as it is)" >&2
    return 0
  fi
  "$@" > "$file.tmp"
  mv "$file.tmp" "$file"
  echo "init-secrets: made $file" >&2
}

swarm_key() { printf '/key/swarm/psk/1.0.0/\n/base16/\n%s\n' "$(random_hex)"; }
identity() {  # a fresh Kubo identity, read from a throwaway repo's config
  repo="$(mktemp -d)"
  IPFS_PATH="$repo" "$IPFS_BIN" init --empty-repo --profile test >/dev/null
  sed -n -e 's/^ *"PeerID": "\([^"]*\)".*/PeerID=\1/p' -e 's/^ *"PrivKey": "\([^"]*\)".*/PrivKey=\1/p' "$repo/config"
  rm -rf "$repo"
}
secret() { random_text; echo; }
nothing() { :; }
database_url() { printf 'postgresql://medicon:%s@%s:5432/medicon\n' "$(cat "$DIR/postgres-password")" "$DB_HOST"; }

create swarm.key swarm_key
create postgres-password secret
create database-url database_url
create key-bundle.json nothing
for site in "$@"; do
  create "kubo-identity-$site" identity
  create "kubo-api-secret-$site" secret
  create "replicator-token-$site" nothing
done

peers="$DIR/peers.env"
: > "$peers.tmp"
for site in "$@"; do
  upper="$(printf '%s' "$site" | tr 'a-z' 'A-Z')"
  printf 'PEER_ID_%s=%s\n' "$upper" "$(sed -n 's/^PeerID=//p' "$DIR/kubo-identity-$site")" >> "$peers.tmp"
done
mv "$peers.tmp" "$peers"
chmod 644 "$peers"
echo "init-secrets: $peers lists each site's peer id (copy it to .env for docker compose)" >&2

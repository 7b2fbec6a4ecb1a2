#!/bin/sh
# kubo-harden.sh: lock a Kubo repo down so that only medicon-gateway can reach it.
#
# Kubo's RPC API (5001) is a full admin interface with no authentication by default, so it
# must listen on loopback only; the gateway, running beside Kubo (same host, same pod, or
# the same container network namespace), is the only door to it. Loopback alone still lets
# any process on the host (or in the pod) in, so the API also takes only callers presenting
# a secret (Kubo's API.Authorizations), which the gateway reads from the same file
# (kubo.api_auth_file / MEDICON_KUBO_API_AUTH_FILE).
#
# Usage:  IPFS_PATH=/path/to/repo [IPFS_BIN=ipfs] kubo-harden.sh
#   KUBO_API_PORT         RPC API port on 127.0.0.1        (default 5001)
#   KUBO_GATEWAY_PORT     HTTP gateway port on 127.0.0.1   (default 8080)
#   KUBO_GATEWAY_NOFETCH  true: the gateway serves local blocks only; false: it may fetch
#                         from the network (production nodes that should fetch) (default true)
#   KUBO_API_SECRET_FILE  the RPC secret, shared with the gateway (default
#                         $IPFS_PATH/medicon-api-secret, created 0600 when missing)
#   IPFS_PROFILE          profile(s) for the first `ipfs init` only, e.g. "server"
#   KUBO_API_HOST         where the RPC API and the HTTP gateway listen (default 127.0.0.1); 0.0.0.0 only
#                         where the gateway runs in another pod (deploy/multisite/kubernetes.yaml): the
#                         RPC then still takes only the secret, and a NetworkPolicy only the site's gateways
#
# A private swarm (several sites, deploy/multisite/): set KUBO_SWARM_KEY_FILE, and run the daemon
# with LIBP2P_FORCE_PNET=1 so it never starts without the key.
#   KUBO_SWARM_KEY_FILE   the swarm key (/key/swarm/psk/1.0.0/ /base16/ <64 hex>): copied to the repo;
#                         no bootstrap peers, no AutoConf, no delegated routers or resolvers, TCP only
#   KUBO_SWARM_HOST       the swarm's listen address (default 0.0.0.0), KUBO_SWARM_PORT its port (4001)
#   KUBO_PEERS            the other sites' nodes, /dns4/<host>/tcp/4001/p2p/<peer id> separated by spaces
#                         or commas: kept connected (Peering.Peers)
#   KUBO_IDENTITY_FILE    this node's fixed identity (PeerID=… and PrivKey=… lines, from
#                         deploy/multisite/init-secrets.sh), so the other sites can name it in KUBO_PEERS
#
# Idempotent: it creates the repo only when missing and sets the same values on every run,
# so it is safe as a container-init.d hook, a Kubernetes initContainer or an ExecStartPre.
# Run it while the daemon is stopped: address changes only apply when the daemon starts.

set -eu  # stop at the first failing command or unset variable: a half-hardened repo must not start

: "${IPFS_PATH:?IPFS_PATH must point at the Kubo repo}"  # refuse to guess the repo (ipfs would use ~/.ipfs)
export IPFS_PATH                                          # make sure every ipfs call below sees it
IPFS_BIN="${IPFS_BIN:-ipfs}"                              # allow a binary outside PATH (systemd, tests)
API_PORT="${KUBO_API_PORT:-5001}"                         # must match the gateway's kubo.api_url
GATEWAY_PORT="${KUBO_GATEWAY_PORT:-8080}"                 # must match the gateway's kubo.gateway_url
NOFETCH="${KUBO_GATEWAY_NOFETCH:-true}"                   # safe default: the HTTP gateway never triggers network fetches
SECRET_FILE="${KUBO_API_SECRET_FILE:-$IPFS_PATH/medicon-api-secret}"  # the RPC secret the gateway presents
API_HOST="${KUBO_API_HOST:-127.0.0.1}"                    # loopback unless the gateway runs in another pod
SWARM_KEY_FILE="${KUBO_SWARM_KEY_FILE:-}"                 # set: a private swarm of the sites' nodes
SWARM_HOST="${KUBO_SWARM_HOST:-0.0.0.0}"                  # where the other sites dial in
SWARM_PORT="${KUBO_SWARM_PORT:-4001}"                     # the libp2p port (TCP)
case "$API_HOST" in 127.0.0.1|0.0.0.0) ;; *) echo "kubo-harden: KUBO_API_HOST must be 127.0.0.1 or 0.0.0.0, got '$API_HOST'" >&2; exit 2 ;; esac  # nothing in between

for port in "$API_PORT" "$GATEWAY_PORT" "$SWARM_PORT"; do               # a typo here would produce an invalid multiaddr
  case "$port" in ''|*[!0-9]*) echo "kubo-harden: invalid port: '$port'" >&2; exit 2 ;; esac  # digits only
done
case "$NOFETCH" in true|false) ;; *) echo "kubo-harden: KUBO_GATEWAY_NOFETCH must be true or false, got '$NOFETCH'" >&2; exit 2 ;; esac  # JSON booleans only

if [ ! -f "$IPFS_PATH/config" ]; then                     # no repo yet: first start on an empty volume
  echo "kubo-harden: initialising Kubo repo at $IPFS_PATH"  # leave a trace in the service log
  "$IPFS_BIN" init --empty-repo ${IPFS_PROFILE:+"--profile=$IPFS_PROFILE"}  # --empty-repo: no welcome files in a server repo
fi

"$IPFS_BIN" config Addresses.API "/ip4/$API_HOST/tcp/$API_PORT"              # RPC API on loopback only by default (never 0.0.0.0 by accident, as the Docker image's init sets)
"$IPFS_BIN" config Addresses.Gateway "/ip4/$API_HOST/tcp/$GATEWAY_PORT"      # Kubo's own gateway beside it: clients go through medicon-gateway
"$IPFS_BIN" config --json Gateway.NoFetch "$NOFETCH"                         # by default the gateway cannot be used to make the node fetch arbitrary CIDs
"$IPFS_BIN" config --json API.HTTPHeaders '{}'                               # no CORS headers: browsers must not call the RPC API directly
"$IPFS_BIN" config --json Gateway.PublicGateways null                        # drop any hostname-specific gateway rules; Kubo's built-in defaults apply
"$IPFS_BIN" config --json Swarm.DisableNatPortMap true                       # do not ask the router (UPnP/NAT-PMP) to open ports on the host
"$IPFS_BIN" config --json Discovery.MDNS.Enabled false                       # do not announce the node on, or scan, the local network
spec="$("$IPFS_BIN" config Datastore.Spec)"                                  # the block store's settings (flatfs by default, badger as an option)
synced="$(printf '%s\n' "$spec" | sed -e 's/"sync": false/"sync": true/' -e 's/"syncWrites": false/"syncWrites": true/')"  # fsync every block written: Kubo's default does not, so a power loss could lose a block an acknowledged record needs
if [ "$synced" != "$spec" ]; then                                            # only rewrite when something changes (the flag is not part of the on-disk spec, so an existing repo opens as before)
  "$IPFS_BIN" config --json Datastore.Spec "$synced"
fi
if [ ! -s "$SECRET_FILE" ]; then                          # first start: make the secret (a mounted secret file is never overwritten)
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '=+/\n' > "$SECRET_FILE")  # 0600, URL-safe characters only
fi
secret="$(tr -d ' \n\r' < "$SECRET_FILE")"                 # read it back (a mounted file may end with a newline)
[ "${#secret}" -ge 16 ] || { echo "kubo-harden: $SECRET_FILE holds no usable secret" >&2; exit 2; }
"$IPFS_BIN" config --json API.Authorizations "{\"medicon-gateway\": {\"AuthSecret\": \"bearer:$secret\", \"AllowedPaths\": [\"/api/v0\"]}}"  # only the gateway may call the RPC API

if [ -n "$SWARM_KEY_FILE" ]; then                        # a private swarm: only the sites' nodes, never the public network
  if ! grep -q '^/key/swarm/psk/1.0.0/$' "$SWARM_KEY_FILE" || ! grep -Eq '^[0-9a-f]{64}$' "$SWARM_KEY_FILE"; then
    echo "kubo-harden: $SWARM_KEY_FILE is not a swarm key (/key/swarm/psk/1.0.0/, /base16/, 64 hex digits)" >&2; exit 2
  fi
  (umask 077 && cp "$SWARM_KEY_FILE" "$IPFS_PATH/swarm.key")                 # libp2p's pnet reads it from the repo
  "$IPFS_BIN" config --json Bootstrap '[]'                                   # no public bootstrap peers
  "$IPFS_BIN" config --json AutoConf.Enabled false                           # fetch no network settings from the internet
  "$IPFS_BIN" config --json Routing.DelegatedRouters '[]'                    # no HTTP routers outside the swarm
  "$IPFS_BIN" config --json Ipns.DelegatedPublishers '[]'
  "$IPFS_BIN" config --json DNS.Resolvers '{}'
  "$IPFS_BIN" config --json AutoTLS.Enabled false                            # no certificate broker on the internet
  "$IPFS_BIN" config --json Addresses.Swarm "[\"/ip4/$SWARM_HOST/tcp/$SWARM_PORT\"]"  # TCP only: QUIC and WebTransport cannot carry a pre-shared key
  peers="["
  for addr in $(printf '%s' "${KUBO_PEERS:-}" | tr ',' ' '); do               # /dns4/kubo-b/tcp/4001/p2p/12D3…
    id="${addr##*/p2p/}"
    case "$addr" in */p2p/*) ;; *) echo "kubo-harden: KUBO_PEERS entry without /p2p/<peer id>: $addr" >&2; exit 2 ;; esac
    [ "$peers" = "[" ] || peers="$peers,"
    peers="$peers{\"ID\": \"$id\", \"Addrs\": [\"${addr%/p2p/*}\"]}"
  done
  "$IPFS_BIN" config --json Peering.Peers "$peers]"                          # kept connected, redialled when lost
  "$IPFS_BIN" config --json Internal.Bitswap.WantHaveReplaceSize 65536      # a record's block (a few kB) goes to a site in answer to its want-have: replicating it takes one bitswap exchange, not two
  if [ -n "${KUBO_IDENTITY_FILE:-}" ]; then                                   # a fixed identity the other sites name
    peer_id="$(sed -n 's/^PeerID=//p' "$KUBO_IDENTITY_FILE")"
    priv_key="$(sed -n 's/^PrivKey=//p' "$KUBO_IDENTITY_FILE")"
    case "$peer_id$priv_key" in *[!A-Za-z0-9+/=]*|'') echo "kubo-harden: $KUBO_IDENTITY_FILE holds no PeerID=/PrivKey= lines" >&2; exit 2 ;; esac
    sed -i -e "s|\"PeerID\": \"[^\"]*\"|\"PeerID\": \"$peer_id\"|" -e "s|\"PrivKey\": \"[^\"]*\"|\"PrivKey\": \"$priv_key\"|" "$IPFS_PATH/config"
    [ "$("$IPFS_BIN" config Identity.PeerID)" = "$peer_id" ] || { echo "kubo-harden: the identity did not apply" >&2; exit 1; }
  fi
fi

api="$("$IPFS_BIN" config Addresses.API)"                                    # read back what Kubo will actually use
gw="$("$IPFS_BIN" config Addresses.Gateway)"                                 # same for the gateway listener
if [ "$api" != "/ip4/$API_HOST/tcp/$API_PORT" ] || [ "$gw" != "/ip4/$API_HOST/tcp/$GATEWAY_PORT" ]; then  # belt and braces: never start on another address
  echo "kubo-harden: refusing to start: API=$api Gateway=$gw" >&2                                  # say what is wrong
  exit 1                                                                                            # non-zero stops the daemon from starting
fi
if "$IPFS_BIN" config Datastore.Spec | grep -q -e '"sync": false' -e '"syncWrites": false'; then  # read back: a block store that does not fsync must not start
  echo "kubo-harden: refusing to start: the block store does not fsync its writes (Datastore.Spec)" >&2
  exit 1
fi
echo "kubo-harden: API=$api Gateway=$gw NoFetch=$NOFETCH BlocksSync=true RPC secret from $SECRET_FILE${SWARM_KEY_FILE:+ private swarm on $SWARM_HOST:$SWARM_PORT}"  # one line summary for the service log (never the secret)

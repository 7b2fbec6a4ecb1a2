#!/usr/bin/env bash
# Installs the pinned, released Kubo into .tools/bin/ipfs, built from source with Go.
# Idempotent: does nothing when the right version is already there.
set -euo pipefail

KUBO_VERSION="${KUBO_VERSION:-v0.42.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bindir="$root/.tools/bin"
dest="$bindir/ipfs"

if [ -x "$dest" ] && [ "$("$dest" version --number 2>/dev/null || true)" = "${KUBO_VERSION#v}" ]; then
    echo "kubo ${KUBO_VERSION} already installed: $dest"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "error: Go is not installed, and Kubo is built from source with it." >&2
    echo "       Install Go 1.26 or newer (e.g. 'apt-get install golang' or your platform's" >&2
    echo "       Go package), then run 'make setup' again." >&2
    exit 1
fi

mkdir -p "$bindir"
echo "building kubo ${KUBO_VERSION} with $(go version) (first build takes a few minutes)"
if GOBIN="$bindir" go install "github.com/ipfs/kubo/cmd/ipfs@${KUBO_VERSION}" 2>/tmp/medicon-go-install.$$; then
    rm -f /tmp/medicon-go-install.$$
else
    # Kubo's go.mod carries `exclude` directives, which `go install pkg@version` refuses
    # ("must not contain directives that would cause it to be interpreted differently").
    # Same release, same module proxy: download the module and build it in module mode.
    grep -q "directives" /tmp/medicon-go-install.$$ || { cat /tmp/medicon-go-install.$$ >&2; rm -f /tmp/medicon-go-install.$$; exit 1; }
    rm -f /tmp/medicon-go-install.$$
    src="$(go mod download -json "github.com/ipfs/kubo@${KUBO_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$src" ] || { echo "error: could not download github.com/ipfs/kubo@${KUBO_VERSION}" >&2; exit 1; }
    (cd "$src" && go build -trimpath -o "$dest.partial" ./cmd/ipfs)
    mv "$dest.partial" "$dest"
fi

got="$("$dest" version --number)"
if [ "$got" != "${KUBO_VERSION#v}" ]; then
    echo "error: built kubo reports version $got, expected ${KUBO_VERSION#v}" >&2
    exit 1
fi
echo "kubo ${KUBO_VERSION} installed: $dest"

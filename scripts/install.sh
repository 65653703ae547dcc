#!/usr/bin/env bash
# Installs the rqemu binaries and their systemd units where the units expect them.
#
#   scripts/install.sh [--prefix PREFIX] [--bin-dir DIR] [DESTDIR]
#
# PREFIX (default /usr/local): binaries go to DESTDIR/PREFIX/bin, units to
# DESTDIR/PREFIX/lib/systemd/system (a directory systemd searches for /usr/local), the README
# to DESTDIR/PREFIX/share/doc/rqemu; the units' ExecStart= paths are rewritten to PREFIX/bin.
# The binaries are taken from --bin-dir (default: target/release, else target/debug; build
# them first with `cargo build --release --bins`).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/usr/local
BIN_DIR=
DESTDIR=
BINS=(rqemu-vmm rqemu-blk rqemu-net rqemu-fs rqemu-serial rqemu-rtc)

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a value}"; shift ;;
    --prefix=*) PREFIX="${1#--prefix=}" ;;
    --bin-dir) BIN_DIR="${2:?--bin-dir needs a value}"; shift ;;
    --bin-dir=*) BIN_DIR="${1#--bin-dir=}" ;;
    -h|--help) usage 0 ;;
    -*) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    *) [ -z "$DESTDIR" ] || { echo "install.sh: one DESTDIR only" >&2; exit 2; }; DESTDIR="$1" ;;
  esac
  shift
done
case "$PREFIX" in /*) ;; *) echo "install.sh: --prefix must be absolute: $PREFIX" >&2; exit 2 ;; esac

if [ -z "$BIN_DIR" ]; then
  for d in "$ROOT/target/release" "$ROOT/target/debug"; do
    if [ -x "$d/rqemu-blk" ]; then BIN_DIR="$d"; break; fi
  done
fi
for b in "${BINS[@]}"; do
  if [ ! -x "${BIN_DIR:-target/release}/$b" ]; then
    echo "install.sh: ${BIN_DIR:-target/release}/$b is not built: run \`cargo build --release --bins\` first (or pass --bin-dir)" >&2
    exit 1
  fi
done

bindir="$DESTDIR$PREFIX/bin"
unitdir="$DESTDIR$PREFIX/lib/systemd/system"
docdir="$DESTDIR$PREFIX/share/doc/rqemu"
install -d -m 0755 "$bindir" "$unitdir" "$docdir"
for b in "${BINS[@]}"; do
  install -m 0755 "$BIN_DIR/$b" "$bindir/$b"
done
for u in "$ROOT"/systemd/*.service "$ROOT"/systemd/*.socket; do
  sed -e "s|/usr/local/bin/|$PREFIX/bin/|g" \
      -e "s|file:///usr/local/share/doc/rqemu/|file://$PREFIX/share/doc/rqemu/|g" "$u" >"$unitdir/$(basename "$u")"
  chmod 0644 "$unitdir/$(basename "$u")"
done
install -m 0644 "$ROOT/README.md" "$docdir/README.md"
echo "installed ${#BINS[@]} binaries in $bindir and $(ls "$ROOT"/systemd | wc -l) units in $unitdir"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  echo "run: systemctl daemon-reload"
fi

#!/usr/bin/env bash
# Installs the rqemu binaries and their systemd units where the units expect them.
#
#   scripts/install.sh [--prefix PREFIX] [--bin-dir DIR] [DESTDIR]
#
# PREFIX (default /usr/local): binaries go to DESTDIR/PREFIX/bin, units to
# DESTDIR/PREFIX/lib/systemd/system (a directory systemd searches for /usr/local), the README
# to DESTDIR/PREFIX/share/doc/rqemu; the units' ExecStart= paths are rewritten to PREFIX/bin.
# The binaries are taken from --bin-dir (default: target/release, else target/debug; build
# them first with `cargo build --release --bins`). The guest assets of rqemu-run (vmlinuz and
# agent-initramfs.cpio.gz from scripts/guest-assets.sh: target/guest, or RQEMU_GUEST_DIR) go to
# DESTDIR/PREFIX/share/rqemu/guest, where rqemu-run looks for them by default.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/usr/local
BIN_DIR=
DESTDIR=
BINS=(rqemu-vmm rqemu-blk rqemu-net rqemu-fs rqemu-vsock rqemu-serial rqemu-rtc rqemu-run)

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
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
guest_src="${RQEMU_GUEST_DIR:-$ROOT/target/guest}"
guestdir="$DESTDIR$PREFIX/share/rqemu/guest"
if [ -f "$guest_src/vmlinuz" ] && [ -f "$guest_src/agent-initramfs.cpio.gz" ]; then
  install -d -m 0755 "$guestdir"
  install -m 0644 "$guest_src/vmlinuz" "$guest_src/agent-initramfs.cpio.gz" "$guestdir/"
  echo "installed the guest kernel and agent initramfs of rqemu-run in $guestdir"
else
  echo "install.sh: no guest assets in $guest_src (run scripts/guest-assets.sh): rqemu-run will need --guest-dir" >&2
fi
echo "installed ${#BINS[@]} binaries in $bindir and $(ls "$ROOT"/systemd | wc -l) units in $unitdir"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  echo "run: systemctl daemon-reload"
fi

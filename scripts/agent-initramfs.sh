#!/usr/bin/env bash
# Build the initramfs of rqemu-run's container microVMs, beside the test guest assets
# (target/guest/, override: RQEMU_GUEST_DIR), from the kernel scripts/guest-assets.sh fetched:
#
#   agent-initramfs.cpio.gz   /init = rqemu-agent (static), /etc/rqemu-modules (load order) and
#                             /lib/modules/<name>.ko for the modules of AGENT_MODULES that the
#                             kernel has as modules (built-in ones are noted, not copied)
#
# The agent is built with `cargo build --release` for x86_64-unknown-linux-gnu with
# `-C target-feature=+crt-static` in its own target dir (target/agent-static), or taken from
# RQEMU_AGENT_BIN. The archive is rebuilt when the kernel, the agent binary (sha256) or this
# script change (stamp agent-initramfs.stamp). Called by scripts/guest-assets.sh.
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${RQEMU_GUEST_DIR:-$ROOT/target/guest}"
TARGET=x86_64-unknown-linux-gnu
# In dependency order: virtio transport, block, network, virtiofs, vsock.
AGENT_MODULES=(virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net fuse
    virtiofs vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)

log() { printf 'agent-initramfs: %s\n' "$*"; }
die() { printf 'agent-initramfs: ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run scripts/install-deps.sh"; }
for t in cpio gzip readelf sha256sum find; do need "$t"; done
# shellcheck source=lib/initramfs.sh
. "$ROOT/scripts/lib/initramfs.sh"

KVER_DIRS=("$OUT"/kernel-tree/lib/modules/*)
KVER_DIR="${KVER_DIRS[0]}"
[ -d "$KVER_DIR/kernel" ] && [ -s "$OUT/kernel-version" ] ||
    die "no kernel in $OUT (run scripts/guest-assets.sh first)"

# ---------------------------------------------------------------- the agent binary
if [ -n "${RQEMU_AGENT_BIN:-}" ]; then
    AGENT="$RQEMU_AGENT_BIN"
    [ -x "$AGENT" ] || die "RQEMU_AGENT_BIN=$AGENT is not an executable"
else
    need cargo
    log "building rqemu-agent (static, $TARGET)"
    # --target keeps RUSTFLAGS off build scripts and proc macros (they cannot be static).
    (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static -C strip=debuginfo" \
        cargo build --release --locked -q -p rqemu-agent --target "$TARGET" \
        --target-dir "$ROOT/target/agent-static") ||
        die "cargo build of rqemu-agent failed"
    AGENT="$ROOT/target/agent-static/$TARGET/release/rqemu-agent"
fi
if readelf -l "$AGENT" | grep -q 'program interpreter'; then
    die "$AGENT is dynamically linked (it must be static: it is /init)"
fi

# ---------------------------------------------------------------- the archive
STAMP_WANT="$(cat "$OUT/kernel-version") $(cat "$AGENT" "$0" "$ROOT/scripts/lib/initramfs.sh" | sha256sum | cut -c1-16)"
STAMP="$OUT/agent-initramfs.stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_WANT" ] && [ -s "$OUT/agent-initramfs.cpio.gz" ]; then
    log "cached"
    exit 0
fi
log "building"
rm -f "$STAMP"
STAGE="$OUT/agent-initramfs-root"
rm -rf "$STAGE"
mkdir -p "$STAGE"/{lib/modules,etc,proc,sys,dev,run,tmp}
chmod 1777 "$STAGE/tmp"
install -m 0755 "$AGENT" "$STAGE/init"

stage_modules "$KVER_DIR" "$STAGE" "${AGENT_MODULES[@]}"

pack_initramfs "$STAGE" "$OUT/agent-initramfs.cpio.gz"
rm -rf "$STAGE"
echo "$STAMP_WANT" >"$STAMP"
log "$OUT/agent-initramfs.cpio.gz ($(stat -c %s "$OUT/agent-initramfs.cpio.gz") bytes)"

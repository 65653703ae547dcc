#!/usr/bin/env bash
# Build and cache the guest test assets of rqemu under target/guest/ (override: RQEMU_GUEST_DIR):
#
#   vmlinuz              Debian linux-image-cloud-amd64 kernel, bzImage
#   vmlinux              the ELF kernel extracted from that bzImage (PVH note verified)
#   initramfs.cpio.gz    busybox-static + the virtio/fuse modules + /init (tests/guest/init.sh)
#                        + util-linux blkdiscard/fallocate (for BLKZEROOUT / zero-range tests)
#                        + dynamically linked Debian programs in /opt/host/bin (compressors,
#                          checksums, bc, mawk; with their libraries) for tests/tests/tcg_programs.rs
#   kernel-version       the kernel package version, e.g. 6.1.192-2
#   agent-initramfs.cpio.gz  rqemu-run's container initramfs: /init = the static rqemu-agent and
#                        the virtio/virtiofs/vsock modules (scripts/agent-initramfs.sh, run last)
#
# The kernel is fetched with `apt-get download` (needs the Debian apt lists, see
# scripts/install-deps.sh). Work is cached: the kernel is re-extracted only when the package
# version changes (stamp kernel.stamp), the initramfs only when the kernel, init.sh or this script
# change (stamp initramfs.stamp). Kernels are never committed (target/ is ignored).
#
# Env: RQEMU_GUEST_DIR (output dir), RQEMU_KERNEL_PKG (default linux-image-cloud-amd64),
#      RQEMU_KERNEL_VERSION (default: apt's candidate for RQEMU_KERNEL_PKG).
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${RQEMU_GUEST_DIR:-$ROOT/target/guest}"
META_PKG="${RQEMU_KERNEL_PKG:-linux-image-cloud-amd64}"
INIT_SRC="$ROOT/tests/guest/init.sh"
# Modules for the guest, in dependency order. Built-in ones are skipped.
MODULES=(virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net fuse virtiofs)
# util-linux tools copied (with their shared libraries) into the guest's /usr/bin; they shadow
# the busybox applets of the same name (busybox blkdiscard has no -z, busybox fallocate no -p/-z).
UL_TOOLS=(/usr/sbin/blkdiscard /usr/bin/fallocate)
# Dynamically linked Debian programs (and their shared libraries) copied into /opt/host/bin, out
# of PATH so they shadow no busybox applet: the software CPU must run the host's glibc and these
# programs' optimised code paths exactly as the host does (tests/tests/tcg_programs.rs).
HOST_PROGS=(/usr/bin/gzip /usr/bin/xz /usr/bin/bzip2 /usr/bin/zstd /usr/bin/sha256sum
    /usr/bin/sha1sum /usr/bin/md5sum /usr/bin/b2sum /usr/bin/sort /usr/bin/bc /usr/bin/mawk
    /usr/bin/seq /usr/bin/printf)

log() { printf 'guest-assets: %s\n' "$*"; }
die() { printf 'guest-assets: ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found; run scripts/install-deps.sh"; }
# shellcheck source=lib/initramfs.sh
. "$ROOT/scripts/lib/initramfs.sh"
for t in apt-get apt-cache dpkg-deb lz4 readelf cpio gzip od busybox ldd sha256sum; do need "$t"; done
BUSYBOX="$(command -v busybox)"
if command -v file >/dev/null 2>&1 && file -L "$BUSYBOX" | grep -q 'dynamically linked'; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# ---------------------------------------------------------------- kernel package version
VERSION="${RQEMU_KERNEL_VERSION:-}"
if [ -z "$VERSION" ]; then
    VERSION="$(apt-cache policy "$META_PKG" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
    [ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] ||
        die "apt knows no candidate for $META_PKG (run 'apt-get update' or scripts/install-deps.sh)"
fi

# ---------------------------------------------------------------- kernel: download + extract
KSTAMP="$OUT/kernel.stamp"
if [ -f "$KSTAMP" ] && [ "$(cat "$KSTAMP")" = "$VERSION" ] &&
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/vmlinux" ] && [ -d "$OUT/kernel-tree/lib/modules" ]; then
    log "kernel $META_PKG $VERSION: cached"
else
    log "kernel $META_PKG $VERSION: downloading"
    rm -f "$KSTAMP"
    DL="$OUT/download"
    rm -rf "$DL" "$OUT/kernel-tree"
    mkdir -p "$DL"
    # apt-get download as root warns that _apt cannot write here; make the dir world-writable.
    chmod 0777 "$DL"
    (cd "$DL" && apt-get -q download "$META_PKG=$VERSION" >"$DL/apt.log" 2>&1) ||
        { cat "$DL/apt.log" >&2; die "apt-get download $META_PKG=$VERSION failed (stale apt lists? run apt-get update)"; }
    META_DEB="$(ls "$DL"/*.deb)"
    # Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
    DEP="$(dpkg-deb -f "$META_DEB" Depends | tr ',' '\n' | awk '$1 ~ /^linux-image-/ { print $1; exit }')"
    DEP_VER="$(dpkg-deb -f "$META_DEB" Depends | tr ',' '\n' |
        awk -v p="$DEP" '$1 == p && $2 == "(=" { sub(/\)$/, "", $3); print $3; exit }')"
    [ -n "$DEP" ] || die "cannot find the linux-image-<ver> dependency of $META_PKG $VERSION"
    log "kernel image package: $DEP ${DEP_VER:-}"
    (cd "$DL" && apt-get -q download "$DEP${DEP_VER:+=$DEP_VER}" >"$DL/apt.log" 2>&1) ||
        { cat "$DL/apt.log" >&2; die "apt-get download $DEP failed (stale apt lists? run apt-get update)"; }
    mkdir -p "$OUT/kernel-tree"
    dpkg-deb -x "$DL/${DEP}_"*.deb "$OUT/kernel-tree"
    rm -rf "$DL"

    KIMGS=("$OUT"/kernel-tree/boot/vmlinuz-*)
    KIMG="${KIMGS[0]}"
    [ -f "$KIMG" ] || die "no /boot/vmlinuz-* in $DEP"
    cp "$KIMG" "$OUT/vmlinuz"

    # vmlinux: the bzImage payload is located by the setup header (setup_sects at 0x1f1,
    # payload_offset/payload_length at 0x248/0x24c) and must start with the LZ4 legacy magic
    # 02 21 4c 18 (Debian cloud kernels use CONFIG_KERNEL_LZ4). The payload ends with the 4-byte
    # decompressed size, which lz4 would reject as trailing garbage.
    u8() { od -An -t u1 -j "$1" -N 1 "$OUT/vmlinuz" | tr -d ' '; }
    u32() { od -An -t u4 -j "$1" -N 4 "$OUT/vmlinuz" | tr -d ' '; }
    SETUP_SECTS="$(u8 $((0x1f1)))"
    [ "$SETUP_SECTS" -ne 0 ] || SETUP_SECTS=4
    PAYLOAD_OFF=$(( (SETUP_SECTS + 1) * 512 + $(u32 $((0x248))) ))
    PAYLOAD_LEN="$(u32 $((0x24c)))"
    MAGIC="$(od -An -t x1 -j "$PAYLOAD_OFF" -N 4 "$OUT/vmlinuz" | tr -d ' ')"
    if [ "$MAGIC" != "02214c18" ]; then
        die "bzImage payload at offset $PAYLOAD_OFF starts with '$MAGIC', not the LZ4 legacy magic 02214c18 (kernel not LZ4-compressed?); cannot extract vmlinux"
    fi
    dd if="$OUT/vmlinuz" of="$OUT/payload.lz4" bs=1M iflag=skip_bytes,count_bytes \
        skip="$PAYLOAD_OFF" count="$((PAYLOAD_LEN - 4))" status=none ||
        die "cannot cut the payload out of the bzImage"
    lz4 -d -q -f "$OUT/payload.lz4" "$OUT/vmlinux.tmp" 2>"$OUT/lz4.log" ||
        { cat "$OUT/lz4.log" >&2; die "lz4 decompression of the bzImage payload failed"; }
    rm -f "$OUT/lz4.log" "$OUT/payload.lz4"
    [ "$(od -An -t x1 -N 4 "$OUT/vmlinux.tmp" | tr -d ' ')" = "7f454c46" ] ||
        die "decompressed kernel payload is not an ELF file"
    # XEN_ELFNOTE_PHYS32_ENTRY = 18 (0x12): the PVH entry point.
    NOTES="$(readelf -n "$OUT/vmlinux.tmp")" || die "readelf -n failed on the extracted vmlinux"
    grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32)' <<<"$NOTES" ||
        die "vmlinux has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY)"
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    echo "$VERSION" >"$OUT/kernel-version"
    echo "$VERSION" >"$KSTAMP"
    log "kernel: vmlinuz $(stat -c %s "$OUT/vmlinuz") bytes, vmlinux (ELF, PVH note) $(stat -c %s "$OUT/vmlinux") bytes"
fi

# ---------------------------------------------------------------- initramfs
ISTAMP_WANT="$VERSION $(cat "$0" "$ROOT/scripts/lib/initramfs.sh" "$INIT_SRC" | sha256sum | cut -c1-16)"
ISTAMP="$OUT/initramfs.stamp"
# The test guest's initramfs (kept as it was: busybox, /init = tests/guest/init.sh).
build_initramfs() {
    log "initramfs: building"
    rm -f "$ISTAMP"
    STAGE="$OUT/initramfs-root"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc,proc,sys,dev,tmp,run,mnt,root}
    chmod 1777 "$STAGE/tmp"
    cp "$BUSYBOX" "$STAGE/bin/busybox"
    SKIP_APPLETS=" busybox "
    for t in "${UL_TOOLS[@]}"; do SKIP_APPLETS+="$(basename "$t") "; done
    for applet in $("$BUSYBOX" --list); do
        case "$SKIP_APPLETS" in *" $applet "*) continue ;; esac
        ln -s busybox "$STAGE/bin/$applet"
    done

    # util-linux tools and their shared libraries (same paths as on the host).
    copy_lib() {
        local src="$1" dst="$STAGE$1"
        [ -e "$dst" ] && return 0
        mkdir -p "$(dirname "$dst")"
        cp -L "$src" "$dst"
    }
    for t in "${UL_TOOLS[@]}"; do
        [ -x "$t" ] || die "$t not found (util-linux)"
        cp -L "$t" "$STAGE/usr/bin/$(basename "$t")"
        for lib in $(ldd "$t" | awk '/=> \// { print $3 } /^[[:space:]]*\/lib/ { print $1 }'); do
            copy_lib "$lib"
        done
    done

    mkdir -p "$STAGE/opt/host/bin"
    for t in "${HOST_PROGS[@]}"; do
        [ -x "$t" ] || die "$t not found; run scripts/install-deps.sh"
        cp -L "$t" "$STAGE/opt/host/bin/$(basename "$t")"
        for lib in $(ldd "$t" | awk '/=> \// { print $3 } /^[[:space:]]*\/lib/ { print $1 }'); do
            copy_lib "$lib"
        done
    done

    KVER_DIRS=("$OUT"/kernel-tree/lib/modules/*)
    KVER_DIR="${KVER_DIRS[0]}"
    [ -d "$KVER_DIR/kernel" ] || die "no modules in $OUT/kernel-tree (delete $OUT and rerun)"
    stage_modules "$KVER_DIR" "$STAGE" "${MODULES[@]}"

    install -m 0755 "$INIT_SRC" "$STAGE/init"
    pack_initramfs "$STAGE" "$OUT/initramfs.cpio.gz"
    rm -rf "$STAGE"
    echo "$ISTAMP_WANT" >"$ISTAMP"
    log "initramfs: $OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"
}
if [ -f "$ISTAMP" ] && [ "$(cat "$ISTAMP")" = "$ISTAMP_WANT" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
    log "initramfs: cached"
else
    build_initramfs
fi

# ---------------------------------------------------------------- rqemu-run's agent initramfs
RQEMU_GUEST_DIR="$OUT" "$ROOT/scripts/agent-initramfs.sh"

#!/usr/bin/env bash
# Install the host packages rqemu's build, guest assets and end-to-end tests need, on Debian 12
# (bookworm). Idempotent: returns in well under a second when everything is already present.
#
#   - QEMU 10 (qemu-system-x86, qemu-utils: qemu-img, qemu-storage-daemon) from
#     bookworm-backports — the e2e tests use QEMU TCG as the reference vhost-user frontend;
#   - acpica-tools (iasl: cross-checks our ACPI tables), busybox-static, cpio, xz-utils, lz4, zstd, kmod, binutils (readelf), util-linux
#     (blkdiscard/fallocate copied into the guest), gzip, iproute2 — for scripts/guest-assets.sh,
#     systemd (systemd-analyze, systemd-socket-activate: the unit and socket-activation tests),
#     bzip2, coreutils, bc, mawk (real dynamically linked programs the TCG tests run in the guest),
#     socat (the guest end of the vsock e2e test: VSOCK-CONNECT/VSOCK-LISTEN), fio (run with
#     verification in a guest on rqemu-blk --cache none, and the host limit in bench/scripts)
#     and the tests.
#
# Run as root (or with sudo available). Output is quiet; on failure the apt log is printed.
# Only the packages that are missing (or older than needed) are installed, each from its suite.
#
# Env (for scripts/tests/install-deps.sh, which runs this script against stand-ins):
#   RQEMU_APT_DIR (default /etc/apt), RQEMU_OS_RELEASE (default /etc/os-release),
#   RQEMU_QBOOT_ROM (default /usr/share/qemu/qboot.rom).
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR

APT_DIR="${RQEMU_APT_DIR:-/etc/apt}"
OS_RELEASE="${RQEMU_OS_RELEASE:-/etc/os-release}"
QBOOT_ROM="${RQEMU_QBOOT_ROM:-/usr/share/qemu/qboot.rom}"
BACKPORTS_FILE="$APT_DIR/sources.list.d/rqemu-backports.sources"
# Packages that must come from bookworm-backports (minimum version in the second column).
BPO_PKGS=(qemu-system-x86 qemu-utils)
BPO_MIN_VERSION="1:10"
# Packages from the main suite.
MAIN_PKGS=(busybox-static cpio xz-utils lz4 zstd kmod binutils util-linux gzip iproute2 acpica-tools
    systemd bzip2 coreutils bc mawk socat fio
    podman conmon runc containerd)  # the container engines driving rqemu-run (tests/tests/run_*.rs)

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

if ! grep -q 'VERSION_CODENAME=bookworm' "$OS_RELEASE" 2>/dev/null; then
    die "this script targets Debian 12 (bookworm); $OS_RELEASE says otherwise"
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi
as_root() {
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
        die "root is needed to $1 (run as root or install sudo)"
    fi
    "${SUDO[@]}" "${@:2}"
}

# installed_version PKG -> prints the installed version, empty if not installed. dpkg-query
# exits 1 for a package it has no record of (a fresh machine): that is "not installed", not an
# error, so its status is not allowed to end the script.
installed_version() {
    local status
    status="$(dpkg-query -W -f '${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null)" || status=""
    awk '$1 == "ii" { print $2 }' <<<"$status"
}

missing_main=()
for p in "${MAIN_PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing_main+=("$p")
done
missing_bpo=()
for p in "${BPO_PKGS[@]}"; do
    v="$(installed_version "$p")"
    if [ -z "$v" ] || ! dpkg --compare-versions "$v" ge "$BPO_MIN_VERSION"; then
        missing_bpo+=("$p")
    fi
done

if [ ${#missing_main[@]} -eq 0 ] && [ ${#missing_bpo[@]} -eq 0 ]; then
    [ -f "$QBOOT_ROM" ] ||
        die "$QBOOT_ROM missing (package qemu-system-data); the e2e tests boot with qboot"
    log "all packages present (qemu-system-x86 $(installed_version qemu-system-x86))"
    exit 0
fi
log "missing: ${missing_main[*]}${missing_main[*]:+ }${missing_bpo[*]}${missing_bpo[*]:+ (from bookworm-backports)}"

if [ ${#missing_bpo[@]} -gt 0 ] &&
    ! grep -rqs '^[^#]*bookworm-backports' "$APT_DIR/sources.list" "$APT_DIR/sources.list.d/"; then
    log "adding bookworm-backports apt source ($BACKPORTS_FILE)"
    as_root "add the backports source" mkdir -p "$(dirname "$BACKPORTS_FILE")"
    as_root "add the backports source" tee "$BACKPORTS_FILE" >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi

APT_LOG="$(mktemp -t rqemu-install-deps.XXXXXX)"
trap 'rm -f "$APT_LOG"' EXIT
apt_quiet() {
    if ! as_root "run apt-get" env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -y -o Dpkg::Use-Pty=0 "$@" >"$APT_LOG" 2>&1; then
        cat "$APT_LOG" >&2
        die "apt-get $* failed (log above)"
    fi
}

# Something is missing: refresh the package lists once, then install.
log "apt-get update"
apt_quiet update
if [ ${#missing_main[@]} -gt 0 ]; then
    log "installing ${missing_main[*]}"
    apt_quiet install --no-install-recommends "${missing_main[@]}"
fi
if [ ${#missing_bpo[@]} -gt 0 ]; then
    log "installing ${missing_bpo[*]} from bookworm-backports"
    apt_quiet install --no-install-recommends -t bookworm-backports "${missing_bpo[@]}"
fi

for p in "${BPO_PKGS[@]}"; do
    v="$(installed_version "$p")"
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$BPO_MIN_VERSION" ||
        die "$p is '${v:-not installed}' after install, need >= $BPO_MIN_VERSION"
done
[ -f "$QBOOT_ROM" ] ||
    die "$QBOOT_ROM missing (package qemu-system-data); the e2e tests boot with qboot"
log "done (qemu-system-x86 $(installed_version qemu-system-x86))"

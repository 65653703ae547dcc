#!/usr/bin/env bash
# Install the host packages rqemu's build, guest assets and end-to-end tests need, on Debian 12
# (bookworm). Idempotent: returns in well under a second when everything is already present.
#
#   - QEMU 10 (qemu-system-x86, qemu-utils: qemu-img, qemu-storage-daemon) from
#     bookworm-backports — the e2e tests use QEMU TCG as the reference vhost-user frontend;
#   - acpica-tools (iasl: cross-checks our ACPI tables), busybox-static, cpio, xz-utils, lz4, zstd, kmod, binutils (readelf), util-linux
#     (blkdiscard/fallocate copied into the guest), gzip, iproute2 — for scripts/guest-assets.sh
#     and the tests.
#
# Run as root (or with sudo available). Output is quiet; on failure the apt log is printed.
set -euo pipefail

BACKPORTS_FILE=/etc/apt/sources.list.d/rqemu-backports.sources
# Packages that must come from bookworm-backports (minimum version in the second column).
BPO_PKGS=(qemu-system-x86 qemu-utils)
BPO_MIN_VERSION="1:10"
# Packages from the main suite.
MAIN_PKGS=(busybox-static cpio xz-utils lz4 zstd kmod binutils util-linux gzip iproute2 acpica-tools
    bzip2 coreutils bc mawk)

log() { printf 'install-deps: %s\n' "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

if ! grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    die "this script targets Debian 12 (bookworm); /etc/os-release says otherwise"
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

# installed_version PKG -> prints the installed version, empty if not installed.
installed_version() {
    dpkg-query -W -f '${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2 }'
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
    [ -f /usr/share/qemu/qboot.rom ] ||
        die "/usr/share/qemu/qboot.rom missing (package qemu-system-data); the e2e tests boot with qboot"
    log "all packages present (qemu-system-x86 $(installed_version qemu-system-x86))"
    exit 0
fi
log "missing: ${missing_main[*]} ${missing_bpo[*]}"

if [ ${#missing_bpo[@]} -gt 0 ] &&
    ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports apt source ($BACKPORTS_FILE)"
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
    # Install both QEMU packages from backports together so qemu-utils is never downgraded.
    log "installing ${BPO_PKGS[*]} from bookworm-backports"
    apt_quiet install --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
fi

for p in "${BPO_PKGS[@]}"; do
    v="$(installed_version "$p")"
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$BPO_MIN_VERSION" ||
        die "$p is '${v:-not installed}' after install, need >= $BPO_MIN_VERSION"
done
[ -f /usr/share/qemu/qboot.rom ] ||
    die "/usr/share/qemu/qboot.rom missing (package qemu-system-data); the e2e tests boot with qboot"
log "done (qemu-system-x86 $(installed_version qemu-system-x86))"

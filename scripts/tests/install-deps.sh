#!/usr/bin/env bash
# Tests scripts/install-deps.sh against stand-ins for dpkg-query, dpkg and apt-get put first on
# PATH: each case chooses which packages the stand-in dpkg database reports as missing (as on a
# fresh machine, where dpkg-query has no record of them and exits 1), runs the script, and checks
# what it asked apt-get to do (recorded by the stand-in) and its exit status. Nothing on the real
# machine is changed: the apt configuration and the qboot ROM path point into a scratch directory.
#
#   scripts/tests/install-deps.sh [path/to/install-deps.sh]     (run by scripts/test.sh)
set -Eeuo pipefail
trap 'rc=$?; printf "install-deps test: line %d: \"%s\" failed (exit %d)\n" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SCRIPT="$(realpath "${1:-$ROOT/scripts/install-deps.sh}")"
REAL_DPKG="$(command -v dpkg)" || { echo "install-deps test: dpkg not found (Debian only)" >&2; exit 1; }

SCRATCH="$(mktemp -d -t rqemu-install-deps-test.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
BIN="$SCRATCH/bin"
mkdir -p "$BIN"

# dpkg-query -W -f FMT PKG: "ii  VERSION" for a package in the stand-in database, else exit 1
# with dpkg-query's message for a package it has never seen.
cat >"$BIN/dpkg-query" <<'EOF'
#!/usr/bin/env bash
pkg="${!#}"
echo "dpkg-query $*" >>"$FAKE_STATE/calls"
if [ -f "$FAKE_STATE/db/$pkg" ]; then printf 'ii  %s' "$(cat "$FAKE_STATE/db/$pkg")"; exit 0; fi
echo "dpkg-query: no packages found matching $pkg" >&2
exit 1
EOF
# dpkg: --compare-versions is the real one; anything else is recorded and refused.
cat >"$BIN/dpkg" <<EOF
#!/usr/bin/env bash
if [ "\$1" = --compare-versions ]; then exec "$REAL_DPKG" "\$@"; fi
echo "dpkg \$*" >>"\$FAKE_STATE/calls"
exit 1
EOF
# apt-get: records the call; "install" adds the named packages to the stand-in database, with a
# backports version when asked for -t bookworm-backports.
cat >"$BIN/apt-get" <<'EOF'
#!/usr/bin/env bash
echo "apt-get $*" >>"$FAKE_STATE/calls"
echo "apt-get $*" >>"$FAKE_STATE/apt-calls"
suite=main install=0 pkgs=()
while [ $# -gt 0 ]; do
  case "$1" in
    -t) suite="$2"; shift ;;
    -o) shift ;;
    install) install=1 ;;
    -*|update) ;;
    *) pkgs+=("$1") ;;
  esac
  shift
done
if [ "$install" = 1 ]; then
  for p in "${pkgs[@]}"; do
    if [ "$suite" = bookworm-backports ]; then v="1:10.0.2+ds-2~bpo12+1"; else v="1.0-1"; fi
    echo "$v" >"$FAKE_STATE/db/$p"
    echo "$suite $p" >>"$FAKE_STATE/installed"
  done
fi
exit 0
EOF
chmod +x "$BIN"/*

MAIN_PKGS=(busybox-static cpio xz-utils lz4 zstd kmod binutils util-linux gzip iproute2 acpica-tools
    systemd bzip2 coreutils bc mawk socat fio
    podman conmon runc containerd)
BPO_PKGS=(qemu-system-x86 qemu-utils)

passed=0 failed=0
fail() { echo "  FAIL: $*"; failed=$((failed + 1)); }
ok() { echo "  ok: $*"; passed=$((passed + 1)); }

# run_case NAME "MISSING..." "OLD..." BACKPORTS_SOURCE(yes|no)
# MISSING packages have no dpkg record, OLD ones are installed at bookworm's 1:7.2 version.
run_case() {
  local name="$1" missing=" $2 " old=" $3 " bpo_source="$4"
  echo "case: $name"
  export FAKE_STATE="$SCRATCH/$name"
  mkdir -p "$FAKE_STATE/db" "$FAKE_STATE/apt/sources.list.d"
  : >"$FAKE_STATE/calls"
  : >"$FAKE_STATE/installed"
  : >"$FAKE_STATE/apt-calls"
  for p in "${MAIN_PKGS[@]}"; do
    case "$missing" in *" $p "*) ;; *) echo "1.0-1" >"$FAKE_STATE/db/$p" ;; esac
  done
  for p in "${BPO_PKGS[@]}"; do
    case "$missing" in
      *" $p "*) ;;
      *) case "$old" in *" $p "*) echo "1:7.2+dfsg-7" ;; *) echo "1:10.0.2+ds-2~bpo12+1" ;; esac >"$FAKE_STATE/db/$p" ;;
    esac
  done
  if [ "$bpo_source" = yes ]; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$FAKE_STATE/apt/sources.list"
  else
    echo "deb http://deb.debian.org/debian bookworm main" >"$FAKE_STATE/apt/sources.list"
  fi
  printf 'ID=debian\nVERSION_CODENAME=bookworm\n' >"$FAKE_STATE/os-release"
  touch "$FAKE_STATE/qboot.rom"
  local rc=0
  PATH="$BIN:$PATH" RQEMU_APT_DIR="$FAKE_STATE/apt" RQEMU_OS_RELEASE="$FAKE_STATE/os-release" \
    RQEMU_QBOOT_ROM="$FAKE_STATE/qboot.rom" bash "$SCRIPT" >"$FAKE_STATE/out" 2>&1 || rc=$?
  sed 's/^/    | /' "$FAKE_STATE/out"
  [ "$rc" -eq 0 ] && ok "exit status 0" || fail "exit status $rc (want 0)"
}

# expect_installed "SUITE PKG" ... : exactly these installs happened, in any order.
expect_installed() {
  local want got
  want="$(printf '%s\n' "$@" | sed '/^$/d' | sort)"
  got="$(sort "$FAKE_STATE/installed")"
  if [ "$want" = "$got" ]; then
    ok "installed exactly: $(echo ${want:-nothing})"
  else
    fail "installed '$(echo $got)', want '$(echo $want)'"
  fi
}

run_case all-present "" "" yes
expect_installed
if [ -s "$FAKE_STATE/apt-calls" ]; then fail "apt-get called with nothing missing: $(cat "$FAKE_STATE/apt-calls")"; else ok "no apt-get call"; fi
[ ! -e "$FAKE_STATE/apt/sources.list.d/rqemu-backports.sources" ] && ok "no apt source added" ||
  fail "an apt source was added with nothing missing"

run_case one-main-one-backports "cpio qemu-system-x86" "" yes
expect_installed "main cpio" "bookworm-backports qemu-system-x86"
grep -qx 'apt-get -q -y -o Dpkg::Use-Pty=0 update' "$FAKE_STATE/apt-calls" && ok "apt-get update before installing" ||
  fail "no apt-get update"
grep -q -- '-t bookworm-backports qemu-system-x86$' "$FAKE_STATE/apt-calls" && ok "qemu-system-x86 from bookworm-backports" ||
  fail "qemu-system-x86 not asked from bookworm-backports"

run_case fresh-machine-no-backports-source "acpica-tools busybox-static qemu-system-x86 qemu-utils" "" no
expect_installed "main acpica-tools" "main busybox-static" \
  "bookworm-backports qemu-system-x86" "bookworm-backports qemu-utils"
grep -qs 'Suites: bookworm-backports' "$FAKE_STATE/apt/sources.list.d/rqemu-backports.sources" &&
  ok "bookworm-backports source added" || fail "bookworm-backports source not added"

run_case backports-package-too-old "" "qemu-utils" yes
expect_installed "bookworm-backports qemu-utils"

echo "install-deps test: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || exit 1

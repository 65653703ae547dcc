#!/usr/bin/env bash
# Runs every rqemu test on this machine: installs what is missing (Debian packages, guest
# assets), then format, lint, build and the whole test suite (unit, in-process vhost-user,
# end-to-end with QEMU and real guests, KVM payloads).
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
scripts/install-deps.sh
step "set-up script test (install-deps.sh against stand-in dpkg/apt)"
scripts/tests/install-deps.sh >/tmp/rqemu-install-deps-test.log 2>&1 ||
  { cat /tmp/rqemu-install-deps-test.log >&2; echo "install-deps test failed (log above)" >&2; exit 1; }
tail -n 1 /tmp/rqemu-install-deps-test.log
step "guest assets"
scripts/guest-assets.sh

if [ -e /dev/kvm ]; then
  echo "KVM: /dev/kvm present: KVM tests run"
else
  echo "KVM: /dev/kvm ABSENT: KVM tests will report that they cannot run" >&2
fi

step "one rust-vmm line (cargo tree -d)"
tree=$(cargo tree -d --workspace -e normal,build --locked) || { echo "cargo tree failed" >&2; exit 1; }
dups=$(grep -E '^(vm-memory|virtio-queue|vhost|vhost-user-backend|virtio-bindings|vmm-sys-util|kvm-ioctls|kvm-bindings|linux-loader|fuse-backend-rs) ' <<<"$tree" || true)
if [ -n "$dups" ]; then
  echo "duplicate rust-vmm crates in Cargo.lock:" >&2; echo "$dups" >&2; exit 1
fi
echo "no duplicate rust-vmm crate"

step "security advisories (cargo audit against the RustSec database)"
# The database is a git repository on github.com; crates.io alone does not carry it. Where it
# cannot be fetched, say so loudly rather than pass in silence.
if timeout 15 git ls-remote -q https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  command -v cargo-audit >/dev/null || cargo install --locked -q cargo-audit
  cargo audit
else
  echo "ADVISORIES NOT CHECKED: the RustSec advisory database (github.com/rustsec/advisory-db) is unreachable from this machine" >&2
fi

step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build"
cargo build --workspace --bins --locked
step "fuzz targets (smoke run)"
scripts/fuzz-smoke.sh

step "tests"
cargo test --workspace --locked -- --test-threads="${RQEMU_TEST_THREADS:-2}"

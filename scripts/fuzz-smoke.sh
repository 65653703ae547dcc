#!/usr/bin/env bash
# Coverage-guided fuzz smoke run. Builds every target under fuzz/ with cargo-fuzz (libFuzzer
# with SanitizerCoverage; optimised, with debug assertions and overflow checks;
# RUSTC_BOOTSTRAP=1 gives the nightly flags on the stable toolchain), then runs each for a few
# seconds starting from its seed corpus, fuzz/corpus/<target>/ (valid qcow2 images of every
# feature, valid descriptor chains, FUSE requests and TX packets; regenerate with
# fuzz/gen_corpus.py), and prints the coverage reached: edges (libFuzzer's `cov`) and
# features (`ft`) once the seeds are loaded and at the end, out of the instrumented edges.
# The committed corpora are only read: new inputs go to a temporary directory.
#
#   RQEMU_FUZZ_SECONDS=N scripts/fuzz-smoke.sh        # N seconds per target (default 5)
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> corpus/<target>   # real fuzzing
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../fuzz"
secs=${RQEMU_FUZZ_SECONDS:-5}
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz missing, installing $cargo_fuzz_version from crates.io"
  cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
export RUSTC_BOOTSTRAP=1
# -O -a: release optimisations plus debug assertions and overflow checks. No sanitizer in
# the smoke run (speed); `cargo fuzz run` uses AddressSanitizer by default.
cargo fuzz build -O -a -s none
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p artifacts
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

field() { # field NAME LINE -> the value after "NAME: "
  sed -n "s/.* $1: \([^ ]*\).*/\1/p" <<<"$2"
}

status=0
for t in $(cargo fuzz list); do
  seeds=corpus/$t
  if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
    echo "fuzz-smoke: $t has no seed corpus in fuzz/$seeds (run fuzz/gen_corpus.py)" >&2
    status=1
    continue
  fi
  mkdir "$work/$t"
  log=$work/$t.log
  if ! "$bin/$t" "$work/$t" "$seeds" -max_total_time="$secs" -timeout=20 -seed=1 -print_final_stats=1 \
      -artifact_prefix="$PWD/artifacts/$t-" >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz-smoke: $t FAILED (crash, timeout or assertion above; input in fuzz/artifacts/)" >&2
    status=1
    continue
  fi
  edges=$(sed -n 's/.*Loaded [0-9]* modules *(\([0-9]*\) inline 8-bit counters).*/\1/p' "$log" | head -n 1)
  inited=$(grep -m 1 -E '^#[0-9]+[[:space:]]+INITED ' "$log" || true)
  last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse) ' "$log" | tail -n 1 || true)
  [ -n "$last" ] || last=$inited
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  printf 'fuzz-smoke: %-14s %3d seeds  cov %5s -> %5s of %s edges  ft %5s -> %5s  %s runs in %ss\n' \
    "$t" "$(ls "$seeds" | wc -l)" "$(field cov "$inited")" "$(field cov "$last")" "${edges:-?}" \
    "$(field ft "$inited")" "$(field ft "$last")" "${execs:-?}" "$secs"
done
exit $status

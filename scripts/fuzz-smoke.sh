#!/usr/bin/env bash
# Builds every fuzz target as a plain libFuzzer binary (stable toolchain, no coverage
# instrumentation) and runs each for a bounded number of random inputs: a smoke test that the
# targets build and that nothing panics on the first inputs. Real fuzzing (coverage-guided):
#   cargo install cargo-fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target>
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../fuzz"
runs=${RQEMU_FUZZ_RUNS:-20000}
cargo build --release -q --bins
for t in $(cargo read-manifest | python3 -c 'import json,sys; print(" ".join(b["name"] for b in json.load(sys.stdin)["targets"] if "bin" in b["kind"]))'); do
  echo "fuzz-smoke: $t ($runs runs)"
  target/release/"$t" -runs="$runs" -max_len=4096 -seed=1 2>&1 | tail -n 1
done

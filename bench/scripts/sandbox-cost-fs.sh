#!/usr/bin/env bash
# The cost of rqemu-fs's sandbox: the same guest-less FUSE workload (rqemu-bench fs) against
# rqemu-fs as it runs by default (namespaces, private procfs, pivot_root, capabilities,
# landlock, seccomp kill on every thread) and with `--sandbox none --seccomp none`, runs
# alternating, a fresh daemon each. Prints every run (ops/s, p50 and p99 latency in µs, and the
# serving process's CPU time per operation — less sensitive to a loaded machine than
# throughput) and the medians per mode.
# Usage: bench/scripts/sandbox-cost-fs.sh [runtime-s] [repetitions] [workload]  (as root)
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../.."
runtime=${1:-5}
reps=${2:-5}
workload=${3:-metadata}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p rqemu-fs -p rqemu-bench
bin=$target/release
hz=$(getconf CLK_TCK)
work=$(mktemp -d /tmp/rqemu-fs-sandbox-cost.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/share"
results=$work/results
for _ in $(seq "$reps"); do
  for mode in default off; do
    rm -f "$work/s.sock"
    extra=()
    [ "$mode" = off ] && extra=(--sandbox none --seccomp none)
    "$bin/rqemu-fs" --socket "$work/s.sock" --shared-dir "$work/share" --tag t --cache auto \
      "${extra[@]}" 2>>"$work/$mode.log" &
    pid=$!
    for _ in $(seq 200); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
    out=$("$bin/rqemu-bench" fs --socket "$work/s.sock" --tag t --workload "$workload" --bs 4k \
            --iodepth 16 --runtime "$runtime" --json)
    # The serving process: the started one, or its child in a new pid namespace.
    srv=$(awk '{print $1}' "/proc/$pid/task/$pid/children")
    srv=${srv:-$pid}
    ticks=$(awk '{print $14 + $15}' "/proc/$srv/stat")
    python3 -c '
import json, sys
d = json.loads(sys.argv[1]); ops = d["ops_s"] * float(sys.argv[3])
cpu_us = int(sys.argv[2]) / float(sys.argv[4]) * 1e6
print(sys.argv[5], round(d["ops_s"]), d["lat_us"]["p50"], d["lat_us"]["p99"], "%.2f" % (cpu_us / ops))
' "$out" "$ticks" "$runtime" "$hz" "$mode" | tee -a "$results"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
grep -h "rqemu-fs: sandbox" "$work"/*.log | sed 's/^[^ ]* *INFO //' | sort -u
python3 - "$results" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
print("mode     runs  ops/s  p50_us  p99_us  cpu_us/op   (medians)")
for m in ("default", "off"):
    r = [x for x in rows if x[0] == m]
    med = lambda i: st.median(float(x[i]) for x in r)
    print(f"{m:8} {len(r):4} {med(1):7.0f} {med(2):7.1f} {med(3):7.1f} {med(4):9.2f}")
PY

#!/usr/bin/env bash
# The cost of rqemu-fs --state-file (the resume table: a MAP_SHARED slot per node and handle,
# updated on LOOKUP/FORGET/OPEN/RELEASE/...; use_host_ino node ids): the same guest-less FUSE
# client (rqemu-bench fs) against rqemu-fs without and with the option, default sandbox,
# --cache auto, one request queue, a fresh daemon (and state file) per run.
# Usage: bench/scripts/state-cost-fs.sh [runtime-s] [repetitions]  (median printed)
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../.."
runtime=${1:-5}
reps=${2:-3}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p rqemu-fs -p rqemu-bench
bin=$target/release
work=$(mktemp -d /tmp/rqemu-fsstate.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; [ -n "${statedir:-}" ] && rm -rf "$statedir"' EXIT
share=$work/share
mkdir "$share"
# Where the state file goes (RQEMU_FS_STATE_DIR; default: the work dir). On tmpfs (/run, as the
# systemd unit uses) a store is a store; on a disk filesystem the page cache's writeback makes
# the next store to a cleaned page fault again (page_mkwrite).
statedir=$(mktemp -d "${RQEMU_FS_STATE_DIR:-$work}/rqemu-fsstate.XXXXXX")

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
summary() {
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ops_s"], d["lat_us"]["p50"], d["lat_us"]["p99"])'
}
cases=("metadata 4k 16" "create 4k 8" "randread 4k 16")
results=$work/results
for rep in $(seq "$reps"); do
  for c in "${cases[@]}"; do
    set -- $c
    for mode in plain state; do
      rm -f "$work/r.sock" "$statedir/fs.state"
      extra=()
      [ "$mode" = state ] && extra=(--state-file "$statedir/fs.state")
      "$bin/rqemu-fs" --socket "$work/r.sock" --shared-dir "$share" --tag rqfs --cache auto \
        "${extra[@]}" 2>>"$work/rqemu-fs.log" &
      pid=$!
      wait_sock "$work/r.sock"
      out=$("$bin/rqemu-bench" fs --socket "$work/r.sock" --tag rqfs --workload "$1" --bs "$2" \
              --iodepth "$3" --runtime "$runtime" --json) || { cat "$work/rqemu-fs.log" >&2; exit 1; }
      echo "$mode $c $(summary <<<"$out")" >>"$results"
      kill "$pid"; wait "$pid" 2>/dev/null || true
    done
  done
done
echo "rqemu-bench fs: ${runtime}s per run, median of $reps; ops/s (create: file cycles/s), p50/p99 us"
python3 - "$results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    m, w, bs, qd, ops, p50, p99 = line.split()
    rows.setdefault((w, bs, qd), {}).setdefault(m, []).append(tuple(map(float, (ops, p50, p99))))
med = lambda runs: [statistics.median(col) for col in zip(*runs)]
print(f"{'case':<18} {'plain':>10} {'state-file':>11} {'ratio':>7}   latency plain | state")
for (w, bs, qd), d in rows.items():
    p, s = med(d["plain"]), med(d["state"])
    print(f"{w+' '+bs+' qd'+qd:<18} {p[0]:>10.0f} {s[0]:>11.0f} {s[0]/p[0]:>7.2f}   "
          f"{p[1]:.0f}/{p[2]:.0f} | {s[1]:.0f}/{s[2]:.0f}")
PY

#!/usr/bin/env bash
# rqemu-fs vs virtiofsd (crates.io, installed here if missing) sharing the same directory,
# driven by the same guest-less FUSE client (rqemu-bench fs), plus the same workload done with
# system calls directly on the directory (rqemu-bench fs --host-dir: one thread, one call at a
# time) as the host's own figure.
#
# Both daemons run as they do by default: rqemu-fs in its default sandbox (namespaces, seccomp),
# virtiofsd with --sandbox namespace and --seccomp kill; both --cache auto, one request queue
# (virtiofsd has exactly one; its default --thread-pool-size 0 serves it in the queue thread,
# rqemu-fs has one worker thread per queue). Each workload gets a fresh daemon (virtiofsd serves
# one frontend and exits); rqemu-bench prepares its files through FUSE in a fresh
# subdirectory (untimed) and removes them. Prints the figures and the rqemu/virtiofsd ratios.
# Note: virtiofsd's default --inode-file-handles=prefer weighs on its metadata figure (on the
# machine this was written on, =never roughly doubled it); the defaults are compared here.
# Usage: bench/scripts/compare-fs.sh [runtime-s] [repetitions]  (the median of the repetitions is
# printed; the runs of one repetition alternate rqemu-fs, virtiofsd, host)
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../.."
runtime=${1:-5}
reps=${2:-3}
target=${CARGO_TARGET_DIR:-target}
tools=target/tools/virtiofsd # cached across target dirs
virtiofsd_version=1.14.0

# virtiofsd needs libseccomp and libcap-ng to build.
for p in libseccomp-dev libcap-ng-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
if ! "$tools/bin/virtiofsd" --version 2>/dev/null | grep -q "$virtiofsd_version"; then
  echo "installing virtiofsd $virtiofsd_version into $tools" >&2
  cargo install -q virtiofsd --version "$virtiofsd_version" --locked --root "$tools"
fi
virtiofsd=$tools/bin/virtiofsd
cargo build --release -q -p rqemu-fs -p rqemu-bench
bin=$target/release
work=$(mktemp -d /tmp/rqemu-fsbench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
share=$work/share
mkdir "$share"

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
summary() { # JSON from rqemu-bench -> "ops/s MB/s p50 p99"
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["ops_s"], d["mb_s"], d["lat_us"]["p50"], d["lat_us"]["p99"])'
}
bench() { # socket tag workload bs iodepth
  local out
  if ! out=$("$bin/rqemu-bench" fs --socket "$1" --tag "$2" --workload "$3" --bs "$4" \
               --iodepth "$5" --runtime "$runtime" --json); then
    echo "rqemu-bench failed against $1; daemon logs:" >&2
    cat "$work"/*.log >&2
    exit 1
  fi
  summary <<<"$out"
}

cases=("metadata 4k 16" "seqread 128k 8" "randread 4k 16" "create 4k 8")
results=$work/results # lines: target case... ops/s MB/s p50 p99
for rep in $(seq "$reps"); do
  for c in "${cases[@]}"; do
    set -- $c
    rm -f "$work/r.sock"
    "$bin/rqemu-fs" --socket "$work/r.sock" --shared-dir "$share" --tag rqfs --cache auto \
      2>>"$work/rqemu-fs.log" &
    pid=$!
    wait_sock "$work/r.sock"
    echo "rqemu-fs $c $(bench "$work/r.sock" rqfs "$@")" >>"$results"
    kill "$pid"; wait "$pid" 2>/dev/null || true

    rm -f "$work/v.sock"
    "$virtiofsd" --socket-path "$work/v.sock" --shared-dir "$share" --tag vfs --cache auto \
      --log-level error 2>>"$work/virtiofsd.log" &
    pid=$!
    wait_sock "$work/v.sock"
    echo "virtiofsd $c $(bench "$work/v.sock" vfs "$@")" >>"$results"
    wait "$pid" 2>/dev/null || true # virtiofsd exits when its frontend leaves

    echo "host $c $("$bin/rqemu-bench" fs --host-dir "$share" --workload "$1" --bs "$2" \
                      --runtime "$runtime" --json | summary)" >>"$results"
  done
done

echo
echo "rqemu-bench fs: ${runtime}s per run, median of $reps run(s); ops/s (create: file cycles/s);"
echo "MB/s; latency p50/p99 in us (host: one thread, one system call at a time)"
python3 - "$results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    t, w, bs, qd, ops, mb, p50, p99 = line.split()
    rows.setdefault((w, bs, qd), {}).setdefault(t, []).append(
        tuple(map(float, (ops, mb, p50, p99))))
med = lambda runs: [statistics.median(col) for col in zip(*runs)]
print(f"{'case':<18} {'rqemu-fs':>10} {'virtiofsd':>10} {'host':>10} {'rqemu/vfsd':>10}"
      f"   {'MB/s rqemu / vfsd / host':<28} latency rqemu | vfsd | host")
for (w, bs, qd), d in rows.items():
    r, v, h = (med(d[t]) for t in ("rqemu-fs", "virtiofsd", "host"))
    ratio = r[0] / v[0] if v[0] else 0
    print(f"{w+' '+bs+' qd'+qd:<18} {r[0]:>10.0f} {v[0]:>10.0f} {h[0]:>10.0f} {ratio:>10.2f}"
          f"   {r[1]:>8.1f} /{v[1]:>8.1f} /{h[1]:>8.1f}   "
          f"{r[2]:.0f}/{r[3]:.0f} | {v[2]:.0f}/{v[3]:.0f} | {h[2]:.1f}/{h[3]:.1f}")
PY

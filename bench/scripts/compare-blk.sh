#!/usr/bin/env bash
# rqemu-blk vs qemu-storage-daemon (vhost-user-blk export) at its best (aio=io_uring, an
# iothread) on the same raw image, driven by the same guest-less driver (rqemu-bench), and host
# fio with io_uring at the same queue depth on the same file as the limit. Two modes:
#   page cache: rqemu-blk --cache writeback | QSD cache.direct=off | fio buffered
#   O_DIRECT:   rqemu-blk --cache none      | QSD cache.direct=on  | fio --direct=1
# Prints the figures, rqemu/QSD and rqemu/fio ratios, and the load average at the start.
# Usage: bench/scripts/compare-blk.sh [runtime-s] (RQEMU_AIO=io-uring|threads|sync forces an
# engine for rqemu-blk; by default it picks its own per cache mode)
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../.."
runtime=${1:-5}
aio=${RQEMU_AIO:-}
command -v fio >/dev/null || { apt-get install -y -qq --no-install-recommends fio >/dev/null; }
cargo build --release -q -p rqemu-blk -p rqemu-bench
bin=${CARGO_TARGET_DIR:-target}/release
# A disk-backed directory: O_DIRECT needs a real file system (not tmpfs).
work=$(mktemp -d "${RQEMU_BENCH_DIR:-/var/tmp}/rqemu-bench.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
img=$work/disk.raw
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
sync

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
bench() { # socket rw bs iodepth -> IOPS p50 p99
  "$bin/rqemu-bench" blk --socket "$1" --rw "$2" --bs "$3" --iodepth "$4" --runtime "$runtime" --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["iops"], d["lat_us"]["p50"], d["lat_us"]["p99"])'
}
fio_iops() { # direct rw bs iodepth -> IOPS
  fio --name=b --filename="$img" --rw="$2" --bs="$3" --ioengine=io_uring --iodepth="$4" \
      --direct="$1" --invalidate=0 --runtime="$runtime" --time_based --size=1G \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

declare -A R Q F
cases=("randread 4k 32" "randwrite 4k 32" "read 128k 8" "write 128k 8")
modes=("pagecache" "direct")
load=$(cut -d' ' -f1-3 /proc/loadavg)
for m in "${modes[@]}"; do
  if [ "$m" = direct ]; then cache=none; qdirect=on; fdirect=1; else cache=writeback; qdirect=off; fdirect=0; fi
  # Warm the page cache for the buffered runs (and drop nothing: the direct runs bypass it).
  [ "$m" = pagecache ] && cat "$img" >/dev/null

  "$bin/rqemu-blk" --socket "$work/r.sock" --image "$img" --format raw --cache "$cache" ${aio:+--aio "$aio"} 2>/dev/null &
  pid=$!
  wait_sock "$work/r.sock"
  for c in "${cases[@]}"; do R[$m $c]=$(bench "$work/r.sock" $c); done
  kill $pid; wait $pid 2>/dev/null || true

  qemu-storage-daemon --object iothread,id=io0 \
    --blockdev "driver=file,node-name=f0,filename=$img,aio=io_uring,cache.direct=$qdirect" \
    --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$work/q.sock,writable=on,iothread=io0" &
  pid=$!
  wait_sock "$work/q.sock"
  for c in "${cases[@]}"; do Q[$m $c]=$(bench "$work/q.sock" $c); done
  kill $pid; wait $pid 2>/dev/null || true
  rm -f "$work/q.sock"

  for c in "${cases[@]}"; do F[$m $c]=$(fio_iops $fdirect $c); done
done

ratio() { python3 -c "print(f'{$1/$2:.2f}' if $2 else 'n/a')"; }
echo
echo "load average at start: $load; $(nproc) CPUs; rqemu-blk --aio ${aio:-default}; runtime ${runtime}s per case"
printf '%-10s %-16s %10s %10s %10s %9s %9s   %s\n' mode case rqemu-blk QSD host-fio rqemu/QSD rqemu/fio \
  'p50/p99 us: rqemu | QSD'
for m in "${modes[@]}"; do
  for c in "${cases[@]}"; do
    read -r ri rp50 rp99 <<<"${R[$m $c]}"; read -r qi qp50 qp99 <<<"${Q[$m $c]}"
    fi=${F[$m $c]}
    printf '%-10s %-16s %10.0f %10.0f %10s %9s %9s   %s/%s | %s/%s\n' "$m" "$c" "$ri" "$qi" "$fi" \
      "$(ratio "$ri" "$qi")" "$(ratio "$ri" "$fi")" "$rp50" "$rp99" "$qp50" "$qp99"
  done
done

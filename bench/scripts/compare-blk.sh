#!/usr/bin/env bash
# rqemu-blk vs qemu-storage-daemon (vhost-user-blk export) on the same raw image, driven by
# the same guest-less driver (rqemu-bench), plus fio (psync, one thread, page cache) on the
# same file as the host's single-thread limit.
# Prints the figures and the rqemu/QSD ratios. Usage: bench/scripts/compare-blk.sh [runtime-s]
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/../.."
runtime=${1:-5}
command -v fio >/dev/null || { apt-get install -y -qq --no-install-recommends fio >/dev/null; }
cargo build --release -q -p rqemu-blk -p rqemu-bench
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /tmp/rqemu-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
img=$work/disk.raw
dd if=/dev/urandom of="$img" bs=1M count=512 status=none

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
bench() { # socket rw bs iodepth -> IOPS
  "$bin/rqemu-bench" blk --socket "$1" --rw "$2" --bs "$3" --iodepth "$4" --runtime "$runtime" --json |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["iops"], d["lat_us"]["p50"], d["lat_us"]["p99"])'
}

declare -A R Q F
cases=("randread 4k 32" "randwrite 4k 32" "read 128k 8" "write 128k 8")
"$bin/rqemu-blk" --socket "$work/r.sock" --image "$img" 2>/dev/null &
wait_sock "$work/r.sock"
for c in "${cases[@]}"; do R[$c]=$(bench "$work/r.sock" $c); done
kill %1; wait %1 2>/dev/null || true

qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=off" \
  --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$work/q.sock,writable=on" &
wait_sock "$work/q.sock"
for c in "${cases[@]}"; do Q[$c]=$(bench "$work/q.sock" $c); done
kill %2 2>/dev/null || kill $(jobs -p); wait 2>/dev/null || true

for c in "${cases[@]}"; do
  set -- $c
  F[$c]=$(fio --name=b --filename="$img" --rw="$1" --bs="$2" --ioengine=psync --invalidate=0 \
            --runtime="$runtime" --time_based --size=512M --output-format=json 2>/dev/null |
          python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))')
done

printf '\n%-22s %12s %12s %12s %10s   (IOPS; p50/p99 latency in us)\n' case rqemu-blk QSD host-fio rqemu/QSD
for c in "${cases[@]}"; do
  read -r ri rp50 rp99 <<<"${R[$c]}"; read -r qi qp50 qp99 <<<"${Q[$c]}"
  printf '%-22s %12.0f %12.0f %12s %10.2f   rqemu %s/%s  qsd %s/%s\n' "$c" "$ri" "$qi" "${F[$c]}" \
    "$(python3 -c "print($ri/$qi if $qi else 0)")" "$rp50" "$rp99" "$qp50" "$qp99"
done

#!/usr/bin/env bash
# Boot of the reference guest to its init and to power-off, and a compute workload of real
# programs in that guest (the host's dynamically linked gzip, xz, bzip2, zstd, sha256sum, sort,
# bc and mawk of /opt/host/bin on generated text, timed on the host between two console
# markers the guest prints around it): rqemu-vmm --accel tcg with the JIT and with the
# interpreter only, against QEMU's TCG (-M microvm, qboot), in alternating rounds (jit, interp,
# qemu, jit, ...) so that drift of the machine's speed hits all three.
# Prints every run, the medians, the ratios to QEMU and the JIT's counters of the last jit run
# (--tcg-stats: share of instructions run in translated code, blocks translated, compile time
# in total and per block, where translated code hands back to the interpreter).
#
# Usage: scripts/tcg-bench.sh [ROUNDS]   (default 3)
# Env:   RQEMU_GUEST_DIR (default target/guest), RQEMU_VMM (default target/release/rqemu-vmm,
#        built when missing), TCG_BENCH_ARGS (extra rqemu-vmm arguments for the jit runs,
#        e.g. "--tcg-jit-threshold 1000"), TCG_BENCH_INTERP=0 (leave the interpreter out).
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
GUEST=${RQEMU_GUEST_DIR:-target/guest}
VMM=${RQEMU_VMM:-target/release/rqemu-vmm}
CMDLINE="console=ttyS0 panic=-1"
MARKER="rqemu guest: init reached"
# The compute workload, run by the guest's init from `rqemu.run=` (base64 on the command
# line). Its input is made before the start marker; every output is discarded but checked
# for size so that a program failing shows.
WORKLOAD='B=busybox P=/opt/host/bin W=/tmp
$B seq 1 150000 | $B sed "s/7/seven /" >$W/in
$B seq 1 40000 | $B awk "{ print (\$1 * 7919) % 100003 }" >$W/num
echo COMPUTE""-START
o() { n=$($B wc -c); [ "$n" -gt 0 ] || echo "COMPUTE-FAIL $1"; }
$P/gzip -9 -c $W/in | o gzip
$P/xz -6 -T1 -c $W/in | o xz
$P/bzip2 -9 -c $W/in | o bzip2
$P/zstd -q -15 -c $W/in | o zstd
$P/gzip -1 -c $W/in | $P/gzip -d -c | o gunzip
$P/sha256sum $W/in $W/num | o sha256sum
$P/sort -n -r $W/num | o sort
echo "scale=700; 4*a(1)" | $P/bc -l | o bc
$P/mawk "BEGIN { for (i = 1; i < 400000; i++) s += sin(i) * log(i); print s }" | o mawk
echo COMPUTE""-END'
QBOOT=/usr/share/qemu/qboot.rom

for f in "$GUEST/vmlinuz" "$GUEST/initramfs.cpio.gz"; do
  [ -f "$f" ] || { echo "missing $f (scripts/guest-assets.sh builds it)" >&2; exit 1; }
done
if [ ! -x "$VMM" ]; then
  cargo build --release -p rqemu-vmm
fi
QEMU=$(command -v qemu-system-x86_64 || true)
if [ -z "$QEMU" ] || [ ! -f "$QBOOT" ]; then
  echo "*** QEMU or $QBOOT missing: the QEMU column is not run ***" >&2
  QEMU=""
fi
# QEMU's qboot leaves the PIT unusable for TSC calibration: give the kernel the host's rate.
KHZ=$(awk -F': ' '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)

STATS=$(mktemp)
trap 'rm -f "$STATS"' EXIT

# run NAME CMD...: one boot; prints "INIT_S TOTAL_S COMPUTE_S" (INIT_S "-" when the marker never
# came, COMPUTE_S "-" when the workload did not run or a program of it failed).
run() {
  local name=$1 start init="" cstart="" cend="" failed="" line end
  shift
  : >"$STATS.$name"
  start=$(date +%s%N)
  while IFS= read -r line; do
    if [ -z "$init" ] && [[ $line == *"$MARKER"* ]]; then
      init=$(date +%s%N)
    fi
    [[ $line == *COMPUTE-START* ]] && cstart=$(date +%s%N)
    [[ $line == *COMPUTE-END* ]] && cend=$(date +%s%N)
    if [[ $line == *COMPUTE-FAIL* ]]; then
      failed=1
      echo "$name: $line" >&2
    fi
    if [[ $line == tcg-stats:* ]]; then
      echo "$line" >>"$STATS.$name"
    fi
  done < <(timeout 900 "$@" </dev/null 2>&1 || true)
  end=$(date +%s%N)
  if [ -n "$init" ]; then
    init=$(awk -v a="$start" -v b="$init" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  else
    init="-"
  fi
  local compute="-"
  if [ -n "$cstart" ] && [ -n "$cend" ] && [ -z "$failed" ]; then
    compute=$(awk -v a="$cstart" -v b="$cend" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  fi
  awk -v a="$start" -v b="$end" -v i="$init" -v c="$compute" 'BEGIN { printf "%s %.2f %s\n", i, (b - a) / 1e9, c }'
}

RUN_ARG="rqemu.run=$(printf '%s' "$WORKLOAD" | base64 -w0)"
# cmd MODE WORKLOAD(0|1): the command line of one run.
cmd() {
  local cl="$CMDLINE"
  [ "$2" = 1 ] && cl="$cl $RUN_ARG"
  case $1 in
    jit|interp)
      # shellcheck disable=SC2206 # TCG_BENCH_ARGS is a list of words
      local extra=(--tcg-mode "$1")
      [ "$1" = jit ] && extra+=(${TCG_BENCH_ARGS:-})
      CMD=("$VMM" --accel tcg --memory 512M --kernel "$GUEST/vmlinuz" --initrd
        "$GUEST/initramfs.cpio.gz" --cmdline "$cl" --tcg-stats "${extra[@]}") ;;
    qemu)
      CMD=("$QEMU" -accel tcg -M microvm,acpi=on -m 512M -bios "$QBOOT" -kernel "$GUEST/vmlinuz"
        -initrd "$GUEST/initramfs.cpio.gz" -append "$cl tsc_early_khz=$KHZ"
        -nographic -nodefaults -no-reboot -serial stdio) ;;
  esac
}

declare -A INIT TOTAL COMPUTE
modes=(jit)
[ "${TCG_BENCH_INTERP:-1}" = 1 ] && modes+=(interp)
[ -n "$QEMU" ] && modes+=(qemu)
for r in $(seq 1 "$ROUNDS"); do
  for m in "${modes[@]}"; do
    cmd "$m" 0
    read -r i t _ <<<"$(run "$m" "${CMD[@]}")"
    cmd "$m" 1
    read -r _ _ c <<<"$(run "$m-compute" "${CMD[@]}")"
    printf 'round %d %-7s init %6s s  power-off %6s s  compute %6s s\n' "$r" "$m" "$i" "$t" "$c"
    INIT[$m]+="$i "
    TOTAL[$m]+="$t "
    COMPUTE[$m]+="$c "
  done
done

median() { tr ' ' '\n' | { grep -v '^-\?$' || true; } | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }'; }

echo
echo "medians over $ROUNDS rounds (boot of the reference guest, $(nproc) cores):"
for m in "${modes[@]}"; do
  printf '  %-7s init %6s s  power-off %6s s  compute %6s s\n' "$m" "$(median <<<"${INIT[$m]}")" \
    "$(median <<<"${TOTAL[$m]}")" "$(median <<<"${COMPUTE[$m]}")"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
if [ -n "$QEMU" ]; then
  for m in "${modes[@]}"; do
    [ "$m" = qemu ] && continue
    printf '  %-7s / qemu ratio: power-off %s  compute %s\n' "$m" \
      "$(ratio "$(median <<<"${TOTAL[$m]}")" "$(median <<<"${TOTAL[qemu]}")")" \
      "$(ratio "$(median <<<"${COMPUTE[$m]}")" "$(median <<<"${COMPUTE[qemu]}")")"
  done
fi
echo
echo "JIT counters (last jit boot):"
sed 's/^/  /' "$STATS.jit"
echo "JIT counters (last jit compute run):"
sed 's/^/  /' "$STATS.jit-compute"
rm -f "$STATS".*

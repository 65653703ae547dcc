#!/usr/bin/env bash
# Boot of the reference guest to its init and to power-off: rqemu-vmm --accel tcg with the
# JIT and with the interpreter only, against QEMU's TCG (-M microvm, qboot), in alternating
# rounds (jit, interp, qemu, jit, ...) so that drift of the machine's speed hits all three.
# Prints every run, the medians, the ratios to QEMU and the JIT's counters of the last jit run
# (--tcg-stats: share of instructions run in translated code, blocks translated, compile time
# in total and per block, where translated code hands back to the interpreter).
#
# Usage: scripts/tcg-bench.sh [ROUNDS]   (default 3)
# Env:   RQEMU_GUEST_DIR (default target/guest), RQEMU_VMM (default target/release/rqemu-vmm,
#        built when missing), TCG_BENCH_ARGS (extra rqemu-vmm arguments for the jit runs,
#        e.g. "--tcg-jit-threshold 1000").
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
GUEST=${RQEMU_GUEST_DIR:-target/guest}
VMM=${RQEMU_VMM:-target/release/rqemu-vmm}
CMDLINE="console=ttyS0 panic=-1"
MARKER="rqemu guest: init reached"
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

# run NAME CMD...: one boot; prints "INIT_S TOTAL_S" (INIT_S "-" when the marker never came).
run() {
  local name=$1 start init="" line end
  shift
  : >"$STATS.$name"
  start=$(date +%s%N)
  while IFS= read -r line; do
    if [ -z "$init" ] && [[ $line == *"$MARKER"* ]]; then
      init=$(date +%s%N)
    fi
    if [[ $line == tcg-stats:* ]]; then
      echo "$line" >>"$STATS.$name"
    fi
  done < <(timeout 600 "$@" </dev/null 2>&1 || true)
  end=$(date +%s%N)
  if [ -n "$init" ]; then
    init=$(awk -v a="$start" -v b="$init" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  else
    init="-"
  fi
  awk -v a="$start" -v b="$end" -v i="$init" 'BEGIN { printf "%s %.2f\n", i, (b - a) / 1e9 }'
}

RQEMU=("$VMM" --accel tcg --memory 512M --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz"
  --cmdline "$CMDLINE" --tcg-stats)
# shellcheck disable=SC2206 # TCG_BENCH_ARGS is a list of words
JIT=("${RQEMU[@]}" --tcg-mode jit ${TCG_BENCH_ARGS:-})
INTERP=("${RQEMU[@]}" --tcg-mode interp)
QEMU_CMD=("$QEMU" -accel tcg -M microvm,acpi=on -m 512M -bios "$QBOOT" -kernel "$GUEST/vmlinuz"
  -initrd "$GUEST/initramfs.cpio.gz" -append "$CMDLINE tsc_early_khz=$KHZ"
  -nographic -nodefaults -no-reboot -serial stdio)

declare -A INIT TOTAL
modes=(jit interp)
[ -n "$QEMU" ] && modes+=(qemu)
for r in $(seq 1 "$ROUNDS"); do
  for m in "${modes[@]}"; do
    case $m in
      jit) out=$(run jit "${JIT[@]}") ;;
      interp) out=$(run interp "${INTERP[@]}") ;;
      qemu) out=$(run qemu "${QEMU_CMD[@]}") ;;
    esac
    read -r i t <<<"$out"
    printf 'round %d %-7s init %6s s  power-off %6s s\n' "$r" "$m" "$i" "$t"
    INIT[$m]+="$i "
    TOTAL[$m]+="$t "
  done
done

median() { tr ' ' '\n' | { grep -v '^-\?$' || true; } | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "-" }'; }

echo
echo "medians over $ROUNDS rounds (boot of the reference guest, $(nproc) cores):"
for m in "${modes[@]}"; do
  printf '  %-7s init %6s s  power-off %6s s\n' "$m" "$(median <<<"${INIT[$m]}")" "$(median <<<"${TOTAL[$m]}")"
done
if [ -n "$QEMU" ]; then
  q=$(median <<<"${TOTAL[qemu]}")
  for m in jit interp; do
    t=$(median <<<"${TOTAL[$m]}")
    printf '  %-7s / qemu power-off ratio: %s\n' "$m" "$(awk -v a="$t" -v b="$q" 'BEGIN { printf "%.2f", a / b }')"
  done
fi
echo
echo "JIT counters (last jit run):"
sed 's/^/  /' "$STATS.jit"
rm -f "$STATS".*

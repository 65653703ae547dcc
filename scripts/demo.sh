#!/usr/bin/env bash
# The rqemu demo: a microVM run by rqemu-vmm on rqemu's own software CPU (TCG: this machine's
# KVM cannot boot Linux), whose disk is served by rqemu-blk, a separate device daemon
# speaking vhost-user. The guest is the project's default guest (Debian cloud kernel + a
# busybox initramfs, built and cached by scripts/guest-assets.sh): it reads and writes its
# disk, then powers off; the host checks the qcow2 image the daemon wrote.
#
# RQEMU_DEMO_VMM=qemu runs the same guest and daemon under QEMU (TCG, -M microvm) instead,
# as a reference vhost-user frontend.
set -Eeuo pipefail
trap 'rc=$?; printf "%s: line %d: \"%s\" failed (exit %d)\n" "${0##*/}" "$LINENO" "$BASH_COMMAND" "$rc" >&2' ERR
cd "$(dirname "$0")/.."

scripts/install-deps.sh
scripts/guest-assets.sh >/dev/null
cargo build --release -q -p rqemu-blk -p rqemu-vmm
bin=${CARGO_TARGET_DIR:-target}/release

guest=${RQEMU_GUEST_DIR:-target/guest}
work=target/demo
mkdir -p "$work"
img=$work/disk.qcow2
sock=$work/blk.sock
rm -f "$img" "$sock"
qemu-img create -q -f qcow2 "$img" 64M

"$bin/rqemu-blk" --socket "$sock" --image "$img" --serial rqemu-demo 2>"$work/rqemu-blk.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done

script=$(cat <<'GUEST'
echo "demo: disk $(cat /sys/block/vda/serial) has $(cat /sys/block/vda/size) sectors"
echo "hello from the guest, through rqemu-blk" | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null
dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -n1
dd if=/dev/zero of=/dev/vda bs=1M count=8 seek=16 oflag=direct 2>/dev/null && echo "demo: wrote 8 MiB with O_DIRECT"
GUEST
)
run=$(printf '%s\n' "$script" | base64 -w0)
start=$(date +%s.%N)
if [ "${RQEMU_DEMO_VMM:-rqemu}" = qemu ]; then
  # qboot, not SeaBIOS: SeaBIOS drives virtio-mmio disks itself from memory outside the
  # shared memfd; qboot leaves the TSC uncalibrated, hence tsc_early_khz (TCG runs the guest
  # TSC at the host's rate).
  khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
  echo "demo: QEMU TCG microVM + rqemu-blk"
  timeout 120 qemu-system-x86_64 -accel tcg -bios /usr/share/qemu/qboot.rom \
    -M microvm,memory-backend=mem,acpi=on -m 256M \
    -object memory-backend-memfd,id=mem,size=256M,share=on \
    -global virtio-mmio.force-legacy=false -nodefaults -no-user-config -nographic -no-reboot \
    -serial stdio -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet tsc_early_khz=${khz:-2000000} rqemu.run=$run" \
    -chardev socket,id=blk0,path="$sock" -device vhost-user-blk,chardev=blk0 |
    tr -d '\r' | grep -E '^(demo|hello|rqemu guest|RQEMU-EXIT)' || true
else
  # The device type is discovered from rqemu-blk's identity: no "blk:" prefix needed.
  # No timing flag: the software CPU reports its 1 GHz TSC/LAPIC-timer rate in CPUID 0x15/0x16.
  echo "demo: rqemu-vmm --accel tcg + rqemu-blk (software CPU: about 10 s to boot Linux)"
  timeout 300 "$bin/rqemu-vmm" --accel tcg --memory 256M --kernel "$guest/vmlinuz" \
    --initrd "$guest/initramfs.cpio.gz" --device-socket "$sock" \
    --cmdline "console=ttyS0 quiet panic=-1 rqemu.run=$run" |
    tr -d '\r' | grep -E '^(demo|hello|rqemu guest|RQEMU-EXIT)' || true
fi
echo "demo: guest ran and powered off after $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"

kill -TERM $daemon; wait $daemon || true
trap - EXIT
echo "host: qemu-img check of the image rqemu-blk wrote:"
qemu-img check "$img"
qemu-img convert -O raw "$img" "$work/disk.raw"
echo "host: sector 100 of the image holds: $(dd if="$work/disk.raw" bs=512 skip=100 count=1 2>/dev/null | head -n1)"
rm -f "$work/disk.raw"

#!/bin/sh
# /init of the rqemu test guest (busybox-static initramfs built by scripts/guest-assets.sh).
#
# 1. mounts proc, sysfs, devtmpfs (+ devpts, debugfs);
# 2. loads the virtio modules listed in /etc/rqemu-modules (dependency order; failures are
#    reported and ignored);
# 3. runs the test command(s):
#      - kernel cmdline `rqemu.run=<base64 of a shell script>` (decoded with busybox base64),
#      - then an executable /test.sh if present (tests append a second cpio archive with it);
#    with neither, it only prints the greeting;
# 4. prints `RQEMU-EXIT=<status>` (first non-zero status of the commands, 0 if none failed),
#    syncs and powers off (`poweroff -f`, falling back to `reboot -f`: QEMU runs -no-reboot).
#
# `rqemu.shell` on the cmdline starts an interactive shell on the console before powering off
# (manual debugging only).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# If the kernel found no /dev/console in the initramfs, stdio is closed: reopen on the console.
if [ -c /dev/console ]; then
    exec </dev/console >/dev/console 2>&1
fi
mkdir -p /dev/pts /dev/shm /tmp /run /mnt
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null

echo "rqemu guest: init reached"

if [ -f /etc/rqemu-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod.ko" 2>/tmp/insmod.err ||
            echo "rqemu guest: insmod $mod failed: $(cat /tmp/insmod.err)"
    done </etc/rqemu-modules
fi

status=0
ran=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    rqemu.run=*)
        ran=1
        if echo "${arg#rqemu.run=}" | base64 -d >/rqemu-run.sh 2>/tmp/b64.err; then
            sh /rqemu-run.sh
            st=$?
        else
            echo "rqemu guest: cannot decode rqemu.run: $(cat /tmp/b64.err)"
            st=125
        fi
        [ "$status" -ne 0 ] || status=$st
        ;;
    esac
done
if [ -x /test.sh ]; then
    ran=1
    /test.sh
    st=$?
    [ "$status" -ne 0 ] || status=$st
fi
[ "$ran" -eq 1 ] || echo "rqemu guest: no test command"

case " $(cat /proc/cmdline) " in
*" rqemu.shell "*) setsid cttyhack sh ;;
esac

sync
echo "RQEMU-EXIT=$status"
poweroff -f
sleep 2
reboot -f

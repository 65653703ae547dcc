# shellcheck shell=bash
# Shared by scripts/guest-assets.sh (the test initramfs) and scripts/agent-initramfs.sh
# (rqemu-run's agent initramfs); sourced, uses the caller's `log` and `die`.

# stage_modules KVER_DIR STAGE MODULE...: copies each module the kernel has as a module
# (decompressed) to STAGE/lib/modules/<name>.ko and lists the load order in
# STAGE/etc/rqemu-modules; built-in ones are only noted. Fails on a module that is neither.
stage_modules() {
    local kver_dir="$1" stage="$2" m f
    shift 2
    local builtin_list="$kver_dir/modules.builtin"
    local loaded=() builtin=()
    mkdir -p "$stage/lib/modules" "$stage/etc"
    : >"$stage/etc/rqemu-modules"
    for m in "$@"; do
        if [ -f "$builtin_list" ] && grep -Eq "/${m}\.ko(\.[a-z]+)?$" "$builtin_list"; then
            builtin+=("$m")
            continue
        fi
        f="$(find "$kver_dir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
            -o -name "$m.ko.gz" \) -print -quit)"
        [ -n "$f" ] || die "module $m is neither built in nor present in the kernel package"
        case "$f" in
        *.ko.xz) xz -dc "$f" >"$stage/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -q -dc "$f" >"$stage/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$stage/lib/modules/$m.ko" ;;
        *) cp "$f" "$stage/lib/modules/$m.ko" ;;
        esac
        echo "$m" >>"$stage/etc/rqemu-modules"
        loaded+=("$m")
    done
    log "modules: ${loaded[*]:-none}${builtin[*]:+ (built in: ${builtin[*]})}"
}

# pack_initramfs STAGE OUT: /dev/console and /dev/null (as root: the kernel gives /init its
# console at once; otherwise /init reopens it), then STAGE as a reproducible newc cpio
# (sorted, owner 0), gzip -6, written to OUT atomically.
pack_initramfs() {
    local stage="$1" out="$2"
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 600 "$stage/dev/console" c 5 1
        mknod -m 666 "$stage/dev/null" c 1 3
    fi
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) |
        gzip -6 -n >"$out.tmp"
    mv "$out.tmp" "$out"
}

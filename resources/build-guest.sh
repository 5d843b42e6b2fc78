#!/usr/bin/env bash
# Build Ebb's default guest: the stock Debian kernel (via fetch-kernel.sh) plus an initramfs
# with busybox-static, the virtio modules, /init (resources/guest/init) and the guest tool
# ebb-guest (resources/guest-tool, built as a static binary). See GUEST-PROTOCOL.md.
#
# Usage: resources/build-guest.sh
#
# Output directory (printed on stdout; logs go to stderr):
#   $EBB_CACHE_DIR/guest/vmlinuz            the stock bzImage (hard link or copy)
#   $EBB_CACHE_DIR/guest/vmlinux            the ELF kernel (hard link or copy)
#   $EBB_CACHE_DIR/guest/initramfs.cpio.gz  the initramfs
#   $EBB_CACHE_DIR/guest/kver               the kernel release (uname -r)
#   $EBB_CACHE_DIR/guest/modules            the modules /init loads, in order ("name path")
#   $EBB_CACHE_DIR/guest/inputs.sha256      stamp of the inputs; unchanged stamp = no rebuild
#
# Environment: EBB_CACHE_DIR (see common.sh); EBB_GUEST_FORCE=1 rebuilds regardless of the
# stamp.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/common.sh"

# Modules the guest needs (with their dependencies from modules.dep), in this order.
required_modules=(virtio_mmio virtio_balloon)
# Loaded if the kernel has them: evdev gives /dev/input/event* (CONFIG_INPUT_EVDEV=m on
# Debian), button is the ACPI power button that ebb-guest watches there.
optional_modules=(evdev button)

guest_dir="$here/guest"
out="$EBB_CACHE_DIR/guest"
start_time=$SECONDS

kdir="$("$here/fetch-kernel.sh")" || die "fetch-kernel.sh failed"
[ -f "$kdir/kver" ] || die "fetch-kernel.sh gave $kdir without a kver file"
kver="$(cat "$kdir/kver")"
moddir="$kdir/lib/modules/$kver"
[ -f "$moddir/modules.dep" ] || die "no modules.dep in $moddir"

ensure_packages busybox-static cpio file gzip libc6-dev
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static is installed but $busybox is missing"
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"

mkdir -p "$EBB_CACHE_DIR"
exec 9>"$EBB_CACHE_DIR/guest.lock"
flock 9 || die "cannot lock $EBB_CACHE_DIR/guest.lock"

# --- input stamp -------------------------------------------------------------------------
inputs_stamp() {
    {
        echo "kernel-dir $(basename "$kdir")"
        echo "kernel $kver $(cat "$kdir/package" 2>/dev/null || true)"
        echo "busybox $(dpkg-query -W -f='${Version}' busybox-static)"
        echo "modules ${required_modules[*]} / ${optional_modules[*]}"
        (
            cd "$repo"
            {
                printf '%s\n' resources/build-guest.sh resources/common.sh \
                    resources/fetch-kernel.sh resources/extract-vmlinux.sh
                find resources/guest -type f -print
            } | LC_ALL=C sort -u | while read -r f; do
                if [ -f "$f" ]; then sha256sum "$f"; else echo "missing $f"; fi
            done
        )
        guest_tool_sources_hash
    } | sha256sum | cut -d' ' -f1
}
stamp="$(inputs_stamp)"

outputs=(vmlinuz vmlinux initramfs.cpio.gz kver modules)
if [ "${EBB_GUEST_FORCE:-0}" != 1 ] && [ -f "$out/inputs.sha256" ] \
        && [ "$(cat "$out/inputs.sha256")" = "$stamp" ]; then
    complete=1
    for f in "${outputs[@]}"; do [ -s "$out/$f" ] || complete=0; done
    if [ "$complete" = 1 ]; then
        log "guest is up to date ($out)"
        echo "$out"
        exit 0
    fi
fi

# --- ebb-guest, static ----------------------------------------------------------------------
tool_bin="$(build_guest_tool)" || die "building ebb-guest failed"
assert_static "$busybox"

# --- staging tree --------------------------------------------------------------------------
mkdir -p "$out"
tmp="$(mktemp -d "$EBB_CACHE_DIR/guest-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/ebb,proc,sys,dev,run,tmp,root,lib/modules/"$kver"}
chmod 1777 "$root/tmp"

cp "$busybox" "$root/bin/busybox"
while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)
[ -L "$root/bin/sh" ] || die "busybox has no sh applet"
[ -L "$root/sbin/insmod" ] || [ -L "$root/bin/insmod" ] || die "busybox has no insmod applet"

install -m 0755 "$guest_dir/init" "$root/init"
install -m 0755 "$tool_bin" "$root/bin/ebb-guest"
echo "$kver" > "$root/etc/ebb/kver"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' > "$root/etc/group"
# Anything else placed in resources/guest/rootfs/ is copied as is.
if [ -d "$guest_dir/rootfs" ]; then
    cp -a "$guest_dir/rootfs/." "$root/"
fi

# --- modules -------------------------------------------------------------------------------
order="$(module_load_order "$moddir" "${required_modules[*]}" "${optional_modules[*]}")" \
    || die "cannot resolve the guest's modules in $moddir"
: > "$root/etc/ebb/modules"
# shellcheck disable=SC2086 # one path per line, no spaces in module paths
install_modules "$moddir" "$root" "$kver" "$root/etc/ebb/modules" $order
log "modules in load order: $(cut -d' ' -f1 "$root/etc/ebb/modules" | xargs)"

# --- initramfs -----------------------------------------------------------------------------
# /dev/console must exist before /init runs (the kernel opens it for PID 1's stdio). It is
# written as a separate newc archive, so no mknod (and no root) is needed; the kernel unpacks
# concatenated archives.
newc_entry() { # newc_entry INO MODE NLINK RDEVMAJOR RDEVMINOR NAME
    local name="$6" namesize=$((${#6} + 1)) pad
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$1" "$2" 0 0 "$3" 0 0 0 0 "$4" "$5" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero
}
dev_archive() {
    newc_entry $((0x7e0001)) $((0040755)) 2 0 0 dev
    newc_entry $((0x7e0002)) $((0020600)) 1 5 1 dev/console
    newc_entry 0 0 1 0 0 'TRAILER!!!'
}

cpio_newc "$root" > "$tmp/main.cpio"
dev_archive > "$tmp/dev.cpio"

# Check both parts (cpio -t stops at the first trailer, so each is listed on its own).
listing="$(cpio --quiet -itv < "$tmp/main.cpio")" || die "the initramfs does not list with cpio"
for f in init bin/busybox bin/sh bin/ebb-guest etc/ebb/modules; do
    grep -q " $f\( ->.*\)\?$" <<<"$listing" || die "initramfs lacks $f"
done
listing="$(cpio --quiet -itv < "$tmp/dev.cpio")" || die "the /dev/console archive is broken"
grep -q '^crw------- .* 5, *1 .* dev/console$' <<<"$listing" \
    || die "the /dev/console archive is wrong: $listing"

cat "$tmp/main.cpio" "$tmp/dev.cpio" | gzip -9 -n > "$tmp/initramfs.cpio.gz"

# --- install -------------------------------------------------------------------------------
place_kernel() { # place_kernel NAME: hard link (or copy) the kernel's file into $out
    [ "$kdir/$1" -ef "$out/$1" ] && return 0
    rm -f "$out/.$1.tmp"
    ln "$kdir/$1" "$out/.$1.tmp" 2>/dev/null || cp "$kdir/$1" "$out/.$1.tmp"
    mv -f "$out/.$1.tmp" "$out/$1"
}
rm -f "$out/inputs.sha256"
place_kernel vmlinuz
place_kernel vmlinux
mv -f "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$kver" > "$out/kver"
cp "$root/etc/ebb/modules" "$out/modules"
echo "$stamp" > "$out/inputs.sha256"

log "built $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes, kernel $kver) in $((SECONDS - start_time)) s"
echo "$out"

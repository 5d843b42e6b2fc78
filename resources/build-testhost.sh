#!/usr/bin/env bash
# Build the nested test host ("L1") boot files for hosts whose /dev/kvm cannot boot a stock
# Linux guest (PVM, no svm/vmx). QEMU TCG with `-cpu max` emulates AMD SVM; the Debian
# kernel booted there loads kvm-amd and runs real KVM guests. See
# shared notes test-host.md and tests/src/testhost.rs (the harness that boots it).
#
# Output (cache, rebuilt when the kernel, busybox, this script or the init change):
#   $EBB_CACHE_DIR/testhost/vmlinux            the L1 kernel, ELF, booted via PVH (symlink)
#   $EBB_CACHE_DIR/testhost/vmlinuz            the same kernel as Debian's bzImage
#   $EBB_CACHE_DIR/testhost/initramfs.cpio.gz  busybox-static, the modules, /init, kvm-hold
#   $EBB_CACHE_DIR/testhost/kver               the L1 kernel release
#   $EBB_CACHE_DIR/testhost/modtree            path of the L1 kernel's full module tree
#   $EBB_CACHE_DIR/testhost/modules            the modules in load order
# Prints the output directory on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/common.sh"

ensure_packages busybox-static cpio kmod gzip xz-utils zstd gcc libc6-dev

kdir="$("$here/fetch-kernel.sh")"
kver="$(cat "$kdir/kver")"
modroot="$kdir/lib/modules/$kver"
[ -f "$modroot/modules.dep" ] || die "no modules.dep in $modroot"
# busybox-static installs /bin/busybox (it conflicts with the dynamic `busybox` package).
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox missing although busybox-static is installed"

out="$EBB_CACHE_DIR/testhost"
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

# Contents only (not paths): the stamp must not depend on how the script was invoked.
stamp="$( { echo "$kdir"; cat "$kdir/package" 2>/dev/null; cat "$busybox" \
    "${BASH_SOURCE[0]}" "$here/testhost/init" "$here/testhost/kvm-hold.c"; } \
    | sha256sum | cut -d' ' -f1)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] \
        && [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/vmlinux" ]; then
    echo "$out"
    exit 0
fi
log "building the test host initramfs for $kver"

# Modules in load order: each one after its dependencies (from modules.dep). The seed
# order matters where modules.dep does not say it: virtio_ring must precede virtio.
# loop: `ebb-bench disk` puts its data image behind a loop device (a page cache that
# reads without waiting, which tmpfs in Linux 6.1 lacks).
wanted=(irqbypass ccp kvm kvm-amd virtio_ring virtio virtio_pci_legacy_dev
    virtio_pci_modern_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p loop)
declare -A done_mod=()
order=()
modpath() { # NAME -> path relative to $modroot as listed in modules.dep
    local n="$1" alt="${1//-/_}" alt2="${1//_/-}"
    sed -n 's/^\([^:]*\/\('"$n"'\|'"$alt"'\|'"$alt2"'\)\.ko\(\.[a-z]*\)\?\):.*/\1/p' \
        "$modroot/modules.dep" | head -n1
}
add_mod() { # RELPATH
    local rel="$1" deps d i
    [ -n "${done_mod[$rel]:-}" ] && return 0
    done_mod[$rel]=1
    deps="$(grep -m1 "^$rel:" "$modroot/modules.dep" | cut -d: -f2-)"
    # modules.dep lists dependencies so that the last one must be loaded first.
    read -r -a deps_arr <<< "$deps"
    for ((i = ${#deps_arr[@]} - 1; i >= 0; i--)); do
        add_mod "${deps_arr[$i]}"
    done
    order+=("$rel")
}
for m in "${wanted[@]}"; do
    rel="$(modpath "$m")"
    [ -n "$rel" ] || die "module $m not found in $modroot/modules.dep"
    add_mod "$rel"
done

stage="$(mktemp -d "$out/stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,etc,proc,sys,dev,run,tmp,host,lib/modules}
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$stage/bin/$applet"
done
: > "$stage/etc/testhost-modules"
for rel in "${order[@]}"; do
    base="$(basename "$rel")"
    case "$base" in
        *.ko) cp "$modroot/$rel" "$stage/lib/modules/$base"; name="$base" ;;
        *.ko.xz) name="${base%.xz}"; xz -dc "$modroot/$rel" > "$stage/lib/modules/$name" ;;
        *.ko.zst) name="${base%.zst}"; zstd -qdc "$modroot/$rel" > "$stage/lib/modules/$name" ;;
        *.ko.gz) name="${base%.gz}"; gzip -dc "$modroot/$rel" > "$stage/lib/modules/$name" ;;
        *) die "unknown module format: $rel" ;;
    esac
    echo "$name" >> "$stage/etc/testhost-modules"
done
install -m 0755 "$here/testhost/init" "$stage/init"
cc -static -Os -Wall -Werror -o "$stage/bin/kvm-hold" "$here/testhost/kvm-hold.c" \
    || die "cannot build kvm-hold (static; needs gcc and libc6-dev)"
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

(cd "$stage" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --quiet --owner=0:0) | gzip -6 > "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp "$kdir/vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
# The ELF kernel boots through its PVH entry (QEMU -kernel): no decompression under TCG,
# which saves ~7 s of every L1 boot compared with the bzImage.
ln -sfn "$kdir/vmlinux" "$out/vmlinux"
echo "$kver" > "$out/kver"
echo "$modroot" > "$out/modtree"
cp "$stage/etc/testhost-modules" "$out/modules"
echo "$stamp" > "$out/.stamp"
log "test host initramfs: $(du -h "$out/initramfs.cpio.gz" | cut -f1), modules: $(tr '\n' ' ' < "$out/modules")"
echo "$out"

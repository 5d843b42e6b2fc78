#!/usr/bin/env bash
# Fetch the current Debian `linux-image-amd64` kernel without installing it.
#
# The versioned package (linux-image-6.1.0-NN-amd64) is resolved at run time from the
# metapackage's dependency: security updates change the ABI number and old versions
# leave the mirror, so nothing here pins it.
#
# Output (cache, rebuilt when the resolved version changes):
#   $EBB_CACHE_DIR/kernel/current      -> symlink to the version directory
#   <version dir>/vmlinuz               the stock bzImage
#   <version dir>/vmlinux               the ELF kernel extracted from it (PVH note inside)
#   <version dir>/lib/modules/<kver>/   the module tree
#   <version dir>/kver                  the kernel release string (uname -r)
#   <version dir>/config                the kernel's build config
# Prints the version directory on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/common.sh"

ensure_packages xz-utils zstd cpio kmod

resolve_version() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}

pkg="$(resolve_version)"
if [ -z "$pkg" ]; then
    log "package lists are missing or stale; running apt-get update"
    if [ "$(id -u)" -ne 0 ]; then sudo apt-get update >&2; else apt-get update >&2; fi
    pkg="$(resolve_version)"
fi
[ -n "$pkg" ] || die "cannot resolve linux-image-amd64's kernel package (apt-cache depends failed)"
debver="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
[ -n "$debver" ] && [ "$debver" != "(none)" ] || die "no candidate version for $pkg"

dir="$EBB_CACHE_DIR/kernel/${pkg}_${debver}"
if [ ! -f "$dir/.complete" ]; then
    log "fetching $pkg $debver"
    rm -rf "$dir"
    mkdir -p "$dir/download"
    (cd "$dir/download" && chmod 777 . && apt-get download "$pkg=$debver" >&2) \
        || die "apt-get download $pkg=$debver failed"
    dpkg-deb -x "$dir"/download/*.deb "$dir/root"
    kver="$(ls "$dir/root/lib/modules" | head -n1)"
    [ -n "$kver" ] || die "$pkg has no module tree"
    cp "$dir/root/boot/vmlinuz-$kver" "$dir/vmlinuz"
    cp "$dir/root/boot/config-$kver" "$dir/config"
    mkdir -p "$dir/lib/modules"
    mv "$dir/root/lib/modules/$kver" "$dir/lib/modules/$kver"
    PATH="$PATH:/sbin:/usr/sbin" depmod -b "$dir" "$kver"
    echo "$kver" > "$dir/kver"
    echo "$pkg $debver" > "$dir/package"
    "$here/extract-vmlinux.sh" "$dir/vmlinuz" > "$dir/vmlinux.tmp"
    mv "$dir/vmlinux.tmp" "$dir/vmlinux"
    rm -rf "$dir/root" "$dir/download"
    touch "$dir/.complete"
fi
ln -sfn "$(basename "$dir")" "$EBB_CACHE_DIR/kernel/current"
echo "$dir"
